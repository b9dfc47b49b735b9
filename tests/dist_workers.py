"""Multi-process harness for the distributed tests (gloo on CPU, spawned workers).

``launch`` runs a worker function in ``world_size`` fresh processes joined by a file-based
rendezvous (no port to pick), each with a collective timeout, and the whole run under a
wall-clock deadline: a hang fails the test instead of blocking CI. Each worker returns a
picklable result that the parent test receives per rank.

The workers train ``TinyNet`` (residual tanh blocks; ``forward(x, target)`` returns the MSE
loss, so the default loss function and batch capture work) on per-rank slices of a global
batch, and the tests compare the ranks with each other and with one process training on
the whole batch: DDP and FSDP2 average gradients, and IST averages the importance losses,
so the two must agree.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 8
LAYERS = 6
PER_RANK = 4
IST_KWARGS = dict(active_layers=2, suppressed_layers=2, num_candidates=3, update_interval=5,
                  lr=1e-2)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class TinyNet(nn.Module):
    def __init__(self, layers: int = LAYERS, width: int = WIDTH):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return F.mse_loss(self.head(x).squeeze(-1), target)


def tiny_net(seed: int = 0) -> TinyNet:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyNet()


def batch(step: int, rank: int | None, world_size: int) -> dict[str, torch.Tensor]:
    """Step ``step``'s global batch (``rank=None``) or rank ``rank``'s slice of it."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(PER_RANK * world_size, WIDTH, generator=g)
    target = torch.randn(PER_RANK * world_size, generator=g)
    if rank is None:
        return {"x": x, "target": target}
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return {"x": x[part], "target": target[part]}


def train(forward: nn.Module, opt: Any, steps: range, rank: int | None, world: int) -> list:
    """Train ``steps``; return the active set trained at each step."""
    actives = []
    for step in steps:
        actives.append(opt.active_layers)
        forward(**batch(step, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    return actives


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name, FSDP2 DTensors gathered, ``module.`` (DDP) prefix removed."""
    out = {}
    for name, p in model.named_parameters():
        value = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = value.detach().clone()
    return out


def summary(model: nn.Module, opt: Any, actives: list) -> dict[str, Any]:
    from ist_optim.distributed import check_ranks_agree

    return {
        "params": full_params(model),
        "actives": actives,
        "scores": opt.scores,
        "seed": opt.seed,
        "rounds": opt.num_steps // opt.update_interval - opt.skipped_rounds,
        "fingerprint": check_ranks_agree(opt),
        "state_policy": opt.state_policy,
    }


def _entry(rank: int, worker: Callable, world: int, init_file: str, out: str,
           args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Done, results written: leave without the interpreter's teardown, where a rank could
    # abort ("terminate called without an active exception", SIGABRT; seen on the tf457
    # row) after it succeeded. A worker that raised does not get here: spawn reports it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(worker: Callable, *args: Any, world_size: int = 2, timeout: float = 240) -> list:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` gloo ranks; results per rank.

    Raises:
        TimeoutError: when the processes are not done after ``timeout`` seconds (killed).
        torch.multiprocessing.ProcessRaisedException: with a worker's traceback.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        context = mp.start_processes(_entry, args=(worker, world_size, init_file, tmp, args),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{worker.__name__} did not finish in {timeout} s")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False)
                for r in range(world_size)]


# ---------------------------------------------------------------------------- reference
def reference_run(seed: int, steps: int = 20, world: int = 2, **kwargs: Any) -> dict[str, Any]:
    """One process training on the whole global batch: what every rank must reproduce."""
    from ist_optim import ISTOptimizer

    model = tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=seed, **IST_KWARGS, **kwargs)
    actives = train(model, opt, range(steps), None, world)
    return summary(model, opt, actives)


# ---------------------------------------------------------------------------- DDP
def _ddp(model: nn.Module, **kwargs: Any) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, **kwargs)


def _error_of(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def ddp_worker(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Every DDP scenario in one process group (spawning is the slow part)."""
    from ist_optim import ISTOptimizer

    results: dict[str, Any] = {}
    steps = range(20)

    # 0. seed=None: every rank must take rank 0's OS-entropy seed (compared exactly across
    #    ranks; the other scenarios use fixed seeds so that their comparison with a single
    #    process is deterministic, not a new random trajectory on every run).
    model = tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, **IST_KWARGS)
    ddp = _ddp(model, find_unused_parameters=True)
    results["entropy"] = summary(model, opt, train(ddp, opt, range(6), rank, world))

    # 1. DDP wrap first, ISTOptimizer on the wrapper (freeze_inactive + find_unused).
    model = tiny_net()
    ddp = _ddp(model, find_unused_parameters=True)
    opt = ISTOptimizer(torch.optim.AdamW, ddp, seed=11, **IST_KWARGS)
    results["ddp_first"] = summary(model, opt, train(ddp, opt, steps, rank, world))

    # 2. ISTOptimizer first, DDP wrap after (the HF Trainer's order).
    model = tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=12, **IST_KWARGS)
    ddp = _ddp(model, find_unused_parameters=True)
    results["ist_first"] = summary(model, opt, train(ddp, opt, steps, rank, world))

    # 3. freeze_inactive=False with DDP's defaults (static requires_grad).
    model = tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, freeze_inactive=False, seed=13, **IST_KWARGS)
    ddp = _ddp(model)
    results["nofreeze"] = summary(model, opt, train(ddp, opt, steps, rank, world))

    # 4. Resume after 10 steps from a rank-0 torch.save checkpoint, user seed.
    model = tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=5, **IST_KWARGS)
    ddp = _ddp(model, find_unused_parameters=True)
    first = train(ddp, opt, range(10), rank, world)
    path = os.path.join(tmp, "ddp_ckpt.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    import torch.distributed as dist

    dist.barrier()
    checkpoint = torch.load(path, weights_only=True)
    model = tiny_net(seed=123)  # other init: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=5, **IST_KWARGS)
    opt.load_state_dict(checkpoint["opt"])
    ddp = _ddp(model, find_unused_parameters=True)
    results["resumed"] = summary(model, opt, first + train(ddp, opt, range(10, 20), rank, world))
    model = tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=5, **IST_KWARGS)
    ddp = _ddp(model, find_unused_parameters=True)
    results["uninterrupted"] = summary(model, opt, train(ddp, opt, steps, rank, world))

    # 5. skip_inactive_buckets: one bucket per parameter (tiny bucket_cap_mb), counted.
    from ist_optim.distributed import skip_inactive_buckets

    for freeze in (True, False):
        model = tiny_net()
        opt = ISTOptimizer(torch.optim.AdamW, model, freeze_inactive=freeze, seed=14 + freeze,
                           **IST_KWARGS)
        ddp = _ddp(model, find_unused_parameters=freeze, bucket_cap_mb=1e-4)
        counts = skip_inactive_buckets(ddp, opt)
        key = f"skip_buckets_freeze={freeze}"
        results[key] = summary(model, opt, train(ddp, opt, steps, rank, world))
        results[key]["buckets"] = dict(counts)

    # 6. First-order importance (rank-local backward, averaged over ranks) with depth-aware
    # sampling. freeze_inactive=False: every step's backward reaches every layer, on the
    # ranks as in the single process (with freezing, the deferred freeze makes a DDP run's
    # first backward reach all layers, a single process's not).
    model = tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, estimator="first-order",
                       sampling="depth-aware", freeze_inactive=False, seed=16, **IST_KWARGS)
    ddp = _ddp(model)
    results["first_order"] = summary(model, opt, train(ddp, opt, steps, rank, world))

    # 7. Errors, raised on every rank.
    results["error_find_unused"] = _error_of(
        lambda: ISTOptimizer(torch.optim.AdamW, _ddp(tiny_net()), **IST_KWARGS))
    results["error_static_graph"] = _error_of(lambda: ISTOptimizer(
        torch.optim.AdamW, _ddp(tiny_net(), static_graph=True, find_unused_parameters=True),
        **IST_KWARGS))
    results["error_seed"] = _error_of(
        lambda: ISTOptimizer(torch.optim.AdamW, tiny_net(), seed=rank, **IST_KWARGS))
    results["ok_nofreeze_plain_ddp"] = _error_of(
        lambda: ISTOptimizer(torch.optim.AdamW, _ddp(tiny_net()), freeze_inactive=False,
                             **IST_KWARGS))
    return results


# ---------------------------------------------------------------------------- FSDP2
def _sharded(seed: int = 0) -> TinyNet:
    from torch.distributed.fsdp import fully_shard

    model = tiny_net(seed)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def accelerate_fsdp2_prepare(model: TinyNet, opt: Any) -> None:
    """What accelerate's ``Accelerator._prepare_fsdp2`` (1.16) does to a model prepared
    with its optimizer, so what the HF Trainer (and TRL, axolotl, LLaMA-Factory) do under
    FSDP2: placeholders in the optimizer's ``param_groups``, ``fully_shard`` on every block
    and the model, then each shard in the place of the parameter of the same name."""
    from torch.distributed.fsdp import fully_shard

    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [[name_of[id(p)] for p in group["params"]] for group in opt.param_groups]
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            group["params"][i] = torch.empty(1, dtype=p.dtype, device=p.device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    shards = dict(model.named_parameters())
    for group, group_names in zip(opt.param_groups, names, strict=True):
        group["params"] = [shards[name] for name in group_names]


def fsdp_worker(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """FSDP2 (fully_shard, DTensor params): training, and a DCP checkpoint resume."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from ist_optim import ISTOptimizer
    from ist_optim.distributed import get_optimizer_state_dict, set_optimizer_state_dict

    results: dict[str, Any] = {}
    model = _sharded()
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=17, **IST_KWARGS)
    results["fsdp"] = summary(model, opt, train(model, opt, range(20), rank, world))
    results["local_shape"] = tuple(next(model.parameters()).to_local().shape)
    for policy in (None, "offload"):  # built before sharding, as the Trainer does
        model = tiny_net()
        opt = ISTOptimizer(torch.optim.AdamW, model, seed=17, state_policy=policy,
                           **IST_KWARGS)
        accelerate_fsdp2_prepare(model, opt)
        results[f"fsdp_prepared_{policy}"] = summary(
            model, opt, train(model, opt, range(20), rank, world))
    for policy in ("drop", "offload"):  # optimizer-state residency on sharded state
        model = _sharded()
        opt = ISTOptimizer(torch.optim.AdamW, model, state_policy=policy, seed=18,
                           **IST_KWARGS)
        results[f"fsdp_{policy}"] = summary(model, opt, train(model, opt, range(20), rank,
                                                              world))

    model = _sharded()
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=5, **IST_KWARGS)
    first = train(model, opt, range(10), rank, world)
    checkpoint = os.path.join(tmp, "dcp")
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=checkpoint)
    rest = train(model, opt, range(10, 20), rank, world)
    results["uninterrupted"] = summary(model, opt, first + rest)

    model = _sharded(seed=123)
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=5, **IST_KWARGS)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    results["resumed"] = summary(model, opt, first + train(model, opt, range(10, 20), rank,
                                                           world))
    return results


# ---------------------------------------------------------------------------- non-finite
def nonfinite_worker(rank: int, world: int) -> dict[str, Any]:
    """``skip_nonfinite``: rank 0 alone sees an infinite gradient at step 3; every rank must
    skip that step (no DDP here, so nothing else makes the ranks' gradients agree)."""
    from ist_optim import ISTOptimizer

    model = tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=0, skip_nonfinite=True, **IST_KWARGS)
    steps = []
    for step in range(6):
        model(**batch(step, rank, world)).backward()
        if step == 3 and rank == 0:
            next(p for p in opt.layer_groups.layer_params(opt.active_layers)).grad[0] = (
                float("inf"))
        opt.step()
        opt.zero_grad()
        steps.append((opt.num_steps, opt.skipped_steps, opt.active_layers))
    return {"steps": steps, "fingerprint": opt.fingerprint()}
