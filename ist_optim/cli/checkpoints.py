"""Resumable ``ist-finetune`` runs: ``--save-every N`` checkpoints and ``--resume``.

A checkpoint is a folder ``<output-dir>/checkpoints/step-<NNNNNN>/`` holding

* ``trainable.pt``: every parameter the optimizer trains, by name (the adapter, or the
  decoder blocks for ``--peft full``), bit for bit;
* ``optimizer.pt``: ``optimizer.state_dict()`` (for IST with its ``"ist"`` entry: scores,
  private generator, active set, step count, estimator state);
* ``run.pt``: the learning-rate scheduler's state, the data position (batches drawn), the
  global RNG states (torch CPU and CUDA, Python ``random``, NumPy: dropout draws from
  them), the record of the run so far (losses, times, evaluations, the importance
  history) and the flags that must match on resume;
* ``meta.json``: the step and the files, for people.

Every file is loadable with ``torch.load(..., weights_only=True)``.

Writes are atomic: the files go to a hidden ``.partial-*`` folder beside the checkpoints,
each is fsynced, and the folder is renamed to ``step-<NNNNNN>`` (``os.replace``) only when
complete, so a kill at any moment leaves the earlier checkpoints intact; older ones are
removed only after the new one is in place (``--keep-checkpoints``). ``--resume`` loads the
newest complete checkpoint, ignores partial folders, and continues so that the final
adapter is bit-identical to that of an uninterrupted run with the same flags.

Test hook (not for users): with ``IST_FINETUNE_TEST_PAUSE_AT=step:K`` (after training
step ``K`` and its checkpoint, if any) or ``save:K`` (in the middle of writing the
checkpoint of step ``K``: after ``trainable.pt``, before ``optimizer.pt``), the process
creates the file named by ``IST_FINETUNE_TEST_PAUSE_FILE`` and sleeps, so that a test can
kill it with SIGKILL at that exact point (``tests/test_cli_resume.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CLIError
from .train import RunResult

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointOptions",
    "TEST_PAUSE_ENV",
    "TEST_PAUSE_FILE_ENV",
    "capture_rng",
    "checkpoint_options",
    "checkpoint_step",
    "latest_checkpoint",
    "load_checkpoint",
    "pause_point",
    "restore_rng",
    "resume_run",
    "run_fingerprint",
    "save_checkpoint",
    "step_saver",
    "trainable_state",
    "trainable_state_refs",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
FOLDER = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PARTIAL, _STALE = ".partial-", ".stale-"
_FILES = ("trainable.pt", "optimizer.pt", "run.pt")
TEST_PAUSE_ENV = "IST_FINETUNE_TEST_PAUSE_AT"
TEST_PAUSE_FILE_ENV = "IST_FINETUNE_TEST_PAUSE_FILE"
_TEST_PAUSE_SECONDS = 120.0

# Flags that may differ between a run and its resumption: where and how often it saves,
# how it shows progress, and the device (the numbers then differ, but the run goes on).
_FREE_FLAGS = frozenset({"resume", "save_every", "keep_checkpoints", "output_dir",
                         "no_progress", "device", "compare"})


def _normalized(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists), for comparing flags."""
    return json.loads(json.dumps(value, default=str))


def run_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a resumed run must share with the run that wrote the checkpoint.

    Every flag counts except where and how often checkpoints go, ``--no-progress``,
    ``--device``, and ``--steps`` under ``--lr-schedule constant`` (a run can then be
    extended: ``--resume --steps 2000``). Flags added later count automatically.

    Example:
        >>> from ist_optim.cli.parser import parse_args
        >>> sorted(run_fingerprint(parse_args(["--steps", "5"])))[:3]
        ['active_layers', 'alpha', 'badam_switch_every']
        >>> "steps" in run_fingerprint(parse_args(["--lr-schedule", "cosine"]))
        True
    """
    flags = {k: v for k, v in vars(args).items() if k not in _FREE_FLAGS}
    if getattr(args, "lr_schedule", "constant") == "constant":
        flags.pop("steps", None)
    return _normalized(flags)


@dataclass(frozen=True)
class CheckpointOptions:
    """Where a run keeps checkpoints, how often it saves, and whether it resumes.

    Attributes:
        root: the checkpoint folder (``<output-dir>/checkpoints``).
        save_every: steps between checkpoints (0: none).
        resume: continue from the newest checkpoint in ``root``, if any.
        keep: how many checkpoints to keep (the newest ones).
        fingerprint: :func:`run_fingerprint` of the run's flags.
    """

    root: Path
    save_every: int
    resume: bool
    keep: int
    fingerprint: dict[str, Any]


def checkpoint_options(args: argparse.Namespace) -> CheckpointOptions | None:
    """The checkpoint options of the parsed flags, or ``None`` without ``--save-every`` and
    ``--resume``.

    Raises:
        CLIError: with ``--compare`` or ``--optimizer badam``, which cannot resume.
    """
    save_every = int(getattr(args, "save_every", 0) or 0)
    resume = bool(getattr(args, "resume", False))
    if not save_every and not resume:
        return None
    flag = "--resume" if resume else "--save-every"
    if args.compare:
        raise CLIError(f"{flag} cannot be used with --compare; checkpoint the methods as "
                       "separate runs, each with its own --output-dir")
    if args.optimizer == "badam":
        raise CLIError(f"{flag} is not supported with --optimizer badam (its block optimizer "
                       "has no complete state_dict); use --optimizer ist or adamw")
    return CheckpointOptions(Path(args.output_dir) / FOLDER, save_every, resume,
                             int(getattr(args, "keep_checkpoints", 1) or 1),
                             run_fingerprint(args))


# ---------------------------------------------------------------------- RNG states
def capture_rng() -> dict[str, Any]:
    """The global RNG states dropout and other code draw from (torch CPU, every CUDA
    device, Python ``random``, NumPy if installed), in ``weights_only``-loadable types."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                      float(gauss)]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNG states :func:`capture_rng` saved.

    Raises:
        CLIError: when the checkpoint holds the CUDA states of another number of devices.
    """
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise CLIError(f"--resume: the checkpoint holds the RNG states of {len(cuda)} CUDA "
                           f"devices, this machine has {torch.cuda.device_count()}; resume "
                           "with the same devices visible (CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_rng_state_all(cuda)
    saved = state.get("numpy")
    if saved is not None:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, gauss = saved
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# ---------------------------------------------------------------------- saving
def trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every parameter ``optimizer`` trains, by its name in ``model`` (detached, on CPU).

    The optimizer's parameters are the trained ones: IST switches ``requires_grad`` off on
    inactive layers, so ``requires_grad`` does not tell.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
        >>> sorted(trainable_state(model, opt))
        ['1.bias', '1.weight']
    """
    return {name: p.detach().to("cpu", copy=True)
            for name, p in trainable_state_refs(model, optimizer)}


def pause_point(kind: str, step: int) -> None:
    """The test hook described in the module docstring: pause at ``kind:step`` when
    ``IST_FINETUNE_TEST_PAUSE_AT`` names it (a test then kills the process)."""
    if os.environ.get(TEST_PAUSE_ENV) != f"{kind}:{step}":
        return
    marker = os.environ.get(TEST_PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(f"{kind}:{step} {os.getpid()}\n")
    deadline = time.monotonic() + _TEST_PAUSE_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(3)  # nobody killed it: the test failed; never continue as if not paused


def _write(path: Path, obj: Any) -> None:
    with path.open("wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    """Remove a folder without ever leaving a half-deleted ``step-*`` in view: it is
    renamed to a hidden ``.stale-*`` name first."""
    stale = path.with_name(f"{_STALE}{path.name}-{os.getpid()}")
    os.replace(path, stale)
    shutil.rmtree(stale, ignore_errors=True)


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and all((path / f).is_file() for f in _FILES):
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(options: CheckpointOptions, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any,
                    result: RunResult) -> Path:
    """Write the checkpoint of ``step`` atomically; keep the newest ``options.keep``.

    Returns:
        The checkpoint folder.
    """
    root = options.root
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.iterdir():  # folders of writes or removals that were killed
        if leftover.name.startswith((_PARTIAL, _STALE)) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_PARTIAL}{final.name}-", dir=root))
    try:
        _write(tmp / "trainable.pt", trainable_state(model, optimizer))
        pause_point("save", step)
        _write(tmp / "optimizer.pt", optimizer.state_dict())
        _write(tmp / "run.pt", {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "fingerprint": options.fingerprint,
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "data": {"batches_drawn": step},
            "rng": capture_rng(),
            "result": result.to_state(),
        })
        (tmp / "meta.json").write_text(json.dumps(
            {"format": CHECKPOINT_FORMAT, "step": step, "files": list(_FILES),
             "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
        tmp.chmod(0o755)
        _fsync_dir(tmp)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _step, older in _checkpoints(root)[:-options.keep]:
        _discard(older)
    logger.debug("checkpoint of step %d written to %s", step, final)
    return final


# ---------------------------------------------------------------------- loading
def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder in ``root`` (partial writes are ignored).

    Example:
        >>> import tempfile
        >>> latest_checkpoint(Path(tempfile.mkdtemp())) is None
        True
    """
    found = _checkpoints(root)
    return found[-1][1] if found else None


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder, from its name."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise CLIError(f"{path}: not a checkpoint folder (expected step-NNNNNN)")
    return int(match.group(1))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The three parts of a checkpoint: ``{"trainable", "optimizer", "run"}``.

    Raises:
        CLIError: for a file that does not load or a format this version cannot read.
    """
    parts = {}
    for name in _FILES:
        try:
            parts[name[:-3]] = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable file: one line naming it and the fix
            raise CLIError(f"--resume: {path / name} does not load ({type(err).__name__}); "
                           f"delete {path} to resume from an earlier checkpoint") from err
    version = parts["run"].get("format")
    if version != CHECKPOINT_FORMAT:
        raise CLIError(f"--resume: {path} has checkpoint format {version!r}, this version "
                       f"reads format {CHECKPOINT_FORMAT}; resume with the version that wrote "
                       "it")
    return parts


#: What a checkpoint written before ``--paper`` and ``--dense-steps`` existed ran with: the
#: paper's settings were then the only ones (its other flags were stored as resolved values).
_BEFORE_RECIPES = {"paper": True, "dense_steps": None}


def _check_fingerprint(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    if "paper" not in saved:
        saved = {**_BEFORE_RECIPES, **saved}
    differ = sorted((k for k in set(saved) | set(current) if saved.get(k) != current.get(k)),
                    key=lambda k: (k != "paper", k))  # --paper explains the flags it fills
    if differ:
        key = differ[0]
        flag = "--" + key.replace("_", "-")
        raise CLIError(f"--resume: {path} was written with {flag} {saved.get(key)!r}, this run "
                       f"has {current.get(key)!r} ({len(differ)} flag(s) differ: "
                       f"{', '.join(differ)}); pass the flags of the interrupted run, or "
                       "another --output-dir to start afresh")


def _load_trainable(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    saved: dict[str, torch.Tensor]) -> None:
    current = dict(trainable_state_refs(model, optimizer))
    if set(saved) != set(current):
        missing = sorted(set(current) - set(saved))[:3]
        extra = sorted(set(saved) - set(current))[:3]
        raise CLIError(f"--resume: {path} trains other parameters than this run (missing "
                       f"{missing}, unexpected {extra}); pass the flags of the interrupted run")
    for name, param in current.items():
        if saved[name].shape != param.shape or saved[name].dtype != param.dtype:
            raise CLIError(f"--resume: {path} has {name} of shape {tuple(saved[name].shape)} "
                           f"{saved[name].dtype}, this run {tuple(param.shape)} {param.dtype}; "
                           "pass the flags of the interrupted run")
    with torch.no_grad():
        for name, param in current.items():
            param.copy_(saved[name])


def trainable_state_refs(model: nn.Module,
                         optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of :func:`trainable_state` themselves, by name."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return ((n, p) for n, p in model.named_parameters() if id(p) in trained)


def resume_run(options: CheckpointOptions, *, model: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any,
               skip_batches: Callable[[int], None]) -> tuple[int, RunResult] | None:
    """Load the newest checkpoint into the run, if ``options.resume`` and one exists.

    Validates the flags and every part before changing anything; then loads the trained
    parameters, the optimizer and the scheduler, skips the batches already drawn, and sets
    the global RNG states last (nothing may draw from them between this and the next step).

    Returns:
        ``(steps done, record so far)`` for :func:`ist_optim.cli.train.train`, or ``None``
        when there is nothing to resume (the run starts from step 0).
    """
    if not options.resume:
        return None
    path = latest_checkpoint(options.root)
    if path is None:
        logger.info("--resume: no checkpoint in %s yet, starting from step 0", options.root)
        return None
    parts = load_checkpoint(path)
    run = parts["run"]
    _check_fingerprint(path, run["fingerprint"], options.fingerprint)
    if (run["scheduler"] is None) != (scheduler is None):
        raise CLIError(f"--resume: {path} and this run differ in having a learning-rate "
                       "schedule; pass the flags of the interrupted run")
    _load_trainable(path, model, optimizer, parts["trainable"])
    try:
        optimizer.load_state_dict(parts["optimizer"])
    except (ValueError, KeyError) as err:
        raise CLIError(f"--resume: {path / 'optimizer.pt'} does not fit this run "
                       f"({' '.join(str(err).split())})") from err
    if scheduler is not None:
        scheduler.load_state_dict(run["scheduler"])
    done = int(run["step"])
    skip_batches(int(run["data"]["batches_drawn"]))
    result = RunResult.from_state(run["result"])
    restore_rng(run["rng"])
    print(f"resuming from {path} (step {done})", flush=True)
    return done, result


def step_saver(options: CheckpointOptions, *, model: nn.Module,
               optimizer: torch.optim.Optimizer,
               scheduler: Any) -> Callable[[int, RunResult], None]:
    """The ``after_step`` callback of :func:`ist_optim.cli.train.train`: a checkpoint every
    ``options.save_every`` steps (none when 0), then the ``step:K`` test pause point."""

    def after_step(step: int, result: RunResult) -> None:
        if options.save_every and step % options.save_every == 0:
            save_checkpoint(options, step, model=model, optimizer=optimizer,
                            scheduler=scheduler, result=result)
        pause_point("step", step)

    return after_step
