"""Rank consistency of IST under ``torch.distributed`` (DDP, FSDP2): small, stateless helpers.

Every rank must train the same layers at every step and hold the same scores. IST gets that
without a communication layer of its own, from three torch collectives:

* the sampler's seed is agreed once, at construction (:func:`agree_on_seed`): a user seed
  must be the same on every rank; without one, rank 0's entropy seed is used everywhere.
  From then on every rank draws the same active sets and candidate sets from identical
  private generators;
* the suppressed losses of an importance round are averaged over the ranks
  (:func:`average_across_ranks`, one ``all_reduce``) before the score update, so scores
  stay identical (and each rank's batch counts);
* :func:`check_ranks_agree` compares the IST state of every rank, for tests and debugging.

Opt-in: :func:`skip_inactive_buckets` registers a DDP communication hook that skips the
all-reduce of gradient buckets holding only inactive layers (DDP otherwise all-reduces
every bucket every step, IST or not).

Wrappers: :func:`check_wrapping` rejects set-ups that cannot work (DDP that cannot see
per-step changes of ``requires_grad``, FSDP1 flat parameters); :func:`is_sharded` tells
:func:`ist_optim.memory.residency.resolve_state_policy` about FSDP2's DTensors.
Checkpointing through ``torch.distributed.checkpoint`` is in
:mod:`ist_optim.distributed.checkpoint`. See docs/distributed.md.

Every function is a no-op (or local) when ``group`` is ``None``, i.e. when
``torch.distributed`` is not initialized.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup


class _LayerGroupsLike(Protocol):
    params: Sequence[Sequence[torch.Tensor]]

    def layer_of(self) -> dict[int, int]: ...


class ISTOptimizerLike(Protocol):
    """What these helpers read of an ``ISTOptimizer`` (public attributes only)."""

    @property
    def process_group(self) -> Any: ...

    @property
    def layer_groups(self) -> _LayerGroupsLike: ...

    @property
    def active_layers(self) -> list[int]: ...

    @property
    def num_layers(self) -> int: ...

    def fingerprint(self) -> dict[str, Any]: ...

__all__ = [
    "agree_on_seed",
    "average_across_ranks",
    "check_not_initialized_late",
    "finite_on_every_rank",
    "check_ranks_agree",
    "check_wrapping",
    "ddp_class",
    "is_initialized",
    "is_sharded",
    "resolve_group",
    "skip_inactive_buckets",
]


def is_initialized() -> bool:
    """Whether ``torch.distributed`` is available and has a default process group.

    Example:
        >>> is_initialized()
        False
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: ProcessGroup | None) -> ProcessGroup | None:
    """The group whose ranks must agree: ``process_group``, else the default (world) group.

    Args:
        process_group: ``None`` for the default group (every rank of the job: right for
            DDP, FSDP2, HSDP and tensor parallelism, where all ranks train one model), or
            a subgroup when independent trainings share one job.

    Returns:
        The group, or ``None`` when ``torch.distributed`` is not initialized (single process).

    Raises:
        ValueError: when a group is passed but ``torch.distributed`` is not initialized.

    Example:
        >>> resolve_group(None) is None
        True
    """
    if not is_initialized():
        if process_group is not None:
            raise ValueError(
                f"process_group={process_group!r} was passed but torch.distributed is not "
                "initialized; call torch.distributed.init_process_group first, or drop it"
            )
        return None
    import torch.distributed as dist

    return dist.group.WORLD if process_group is None else process_group


def check_not_initialized_late() -> None:
    """Raise when ``torch.distributed`` with several ranks came up after the optimizer.

    An optimizer built before ``init_process_group`` seeded its sampler per rank and froze
    per-rank layers, and a DDP wrapper built since then registered only those layers, so
    the ranks would silently diverge. Called by ``ISTOptimizer.step`` while it has no group.

    Raises:
        RuntimeError: naming the fix (build the optimizer after ``init_process_group``).

    Example:
        >>> check_not_initialized_late()  # single process: nothing to check
    """
    if not is_initialized():
        return
    import torch.distributed as dist

    if dist.get_world_size() > 1:
        raise RuntimeError(
            "torch.distributed was initialized after this ISTOptimizer was built, so each "
            "rank sampled its own layers (and a DDP wrapper built since then only "
            "synchronizes the layers active at that time). Build the ISTOptimizer after "
            "torch.distributed.init_process_group; with the HF Trainer, after creating "
            "TrainingArguments (which initializes it)."
        )


def _fresh_seed() -> int:
    """A seed from OS entropy, drawn by a private generator (never the global RNG)."""
    return int(torch.Generator().seed())


def agree_on_seed(seed: int | None, group: ProcessGroup | None) -> int:
    """The sampler seed every rank uses.

    Args:
        seed: this rank's ``seed=`` argument.
        group: from :func:`resolve_group`; ``None`` means a single process.

    Returns:
        ``seed`` when given (checked equal on every rank); otherwise a fresh entropy seed,
        rank 0's (the group's first rank) on every rank.

    Raises:
        ValueError: on every rank, when the ranks passed different seeds, or some passed a
            seed and others ``None``; it lists each rank's value.

    Example:
        >>> agree_on_seed(7, None)
        7
        >>> isinstance(agree_on_seed(None, None), int)
        True
    """
    if group is None:
        return _fresh_seed() if seed is None else seed
    import torch.distributed as dist

    mine = (seed, _fresh_seed() if seed is None else seed)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    given = [g[0] for g in gathered]
    if all(s is None for s in given):
        return int(gathered[0][1])
    if any(s != given[0] for s in given):
        raise ValueError(
            f"ISTOptimizer seed differs across ranks (rank: seed) "
            f"{dict(enumerate(given))}; every rank must sample the same layers, so pass the "
            "same seed= on every rank, or seed=None on every rank to use rank 0's"
        )
    return int(given[0])


def _collective_device(group: ProcessGroup) -> torch.device:
    """CPU for gloo (and mixed ``cpu:gloo,...`` groups), else the current accelerator."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.current_accelerator() is not None:
        kind = accelerator.current_accelerator().type
        return torch.device(kind, accelerator.current_device_index())
    return torch.device("cuda", torch.cuda.current_device())


def average_across_ranks(values: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Mean of ``values`` over the ranks of ``group`` (one ``all_reduce``), as float64 on CPU.

    A non-finite value on any rank makes the mean non-finite on every rank, so every rank
    skips the same importance rounds.

    Example:
        >>> average_across_ranks(torch.tensor([1.0, 2.0]), None)
        tensor([1., 2.], dtype=torch.float64)
    """
    values = values.detach().to(torch.float64)
    if group is None:
        return values.cpu()
    import torch.distributed as dist

    buffer = values.to(_collective_device(group)).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return (buffer / dist.get_world_size(group)).cpu()


def finite_on_every_rank(tensors: Sequence[torch.Tensor], group: ProcessGroup | None) -> bool:
    """Whether every element of ``tensors`` is finite on every rank of ``group``.

    One device sync per device holding tensors, and one ``all_reduce`` that every rank
    makes, always, so ranks that see different gradients still decide together.

    Example:
        >>> finite_on_every_rank([torch.ones(2), torch.tensor([1.0, float("inf")])], None)
        False
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
    bad = float(sum(not bool(torch.stack(flags).all()) for flags in by_device.values()))
    return float(average_across_ranks(torch.tensor([bad]), group)[0]) == 0.0


def check_ranks_agree(opt: ISTOptimizerLike) -> dict[str, Any]:
    """Check that every rank holds the same IST state (a collective: call it on every rank).

    Compares step count, active set, scores (bit-exact), generator state and seed.

    Returns:
        This rank's fingerprint of the state.

    Raises:
        RuntimeError: on every rank when they differ, naming the fields and values.
    """
    mine = opt.fingerprint()
    group = opt.process_group
    if group is None:
        return mine
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    differ = [key for key in mine if any(g[key] != gathered[0][key] for g in gathered)]
    if differ:
        values = {key: [g[key] for g in gathered] for key in differ}
        raise RuntimeError(f"IST state differs across ranks in {differ}: {values}")
    return mine


def ddp_class() -> type | None:
    """``torch.nn.parallel.DistributedDataParallel``, or ``None`` without distributed."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DistributedDataParallel


def _fsdp1_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return None
    return FullyShardedDataParallel


def check_wrapping(model: nn.Module, freeze_inactive: bool) -> None:
    """Reject wrappers IST cannot train correctly, before the first step.

    * FSDP1 (``FullyShardedDataParallel``) flattens a unit's parameters into one flat
      parameter, which has one ``requires_grad`` and one gradient: per-layer sampling
      cannot be expressed. FSDP2 (``fully_shard``) shards per parameter and works.
    * A ``DistributedDataParallel`` model with ``freeze_inactive=True`` needs
      ``find_unused_parameters=True`` and no ``static_graph``: frozen layers produce no
      gradient, which DDP otherwise waits for ("Expected to have finished reduction in
      the prior iteration").

    Raises:
        ValueError: naming the wrapper, the setting and the two ways out.

    Example:
        >>> check_wrapping(torch.nn.Linear(2, 2), freeze_inactive=True)
    """
    fsdp1 = _fsdp1_class()
    if fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ValueError(
            "the model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters "
            "share one requires_grad and one gradient per wrapped unit, so IST cannot train "
            "a subset of layers; shard it with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard on each block, then on the model)"
        )
    ddp = ddp_class()
    if ddp is None or not isinstance(model, ddp) or not freeze_inactive:
        return
    if getattr(model, "static_graph", False):
        raise ValueError(
            "the model is wrapped in DistributedDataParallel with static_graph=True, but "
            "freeze_inactive=True changes which parameters get gradients every step; wrap "
            "it with static_graph=False, find_unused_parameters=True, or pass "
            "freeze_inactive=False"
        )
    if not getattr(model, "find_unused_parameters", False):
        raise ValueError(
            "the model is wrapped in DistributedDataParallel with "
            "find_unused_parameters=False, but freeze_inactive=True leaves the inactive "
            "layers without gradients, and DDP would fail at the second step ('Expected to "
            "have finished reduction in the prior iteration'); wrap it with "
            "DistributedDataParallel(model, find_unused_parameters=True) (the HF Trainer's "
            "default), or pass freeze_inactive=False (every layer's gradient is computed "
            "and all-reduced, the inactive ones are dropped before the update)"
        )


def skip_inactive_buckets(ddp: nn.Module, opt: ISTOptimizerLike) -> dict[str, int]:
    """Register a DDP communication hook that all-reduces only buckets IST will use.

    DDP all-reduces every gradient bucket every step, whatever IST trains. Since every
    rank agrees on the active layers, a bucket whose parameters all belong to inactive
    layers can skip its all-reduce on every rank: those gradients are dropped (or were
    never computed) before the update. Other buckets go through DDP's default
    ``allreduce_hook``. The saving grows with the number of buckets per layer (DDP's
    ``bucket_cap_mb``, 25 MB by default, against the size of a layer).

    Args:
        ddp: the ``DistributedDataParallel`` wrapper (no other comm hook registered).
        opt: the ``ISTOptimizer`` training the wrapped model.

    Returns:
        Live counters ``{"reduced": n, "skipped": m}`` of buckets, updated every backward.

    Raises:
        TypeError: when ``ddp`` is not a ``DistributedDataParallel``.
    """
    wrapper = ddp_class()
    if wrapper is None or not isinstance(ddp, wrapper):
        raise TypeError(
            f"skip_inactive_buckets needs a DistributedDataParallel model, got "
            f"{type(ddp).__name__}"
        )
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    layer_of = opt.layer_groups.layer_of()
    counts = {"reduced": 0, "skipped": 0}

    def hook(_state, bucket):  # no annotations: DDP checks them (GradBucket)
        inactive = set(range(opt.num_layers)) - set(opt.active_layers)
        if all(layer_of.get(id(p)) in inactive for p in bucket.parameters()):
            counts["skipped"] += 1
            future: torch.futures.Future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future
        counts["reduced"] += 1
        return allreduce_hook(getattr(ddp, "process_group", None), bucket)

    ddp.register_comm_hook(None, hook)
    return counts


def is_sharded(params: Any) -> bool:
    """Whether any of ``params`` is a DTensor (FSDP2 ``fully_shard``, tensor parallelism).

    Example:
        >>> is_sharded([torch.nn.Parameter(torch.ones(2))])
        False
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.5 or built without distributed
        return False
    return any(isinstance(p, DTensor) for p in params)
