"""``ISTCallback``: IST inside ``transformers.Trainer`` (logging, importance batches, plot).

Imports ``transformers``; reach it through ``ist_optim.integrations`` (lazy).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ..optimizer import ISTOptimizer
from ..reporting.history import ImportanceHistory
from .common import DEEPSPEED_REFUSAL, unwrap_ist_optimizer

__all__ = ["ISTCallback", "add_ist_callback"]

logger = logging.getLogger(__name__)

_SOURCES = ("eval", "train")


class ISTCallback(TrainerCallback):
    """Reports what IST does through the Trainer's logs, and wires it to the Trainer's data.

    At every training log (``logging_steps``) it adds to the ``logs`` dict, which reaches
    TensorBoard, W&B and ``trainer.state.log_history``:

    * ``ist/num_active``: layers trained in the coming step (``opt.num_trained``: the
      ``active_layers`` count, or what ``dense_steps``/``ramp_steps``/``active_schedule``
      ask for at this step);
    * ``ist/active_layer_<i>``: fraction of the optimizer steps since the previous log in
      which layer ``i`` trained (1.0 / 0.0 with ``logging_steps=1``);
    * ``ist/importance_layer_<i>``: layer ``i``'s importance (higher = more important);
    * ``ist/state_bytes``, ``ist/state_bytes_offloaded``: bytes of the inner optimizer's
      state on the parameters' devices, and in host memory (``state_policy="offload"``),
      from :meth:`ist_optim.ISTOptimizer.memory_report`;
    * with ``skip_nonfinite=True``: ``ist/skipped_steps``, steps skipped so far for a
      non-finite gradient;
    * with the optimizer's ``memory_budget``: ``ist/predicted_peak_bytes`` and
      ``ist/checkpointed_blocks`` (how many) of the coming step; the indices are logged at
      INFO level.

    With ``memory_budget``, the Trainer's own ``gradient_checkpointing=True`` (which turns
    every layer on after the optimizer was built) is replaced at ``on_train_begin`` by the
    budget's per-step choice, with a warning.

    Reporting callbacks (TensorBoard, W&B) run before callbacks passed in
    ``Trainer(callbacks=[...])``, so they would log before these keys are added: attach the
    callback with :func:`add_ist_callback`, which puts it first.

    Args:
        importance_batches: batches for the importance rounds (a list or a DataLoader),
            given to the optimizer at ``on_train_begin`` (resumed runs continue the cycle
            where the checkpointed run was). ``None`` keeps the optimizer's own source.
            ``"eval"`` / ``"train"`` need the Trainer: use :func:`add_ist_callback`.
        log_layers: add the per-layer keys (``False``: only the scalar ones).
        plot_path: write :func:`ist_optim.plot_importance` of the run there at
            ``on_train_end`` (needs matplotlib), on the main process.
        max_history: keep only the newest ``max_history`` records in ``history`` (and so
            in the plot). ``None`` (the default) keeps every step: the history then grows
            by one record per optimizer step, about 0.4 KB at 4 layers and 1.2 KB at 30
            (one list of per-layer importance floats, one of the trained indices, the
            step; measured in ``tests/test_soak.py``), e.g. 120 MB over 100,000 steps of a
            30-layer model. The ``ist/*`` log entries do not depend on it.

    Attributes:
        history: the :class:`ist_optim.ImportanceHistory` of this ``train()`` call (a
            resumed run records from where it resumed), at most ``max_history`` records.

    Example:
        >>> import torch
        >>> from ist_optim import ISTOptimizer
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        >>> opt = ISTOptimizer(torch.optim.SGD, torch.nn.Sequential(*blocks), lr=0.1,
        ...                    layers=list(blocks), active_layers=1, seed=0)
        >>> sorted(ISTCallback(log_layers=False).log_entries(opt).items())
        [('ist/num_active', 1.0), ('ist/state_bytes', 0.0), ('ist/state_bytes_offloaded', 0.0)]
    """

    def __init__(
        self,
        *,
        importance_batches: Iterable[Any] | None = None,
        log_layers: bool = True,
        plot_path: str | Path | None = None,
        max_history: int | None = None,
    ) -> None:
        if max_history is not None and (isinstance(max_history, bool)
                                        or not isinstance(max_history, int) or max_history < 1):
            raise ValueError(f"Invalid max_history: {max_history!r}; expected an int >= 1 "
                             "(records kept), or None to keep every step")
        if isinstance(importance_batches, str):
            raise ValueError(
                f"importance_batches={importance_batches!r} needs the Trainer to build the "
                f"loader: use add_ist_callback(trainer, importance_batches={importance_batches!r})"
            )
        if not isinstance(log_layers, bool):
            raise TypeError(f"log_layers must be a bool, got {log_layers!r}")
        self.importance_batches = importance_batches
        self.log_layers = log_layers
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.max_history = max_history
        self.history: ImportanceHistory | None = None
        self._configured: ISTOptimizer | None = None
        self._trained: list[int] = []
        self._counts: torch.Tensor | None = None
        self._steps_since_log = 0

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = self._optimizer(kwargs)
        check_no_deepspeed(args)
        check_no_trainer_compile(args, opt)
        if self.importance_batches is not None and self._configured is not opt:
            seen = opt.num_steps // opt.update_interval
            opt.set_importance_batches(self.importance_batches, batches_seen=seen)
            logger.info("IST importance rounds use %s (resumed after %d batches)",
                        type(self.importance_batches).__name__, seen)
        self._configured = opt
        budget = opt.budget_policy
        trainer_gc = bool(getattr(args, "activation_checkpointing", False)
                          or getattr(args, "gradient_checkpointing", False))
        # take_back() first: it re-applies the budget's choice if the Trainer's switch (or a
        # load_state_dict by accelerate) left the blocks otherwise
        if budget is not None and (budget.take_back() or trainer_gc):
            logger.warning(
                "IST: the Trainer's gradient checkpointing (gradient_checkpointing=True) is "
                "replaced by the optimizer's memory_budget, which checkpoints per step only the "
                "blocks that step needs to fit; set gradient_checkpointing=False to silence this")
        if self.history is None or self.history.num_layers != opt.num_layers:
            self.history = ImportanceHistory(num_layers=opt.num_layers)
        self._counts = torch.zeros(opt.num_layers, dtype=torch.long)
        self._steps_since_log = 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trained = self._optimizer(kwargs).active_layers

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt = self._optimizer(kwargs)
        assert self.history is not None and self._counts is not None
        if self.history.steps and self.history.steps[-1] == opt.num_steps:
            return  # the step was skipped (AMP overflow): nothing trained
        self.history.record(opt, self._trained)
        excess = len(self.history.steps) - (self.max_history or len(self.history.steps))
        if excess > 0:
            for records in (self.history.steps, self.history.importance, self.history.trained):
                del records[:excess]
        self._counts[self._trained] += 1
        self._steps_since_log += 1

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:
            return  # evaluation metrics and the end-of-training summary
        opt = self._optimizer(kwargs)
        entries = self.log_entries(opt)
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and all(last.get(k) == v for k, v in logs.items()):
            last.update(entries)  # the Trainer stored a copy of logs before on_log
        logs.update(entries)
        logger.info("IST step %d: trained %s, importance %s", opt.num_steps, self._trained,
                    [round(v, 4) for v in opt.importance.tolist()])
        if opt.budget_policy is not None:
            memory = opt.memory_report()
            logger.info("IST next step: layers %s, checkpointed blocks %s, predicted peak %d "
                        "bytes (budget %d)", memory["active_layers"],
                        memory["checkpointed_layers"], memory["predicted_peak_bytes"],
                        memory["memory_budget"])
        if self._counts is not None:
            self._counts.zero_()
        self._steps_since_log = 0

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.plot_path is None or not state.is_world_process_zero:
            return
        if self.history is None or not self.history.steps:
            logger.warning("ISTCallback: no optimizer step was recorded, no plot written")
            return
        from ..reporting.plotting import plot_importance

        self.plot_path.parent.mkdir(parents=True, exist_ok=True)
        figure = plot_importance(self.history, self.plot_path)
        import matplotlib.pyplot as plt

        plt.close(figure)
        logger.info("IST importance plot written to %s", self.plot_path)

    # ------------------------------------------------------------------ helpers
    def log_entries(self, opt: ISTOptimizer) -> dict[str, float]:
        """The ``ist/...`` entries that :meth:`on_log` adds."""
        memory = opt.memory_report()
        entries: dict[str, float] = {
            "ist/num_active": float(opt.num_trained),
            "ist/state_bytes": float(memory["state_bytes_on_device"]),
            "ist/state_bytes_offloaded": float(memory["state_bytes_offloaded"]),
        }
        if opt.config.skip_nonfinite:
            entries["ist/skipped_steps"] = float(opt.skipped_steps)
        if memory["memory_budget"] is not None:  # the coming step's decision
            entries["ist/predicted_peak_bytes"] = float(memory["predicted_peak_bytes"])
            entries["ist/checkpointed_blocks"] = float(len(memory["checkpointed_layers"]))
        if not self.log_layers:
            return entries
        steps = max(self._steps_since_log, 1)
        counts = self._counts if self._counts is not None else torch.zeros(opt.num_layers)
        for i, value in enumerate(opt.importance.tolist()):
            entries[f"ist/importance_layer_{i}"] = value
        for i, count in enumerate(counts.tolist()):
            entries[f"ist/active_layer_{i}"] = count / steps
        return entries

    @staticmethod
    def _optimizer(kwargs: dict[str, Any]) -> ISTOptimizer:
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError("the Trainer passed no optimizer to ISTCallback")
        try:
            return unwrap_ist_optimizer(optimizer)
        except TypeError as err:
            raise TypeError(
                f"ISTCallback needs the Trainer to train with an ISTOptimizer ({err}); pass "
                "optimizers=(ISTOptimizer(...), None) or optimizer_cls_and_kwargs="
                "(ist_optimizer_cls(model, torch.optim.AdamW, ...), {'lr': ...})"
            ) from None


def check_no_deepspeed(args: Any) -> None:
    """Refuse a Trainer set up for DeepSpeed (``TrainingArguments(deepspeed=...)``).

    Raises:
        ValueError: :data:`ist_optim.integrations.common.DEEPSPEED_REFUSAL`, the one line
            every route gives.
    """
    config = getattr(args, "deepspeed", None)
    if config:
        raise ValueError(f"deepspeed={config!r}: {DEEPSPEED_REFUSAL}")


def check_no_trainer_compile(args: Any, opt: ISTOptimizer) -> None:
    """Refuse ``TrainingArguments(torch_compile=True)`` when IST freezes layers.

    The Trainer (through accelerate) compiles the whole model; every IST step freezes other
    layers, so each new active set recompiles the whole graph until dynamo falls back to
    eager. :func:`ist_optim.compile_blocks` is the supported route.

    Raises:
        ValueError: naming the fix, when ``args.torch_compile`` and ``opt.config.freeze_inactive``.
    """
    if getattr(args, "torch_compile", False) and opt.config.freeze_inactive:
        raise ValueError(
            "TrainingArguments(torch_compile=True) compiles the whole model, and every IST "
            "step freezes other layers, so each active set would recompile it until dynamo "
            "falls back to eager; set torch_compile=False and call "
            "ist_optim.compile_blocks(optimizer) before trainer.train() (it compiles each "
            "block once, shared by all blocks)"
        )


def _shuffled_train_set(trainer: Any) -> Any:
    """The training set in a fixed random order (private generator seeded by args.seed)."""
    dataset = trainer.train_dataset
    if dataset is None:
        raise ValueError("importance_batches='train' but the Trainer has no train_dataset")
    try:
        size = len(dataset)
    except TypeError:
        raise ValueError(
            "importance_batches='train' needs a dataset with a length (not an "
            "IterableDataset); pass importance_batches=<list of batches> instead"
        ) from None
    generator = torch.Generator().manual_seed(int(trainer.args.seed))
    order = torch.randperm(size, generator=generator).tolist()
    if hasattr(dataset, "select"):  # datasets.Dataset keeps its columns for the Trainer
        return dataset.select(order)
    return torch.utils.data.Subset(dataset, order)


def add_ist_callback(
    trainer: Any,
    *,
    importance_batches: str | Iterable[Any] | None = None,
    log_layers: bool = True,
    plot_path: str | Path | None = None,
    max_history: int | None = None,
) -> ISTCallback:
    """Build an :class:`ISTCallback` and insert it first among ``trainer``'s callbacks, so
    the IST keys reach the reporting callbacks (TensorBoard, W&B) of the same log.

    Args:
        trainer: a ``transformers.Trainer`` whose optimizer is (or will be) an
            ``ISTOptimizer``.
        importance_batches: ``"eval"``: the Trainer's eval dataloader (eval batch size,
            its collator); ``"train"``: the training set in a fixed shuffled order (seeded
            by ``args.seed``, no global RNG), batched like the eval loader; a list or
            DataLoader of batches; ``None``: the optimizer's own source (by default, the
            latest training batch).
        log_layers, plot_path, max_history: as in :class:`ISTCallback`.

    Returns:
        The callback (its ``history`` fills during training).

    Raises:
        ValueError: for an unknown source name, a missing dataset, a second ISTCallback,
            ``torch_compile=True`` in the Trainer's arguments (use
            :func:`ist_optim.compile_blocks`), or DeepSpeed (:func:`check_no_deepspeed`).

    Example:
        >>> import contextlib, io, tempfile, torch
        >>> from transformers import Trainer, TrainingArguments
        >>> from ist_optim import ISTOptimizer
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        ...     def forward(self, x, labels):
        ...         for block in self.blocks:
        ...             x = x + block(x)
        ...         return {"loss": (x - labels).pow(2).mean()}
        >>> model = Net()
        >>> data = [{"x": torch.ones(2), "labels": torch.zeros(2)}] * 8
        >>> opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, active_layers=1,
        ...                    update_interval=2, seed=0)
        >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=4, logging_steps=2,
        ...                          use_cpu=True, report_to=[], disable_tqdm=True,
        ...                          save_strategy="no")
        >>> trainer = Trainer(model=model, args=args, train_dataset=data,
        ...                   optimizers=(opt, None))
        >>> callback = add_ist_callback(trainer, importance_batches=data[:2])
        >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its logs
        ...     _ = trainer.train()
        >>> float(trainer.state.log_history[0]["ist/num_active"])
        1.0
        >>> callback.history.steps, opt.num_steps
        ([1, 2, 3, 4], 4)
        >>> [k for k in trainer.state.log_history[0] if k.startswith("ist/importance")][-1]
        'ist/importance_layer_3'
    """
    if any(isinstance(cb, ISTCallback) for cb in trainer.callback_handler.callbacks):
        raise ValueError("trainer already has an ISTCallback; add one only")
    check_no_deepspeed(trainer.args)
    if getattr(trainer.args, "torch_compile", False) and trainer.optimizer is not None:
        check_no_trainer_compile(trainer.args, unwrap_ist_optimizer(trainer.optimizer))
    batches: Iterable[Any] | None
    if isinstance(importance_batches, str):
        if importance_batches not in _SOURCES:
            raise ValueError(
                f"Invalid importance_batches: {importance_batches!r}; expected one of "
                f"{_SOURCES}, a list or DataLoader of batches, or None"
            )
        if importance_batches == "eval":
            if trainer.eval_dataset is None:
                raise ValueError(
                    "importance_batches='eval' but the Trainer has no eval_dataset; pass "
                    "eval_dataset= or use importance_batches='train'"
                )
            if isinstance(trainer.eval_dataset, dict):
                raise ValueError(
                    f"the Trainer has several eval datasets ({sorted(trainer.eval_dataset)}); "
                    "pick one: importance_batches=trainer.get_eval_dataloader('<name>')"
                )
            batches = trainer.get_eval_dataloader()
        else:
            # The test loader: eval batching and collation, and not cached under "eval".
            batches = trainer.get_test_dataloader(_shuffled_train_set(trainer))
    else:
        batches = importance_batches
    callback = ISTCallback(importance_batches=batches, log_layers=log_layers,
                           plot_path=plot_path, max_history=max_history)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
