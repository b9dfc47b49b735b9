"""``ist-finetune``: fine-tune a causal LM with IST in one command (also ``python -m ist_optim``).

``ist-finetune plan --model llama-2-7b --budget 24GiB`` predicts the peak memory of each way
to fine-tune a model instead (:mod:`ist_optim.cli.plan`).

Only :mod:`torch` is imported with :mod:`ist_optim`; this package imports transformers,
peft and tqdm when a command runs. Needs the ``cli`` extra: ``pip install 'ist-optim[cli]'``.

The pieces of its training harness that other harnesses reuse (the benchmarks do) are
public on purpose, imported on first use: the data (:func:`load_documents`,
:func:`block_batches`, :func:`heldout_indices`), the models (:func:`load_model`,
:func:`load_tokenizer`, :func:`resolve_model_dir`, :func:`add_adapters`), the loop
(:func:`build_optimizer`, :func:`build_scheduler`, :func:`train_loop`, :func:`evaluate`),
one run of a method (:class:`MethodSpec`, :func:`prepare_context`, :func:`run_method`)
and the tables (:func:`markdown_table`, :func:`mean_range`). Everything else in
``ist_optim.cli.*`` is the command's own.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .errors import CLIError

#: The harness's public names -> (module of ``ist_optim.cli``, name there).
_HARNESS = {
    "MethodSpec": ("runner", "MethodSpec"),
    "add_adapters": ("models", "add_adapters"),
    "block_batches": ("data", "block_batches"),
    "build_optimizer": ("train", "build_optimizer"),
    "build_scheduler": ("train", "build_scheduler"),
    "evaluate": ("train", "evaluate"),
    "heldout_indices": ("data", "heldout_indices"),
    "load_documents": ("data", "load_documents"),
    "load_model": ("models", "load_model"),
    "load_tokenizer": ("models", "load_tokenizer"),
    "markdown_table": ("report", "markdown_table"),
    "mean_range": ("report", "mean_range"),
    "prepare_context": ("runner", "prepare_context"),
    "resolve_model_dir": ("models", "resolve_model_dir"),
    "run_method": ("runner", "run_method"),
    "train_loop": ("train", "train"),  # not ``train``: that is the module's name
}

__all__ = ["CLIError", "main", *_HARNESS]


def __getattr__(name: str) -> Any:
    """The harness's public names (:data:`_HARNESS`), imported on first use."""
    if name not in _HARNESS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _HARNESS[name]
    return getattr(importlib.import_module(f".{module}", __name__), attribute)

logger = logging.getLogger(__name__)


def _settings(args: Any, ist_kwargs: dict[str, Any], lr: float, recipe: str) -> dict[str, Any]:
    return {"model": args.model, "data": args.data, "peft": args.peft, "rank": args.rank,
            "optimizer": args.optimizer, "lr": lr, "lr_schedule": args.lr_schedule,
            "warmup_steps": args.warmup_steps, "steps": args.steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": args.seed,
            "ist_kwargs": ist_kwargs, "quantize": args.quantize, "recipe": recipe}


#: Loggers of libraries that peft imports when they are installed, whether or not a run
#: uses them: bitsandbytes warns at import that a hub kernel cannot be fetched offline.
UNUSED_LIBRARY_LOGGERS = ("bitsandbytes", "kernels")


def quiet_unused_libraries() -> None:
    """Keep the import-time warnings of :data:`UNUSED_LIBRARY_LOGGERS` out of a run that
    quantizes nothing (``--quantize none``: no bitsandbytes layer; the CLI builds no
    8-bit optimizer); their errors still show."""
    for name in UNUSED_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _run(argv: list[str] | None) -> int:
    from .parser import ist_kwargs_from_args, parse_args

    args = parse_args(argv)
    if args.quantize == "none":
        quiet_unused_libraries()
    import torch

    from .checkpoints import checkpoint_options
    from .compare import compare_specs, run_compare
    from .recipe import apply_recipe
    from .report import compare_table, results_table, save_outputs
    from .runner import MethodSpec, prepare_context, run_method

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    targets: Any = args.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    recipe = apply_recipe(args)  # fills the unset flags before the fingerprint reads them
    ist_kwargs = ist_kwargs_from_args(args)
    checkpoints = checkpoint_options(args)
    if ist_kwargs and args.optimizer != "ist":
        raise CLIError(f"IST options {sorted(ist_kwargs)} need --optimizer ist, "
                       f"not {args.optimizer}")
    started = time.perf_counter()
    print(f"ist-finetune: model {args.model}, data {args.data}, {args.peft} r{args.rank}, "
          f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens on {device}, "
          f"{args.lr_schedule} schedule ({args.warmup_steps} warm-up steps), {recipe.name} "
          "recipe", flush=True)
    context = prepare_context(
        args.model, args.data, val_fraction=args.val_fraction, seq_len=args.seq_len,
        batch_size=args.batch_size, eval_batches=args.eval_batches, rank=args.rank,
        alpha=args.alpha, target_modules=targets, device=device, quantize=args.quantize,
        badam_switch_every=args.badam_switch_every, progress=not args.no_progress,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps)
    train_blocks, val_blocks = context.tokens.num_blocks(args.seq_len)
    print(f"data: {train_blocks} training and {val_blocks} held-out blocks of "
          f"{args.seq_len} tokens", flush=True)
    output_dir = Path(args.output_dir)

    def finish(run: Any) -> None:
        settings = _settings(args, run.spec.ist_kwargs, run.spec.learning_rate, recipe.name)
        table = results_table(run, settings)
        written = save_outputs(run, output_dir, table)
        print("\n\n".join(table.split("\n\n")[1:3]))
        print("wrote " + ", ".join(str(p) for p in written))

    if args.compare:
        specs = compare_specs(args.peft, ist_kwargs, args.lr, recipe.learning_rate)
        runs = run_compare(specs, context, steps=args.steps, seed=args.seed,
                           on_run=lambda r: finish(r) if r.spec is specs[1] else None)
        table = compare_table(runs)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "compare.md").write_text(
            f"# ist-finetune --compare\n\n{args.steps} steps of {args.batch_size} x "
            f"{args.seq_len} tokens, seed {args.seed}, model {args.model}, data {args.data}\n\n"
            f"{table}\n")
        with (output_dir / "compare.jsonl").open("w") as handle:
            for run in runs:
                handle.write(json.dumps(run.summary()) + "\n")
        print(table)
        print(f"wrote {output_dir / 'compare.md'}, {output_dir / 'compare.jsonl'}")
    else:
        spec = MethodSpec(f"{args.peft} + {args.optimizer}", args.peft, args.optimizer,
                          ist_kwargs, recipe.learning_rate(args.peft, args.optimizer, args.lr))
        finish(run_method(spec, context, steps=args.steps, seed=args.seed,
                          checkpoints=checkpoints))
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ist-finetune``; returns the exit status (2 for bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        if words[:1] == ["plan"]:
            from .plan import plan_main

            return plan_main(words[1:])
        return _run(argv)
    except CLIError as err:
        message = " ".join(str(err).split())
        print(f"ist-finetune: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ist-finetune: interrupted", file=sys.stderr)
        return 130
