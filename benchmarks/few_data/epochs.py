"""Few data, several epochs: the regime of the IST paper's accuracy claim, in miniature.

A small fixed training subset (``--train-blocks`` blocks of ``--seq-len`` tokens drawn from
the training plays) is trained for ``--epochs`` epochs; after every epoch the loss is
measured on a validation split (whole plays taken from the training side, never trained on)
and on the held-out test plays (the same 4 plays as the quality benchmark), so overfitting
shows as a test loss that turns up. At the end the model answers a multiple-choice
next-line task built from the test plays (:mod:`benchmarks.few_data.next_line`).

Learning rate: every method runs each rate of its grid on ``--sweep-seed``; the rate with
the lowest *validation* loss at the final epoch is chosen, and only that rate runs on the
other seeds (the sweep seed's run at that rate is reused, the runs are deterministic).
The test plays never take part in the choice.

Every run reuses the ``ist-finetune`` pieces (:mod:`ist_optim.cli`): a fresh model, adapters
seeded by the run's seed, the same block order for every method of a seed. Results go to
``--out`` as one JSON line per run, written as each run ends; a rerun with the same
``--out`` skips the runs already there, so a cut run can be resumed. Run::

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.few_data \\
        --out benchmarks/results/few_data/runs.jsonl
    python -m benchmarks.few_data --report benchmarks/results/few_data/runs.jsonl \\
        --table benchmarks/results/few_data/few_data.md \\
        --plot benchmarks/results/few_data/curves.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ist_optim.cli import (
    CLIError,
    MethodSpec,
    block_batches,
    build_optimizer,
    load_documents,
    load_model,
    load_tokenizer,
    train_loop,
)

from ..benchkit.data import heldout_loss, pick_blocks, split_plays, token_stream
from ..benchkit.models import pretrained
from ..benchkit.protocol import ProtocolMismatch, add_group_by, protocol_groups, report_groups
from ..benchkit.report import append_row, markdown_table, mean_range, read_rows
from ..benchkit.sweep import at_chosen_rates, chosen_rates, next_runs
from .next_line import Question, accuracy, choice_losses, next_line_questions

METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", "lora", "adamw"),
    "lora+ist": MethodSpec("lora+ist", "lora", "ist"),
    "full+ist": MethodSpec("full+ist", "full", "ist", {"active_layers": 3}),
    "lora+ist-first-order": MethodSpec("lora+ist-first-order", "lora", "ist",
                                       {"estimator": "first-order"}),
    "lora+uniform": MethodSpec("lora+uniform", "lora", "ist", {"sampling": "uniform"}),
    # the budget benchmark's best IST candidate (issue 21): every layer for the first quarter
    # of the run (10 of the 40 steps, as dense_steps=50 of 200 there), then uniform draws
    "lora+uniform-dense10": MethodSpec("lora+uniform-dense10", "lora", "ist",
                                       {"sampling": "uniform", "dense_steps": 10}),
    # the dense phase chosen later on the budget benchmark's validation plays (100 of 200
    # steps, ist-finetune's default: half the run): 20 of the 40 steps
    "lora+uniform-dense20": MethodSpec("lora+uniform-dense20", "lora", "ist",
                                       {"sampling": "uniform", "dense_steps": 20}),
}
LR_GRID = {"lora": (1e-3, 3e-3), "full": (1e-4, 3e-4)}
OUT_DIR = Path(__file__).resolve().parents[1] / "results" / "few_data"
PROG = "python -m benchmarks.few_data"


# --------------------------------------------------------------------------- data
@dataclass
class Setup:
    """The fixed data of every run: token blocks of each split and the questions."""

    model: str
    tokenizer: Any
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    questions: list[Question]
    plays: dict[str, list[str]]
    eval_batch: int = 8
    context_tokens: int = 32
    base: dict[str, float] = field(default_factory=dict)

    def loss(self, model: Any, split: str) -> float:
        """The model's mean loss on ``split`` (``"val"`` or ``"test"``)."""
        return heldout_loss(model, getattr(self, split), self.eval_batch)


def prepare(args: argparse.Namespace) -> Setup:
    docs = load_documents(args.data)
    train_i, val_i, test_i = split_plays([d.name for d in docs], 0.1, args.val_plays)
    tokenizer = load_tokenizer(args.model)

    def texts(idx: list[int]) -> list[str]:
        return [docs[i].text for i in idx]

    data_gen = torch.Generator().manual_seed(args.data_seed)
    train = pick_blocks(token_stream(tokenizer, texts(train_i)), args.seq_len, args.train_blocks,
                        data_gen)
    val = pick_blocks(token_stream(tokenizer, texts(val_i)), args.seq_len, args.eval_blocks)
    test = pick_blocks(token_stream(tokenizer, texts(test_i)), args.seq_len, args.eval_blocks)
    questions = next_line_questions(texts(test_i), args.questions_per_play,
                                    seed=args.data_seed)
    plays = {"train": [docs[i].name for i in train_i], "val": [docs[i].name for i in val_i],
             "test": [docs[i].name for i in test_i]}
    return Setup(args.model, tokenizer, train, val, test, questions, plays,
                 eval_batch=args.eval_batch, context_tokens=args.context_tokens)


# --------------------------------------------------------------------------- runs
def _answers(setup: Setup) -> list[int]:
    return [q.answer for q in setup.questions]


def _accuracy(model: Any, setup: Setup) -> float:
    losses = choice_losses(model, setup.tokenizer, setup.questions,
                           context_tokens=setup.context_tokens)
    return accuracy(losses, _answers(setup))


def base_scores(setup: Setup) -> dict[str, float]:
    """Losses and accuracy of the untrained model (= every method at epoch 0: LoRA starts
    with B = 0 and full fine-tuning from the same weights), computed once."""
    if not setup.base:
        model = load_model(setup.model)
        setup.base = {"val": setup.loss(model, "val"), "test": setup.loss(model, "test"),
                      "accuracy": _accuracy(model, setup)}
        del model
    return setup.base


def run_one(spec: MethodSpec, lr: float, seed: int, setup: Setup, *, epochs: int,
            batch_size: int, rank: int, progress: bool = False) -> dict[str, Any]:
    """Train ``spec`` at ``lr`` for ``epochs`` epochs; losses every epoch, accuracy at the end."""
    base = base_scores(setup)
    model = pretrained(setup.model, spec.peft, rank=rank, seed=seed)
    optimizer = build_optimizer(spec.optimizer, model, lr=lr, seed=seed,
                                ist_kwargs=spec.ist_kwargs)
    per_epoch = setup.train.shape[0] // batch_size
    epochs_log: list[dict[str, float]] = [
        {"epoch": 0, "step": 0, "val": base["val"], "test": base["test"]}]

    def on_step(step: int, _loss: float) -> None:
        if step % per_epoch == 0:
            epochs_log.append({"epoch": step // per_epoch, "step": step,
                               "val": setup.loss(model, "val"),
                               "test": setup.loss(model, "test")})

    seq_len = setup.train.shape[1]
    batches = block_batches(setup.train.flatten(), seq_len, batch_size,
                            generator=torch.Generator().manual_seed(seed))
    started = time.process_time()
    result = train_loop(model, optimizer, batches, epochs * per_epoch, on_step=on_step,
                   progress=progress, desc=f"{spec.name} lr {lr:g} seed {seed}")
    final_accuracy = _accuracy(model, setup)
    losses = result.train_losses
    for entry in epochs_log[1:]:
        done = int(entry["step"])
        entry["train"] = statistics.fmean(losses[done - per_epoch:done])
    return {
        "method": spec.name, "peft": spec.peft, "optimizer": spec.optimizer,
        "ist_kwargs": spec.ist_kwargs, "lr": lr, "seed": seed, "epochs": epochs,
        "steps": len(losses), "batch_size": batch_size, "seq_len": seq_len,
        "train_blocks": setup.train.shape[0], "rank": rank, "model": setup.model,
        "per_epoch": epochs_log, "accuracy": final_accuracy,
        "accuracy_before": base["accuracy"], "questions": len(setup.questions),
        "train_cpu_seconds": result.train_cpu_seconds,
        "cpu_seconds_per_step": result.train_cpu_seconds / max(1, len(losses)),
        "run_cpu_seconds": time.process_time() - started,
    }


def sweep_points(runs: list[dict[str, Any]], sweep_seed: int
                 ) -> list[tuple[str, float, float]]:
    """``(method, rate, validation loss at the last epoch)`` of the runs on the sweep seed."""
    return [(r["method"], r["lr"], r["per_epoch"][-1]["val"]) for r in runs
            if r["seed"] == sweep_seed]


def choose_lrs(runs: list[dict[str, Any]], sweep_seed: int) -> dict[str, float]:
    """Per method, the swept rate with the lowest final-epoch validation loss.

    Example:
        >>> runs = [{"method": "m", "seed": 0, "lr": lr, "per_epoch": [{"val": v}]}
        ...         for lr, v in ((1e-3, 4.0), (3e-3, 3.5))]
        >>> choose_lrs(runs, 0)
        {'m': 0.003}
    """
    return chosen_rates(sweep_points(runs, sweep_seed))


def plan(methods: list[str], grids: dict[str, tuple[float, ...]], seeds: list[int],
         sweep_seed: int, done: list[dict[str, Any]],
         same_lr: dict[str, str] | None = None) -> list[tuple[str, float, int]]:
    """The runs still to do, as (method, rate, seed)
    (:func:`benchmarks.benchkit.sweep.next_runs`): every grid rate on the sweep seed, then
    (once those are done) the chosen rate on every seed, method by method in the given
    order; the sweep seed's run at the chosen rate is reused (the runs are deterministic).
    A method with one rate, or in ``same_lr`` (it runs at the rate chosen for the method it
    names), has no sweep.

    Example:
        >>> plan(["a"], {"a": (1.0, 2.0)}, [0, 1], 0, [])
        [('a', 1.0, 0), ('a', 2.0, 0)]
    """
    finished = {(r["method"], r["lr"], r["seed"]) for r in done}
    return [(m, lr, seed) for _phase, m, lr, seed in
            next_runs(methods, grids, seeds, sweep_points(done, sweep_seed), finished,
                      sweep_seed=sweep_seed, same_rate=same_lr)]


# --------------------------------------------------------------------------- report
def best(run: dict[str, Any], split: str = "test") -> tuple[float, int]:
    """(lowest ``split`` loss over the epochs after 0, its epoch)."""
    points = [(e[split], e["epoch"]) for e in run["per_epoch"][1:]]
    return min(points)


def paired(runs: list[dict[str, Any]], baseline: str,
           value: Any) -> dict[str, dict[int, float]]:
    """``value(run) - value(baseline's run of the same seed)`` per method and seed.

    Example:
        >>> runs = [{"method": "a", "seed": 0, "x": 1.0}, {"method": "b", "seed": 0, "x": 1.5}]
        >>> paired(runs, "a", lambda r: r["x"])
        {'b': {0: 0.5}}
    """
    ref = {r["seed"]: value(r) for r in runs if r["method"] == baseline}
    out: dict[str, dict[int, float]] = {}
    for r in runs:
        if r["method"] != baseline and r["seed"] in ref:
            out.setdefault(r["method"], {})[r["seed"]] = value(r) - ref[r["seed"]]
    return out


def final_runs(runs: list[dict[str, Any]], sweep_seed: int) -> list[dict[str, Any]]:
    """The runs at each method's chosen rate (all seeds)."""
    return at_chosen_rates(runs, choose_lrs(runs, sweep_seed))


def report(runs: list[dict[str, Any]], sweep_seed: int = 0, baseline: str = "lora") -> str:
    """Markdown: the rate sweep, the results at the chosen rates, paired differences vs
    ``baseline`` seed by seed, and the mean test-loss curve."""
    chosen = choose_lrs(runs, sweep_seed)
    swept = [r for r in runs if r["seed"] == sweep_seed]
    rates = {m: sum(r["method"] == m for r in swept) for m in chosen}
    sweep_rows = []
    for r in swept:
        bv, be = best(r, "val")
        mark = ("yes" if rates[r["method"]] > 1 else "only rate") \
            if chosen[r["method"]] == r["lr"] else ""
        sweep_rows.append([r["method"], f"{r['lr']:g}", f"{r['per_epoch'][-1]['val']:.4f}",
                           f"{bv:.4f} ({be})", mark])
    chosen_runs = final_runs(runs, sweep_seed)
    methods = list(dict.fromkeys(r["method"] for r in chosen_runs))
    rows = []
    for m in methods:
        mine = [r for r in chosen_runs if r["method"] == m]
        rows.append([
            m, f"{chosen[m]:g}", ", ".join(str(r["seed"]) for r in mine),
            mean_range([best(r)[0] for r in mine]),
            ", ".join(str(best(r)[1]) for r in mine),
            mean_range([r["per_epoch"][-1]["test"] for r in mine]),
            mean_range([r["per_epoch"][-1]["train"] for r in mine]),
            mean_range([100 * r["accuracy"] for r in mine], 1),
            mean_range([r["cpu_seconds_per_step"] for r in mine], 2),
        ])
    first = chosen_runs[0]
    text = [f"Learning-rate sweep (seed {sweep_seed}; chosen = lowest validation loss at the "
            "last epoch):", "",
            markdown_table(["method", "lr", "val loss, last epoch", "best val loss (epoch)",
                            "chosen"], sweep_rows), "",
            f"At the chosen rates ({first['epochs']} epochs of {first['train_blocks']} blocks "
            f"x {first['seq_len']} tokens, batch {first['batch_size']}; accuracy on "
            f"{first['questions']} next-line questions, 4 choices, untrained "
            f"{100 * first['accuracy_before']:.1f}%):", "",
            markdown_table(["method", "lr", "seeds", "best test loss", "its epoch per seed",
                            "final test loss", "final train loss", "accuracy %",
                            "CPU s/step"], rows), "",
            f"Paired differences vs {baseline} (method minus {baseline}, same seed; negative "
            "loss / positive accuracy = better than " + baseline + "):", ""]
    diff_rows = []
    for label, value, scale in (("best test loss", lambda r: best(r)[0], 1),
                                ("final test loss", lambda r: r["per_epoch"][-1]["test"], 1),
                                ("accuracy (points)", lambda r: r["accuracy"], 100)):
        for m, by_seed in paired(chosen_runs, baseline, value).items():
            fmt = "+.4f" if scale == 1 else "+.1f"
            cells = [format(scale * by_seed[s], fmt) for s in sorted(by_seed)]
            wins = sum(v < 0 for v in by_seed.values()) if scale == 1 else \
                sum(v > 0 for v in by_seed.values())
            diff_rows.append([label, m, ", ".join(cells),
                              format(scale * statistics.fmean(by_seed.values()), fmt),
                              f"{wins}/{len(by_seed)}"])
    text += [markdown_table(["measure", "method", "per seed (" + ", ".join(
        str(s) for s in sorted({r['seed'] for r in chosen_runs})) + ")", "mean",
        "seeds better than " + baseline], diff_rows), ""]
    epochs = range(first["epochs"] + 1)
    curve = [[str(e)] + [f"{statistics.fmean(r['per_epoch'][e]['test'] for r in chosen_runs if r['method'] == m):.4f}"  # noqa: E501
                         for m in methods] for e in epochs]
    text += ["Mean test loss per epoch:", "", markdown_table(["epoch"] + methods, curve), ""]
    return "\n".join(text)


def plot(runs: list[dict[str, Any]], path: Path, sweep_seed: int = 0) -> None:
    """Test and train loss per epoch at the chosen rates: mean (thick), seeds (thin)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen_runs = final_runs(runs, sweep_seed)
    methods = list(dict.fromkeys(r["method"] for r in chosen_runs))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, m in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], methods,
                        strict=False):
        mine = [r for r in chosen_runs if r["method"] == m]
        for ax, split, start in ((axes[0], "test", 0), (axes[1], "train", 1)):
            for r in mine:
                pts = r["per_epoch"][start:]
                ax.plot([p["epoch"] for p in pts], [p[split] for p in pts], color=color,
                        alpha=0.25, linewidth=0.8)
            pts = mine[0]["per_epoch"][start:]
            mean = [statistics.fmean(r["per_epoch"][i][split] for r in mine)
                    for i in range(start, len(mine[0]["per_epoch"]))]
            ax.plot([p["epoch"] for p in pts], mean, color=color, linewidth=2,
                    label=f"{m} (lr {mine[0]['lr']:g})", marker="o", markersize=3)
    axes[0].set_title("held-out test plays: loss per epoch")
    axes[1].set_title("training subset: mean loss over the epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def _grid(text: str) -> tuple[str, tuple[float, ...]]:
    name, sep, rates = text.partition("=")
    try:
        values = tuple(float(v) for v in rates.split(","))
    except ValueError:
        values = ()
    if not sep or not values:
        raise argparse.ArgumentTypeError(f"expected NAME=LR[,LR...], got {text!r}")
    return name, values


def _pair(text: str) -> tuple[str, str]:
    name, sep, other = text.partition("=")
    if not sep or not name or not other:
        raise argparse.ArgumentTypeError(f"expected NAME=OTHER, got {text!r}")
    return name, other


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.few_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--lrs", type=_grid, action="append", default=[],
                   help="NAME=LR[,LR...]: the rate grid of one method (default by peft: "
                        f"{LR_GRID})")
    p.add_argument("--same-lr-as", type=_pair, action="append", default=[],
                   metavar="NAME=OTHER", help="no sweep for NAME: it runs at OTHER's chosen rate")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sweep-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-blocks", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-blocks", type=int, default=16, help="blocks of val and of test")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--val-plays", type=int, default=2)
    p.add_argument("--questions-per-play", type=int, default=12)
    p.add_argument("--context-tokens", type=int, default=24)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--out", type=Path, default=OUT_DIR / "runs.jsonl")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSONL",
                   help="only print the report of these result files (and write --table, "
                   "--plot when given)")
    p.add_argument("--table", type=Path, default=None,
                   help="where the report goes (default: few_data.md beside --out; --report: "
                   "printed only)")
    p.add_argument("--plot", type=Path, default=None)
    add_group_by(p)
    p.add_argument("--progress", action="store_true")
    return p


def protocol_of(run: dict[str, Any]) -> dict[str, Hashable]:
    """The protocol fields of a run (:mod:`benchmarks.benchkit.protocol`): epochs, training
    blocks, sequence length, batch, rank, model and the number of questions.

    Example:
        >>> protocol_of({"epochs": 5, "seq_len": 64, "method": "lora"})
        {'epochs': 5, 'seq_len': 64}
    """
    return {k: run[k] for k in ("epochs", "train_blocks", "seq_len", "batch_size", "rank",
                                "model", "questions") if k in run}


def run_of(run: dict[str, Any]) -> tuple[str, float, int]:
    """A run's name: (method, lr, seed)."""
    return run["method"], run["lr"], run["seed"]


def _write_report(runs: list[dict[str, Any]], args: argparse.Namespace,
                  table: Path | None) -> None:
    """Print the report of ``runs`` (one protocol, or one per ``--group-by`` group), write it
    to ``table`` and the curves to ``--plot`` when given.

    Raises:
        ProtocolMismatch: runs of several protocols, one run twice, or ``--plot`` of
            several groups.
    """
    groups = protocol_groups(runs, protocol_of, args.group_by, run_of)
    if args.plot is not None and len(groups) > 1:
        raise ProtocolMismatch(f"--plot draws one protocol, --group-by made {len(groups)}; "
                               "plot the files of each protocol on their own")
    text = report_groups(groups, lambda rows: report(rows, args.sweep_seed).rstrip("\n"))
    if table is not None:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(text + "\n")
    print(text)
    if args.plot is not None:
        plot(groups[0][1], args.plot, args.sweep_seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        try:
            _write_report(read_rows(args.report), args, args.table)
        except ProtocolMismatch as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        return 0
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or args.sweep_seed not in args.seeds:
        print(f"{PROG}: error: unknown methods {unknown} (known: {list(METHODS)}) or "
              f"--sweep-seed {args.sweep_seed} not in --seeds {args.seeds}", file=sys.stderr)
        return 2
    if args.train_blocks % args.batch_size:
        print(f"{PROG}: error: --train-blocks {args.train_blocks} is not a multiple of "
              f"--batch-size {args.batch_size}; every epoch must see every block",
              file=sys.stderr)
        return 2
    grids = {m: LR_GRID[METHODS[m].peft] for m in args.methods}
    grids.update(dict(args.lrs))
    same_lr = dict(args.same_lr_as)
    bad = {m: o for m, o in same_lr.items() if m not in args.methods or o not in args.methods}
    if bad:
        print(f"{PROG}: error: --same-lr-as {bad}: both names must be in --methods",
              file=sys.stderr)
        return 2
    try:
        setup = prepare(args)
        print(f"{len(setup.questions)} questions; plays: {json.dumps(setup.plays)}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        done = read_rows([args.out])
        count = 0
        started = time.perf_counter()
        while args.max_runs is None or count < args.max_runs:
            todo = plan(args.methods, grids, args.seeds, args.sweep_seed, done, same_lr)
            if not todo:
                break
            name, lr, seed = todo[0]
            run = run_one(METHODS[name], lr, seed, setup, epochs=args.epochs,
                          batch_size=args.batch_size, rank=args.rank, progress=args.progress)
            done.append(run)
            count += 1
            append_row(args.out, run)
            losses = " ".join(f"{e['test']:.3f}" for e in run["per_epoch"])
            print(f"[{time.perf_counter() - started:6.0f} s] {name} lr {lr:g} seed {seed}: "
                  f"test {losses}; acc {run['accuracy']:.3f}; "
                  f"{run['cpu_seconds_per_step']:.2f} CPU s/step, run {run['run_cpu_seconds']:.0f}"
                  " CPU s", flush=True)
    except CLIError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if done and not math.isnan(done[0]["accuracy"]):
        _write_report(done, args, args.table or args.out.parent / "few_data.md")
    return 0

