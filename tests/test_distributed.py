"""Distributed IST: rank consistency under DDP and FSDP2 (2 gloo processes on CPU), resume,
the HF Trainer under torchrun, and the single-process behaviour of ist_optim.distributed.ranks.

The multi-process runs are spawned once per module (a fixture) and every scenario is
checked against one process training on the whole global batch (tests/dist_workers.py).
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ist_optim.distributed.ranks as ist_dist
from ist_optim import ISTOptimizer
from ist_optim.distributed import get_optimizer_state_dict, set_optimizer_state_dict
from ist_optim.distributed.ranks import (
    agree_on_seed,
    average_across_ranks,
    check_not_initialized_late,
    check_ranks_agree,
    check_wrapping,
    resolve_group,
    skip_inactive_buckets,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as workers  # noqa: E402

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def assert_same_params(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0.0, msg=name)


def assert_ranks_identical(results: list, key: str) -> None:
    first = results[0][key]
    for other in results[1:]:
        assert other[key]["actives"] == first["actives"]
        assert torch.equal(other[key]["scores"], first["scores"])
        assert other[key]["seed"] == first["seed"]
        assert other[key]["fingerprint"] == first["fingerprint"]
        assert_same_params(other[key]["params"], first["params"])


def assert_matches_single_process(run: dict, **kwargs) -> None:
    """What one process training on the whole batch (same seed) does."""
    reference = workers.reference_run(run["seed"], **kwargs)
    assert run["actives"] == reference["actives"]
    assert run["rounds"] == reference["rounds"] == 4
    # The losses come from float32 forwards summed in another order (all_reduce vs one
    # batch), and score_lr=10 amplifies their rounding: ~1e-7 seen, 2e-5 allowed.
    torch.testing.assert_close(run["scores"], reference["scores"], atol=2e-5, rtol=0.0)
    assert_same_params(run["params"], reference["params"], atol=1e-5)


def assert_resume_matches_uninterrupted(results: list) -> None:
    """The run resumed at step 10 equals the uninterrupted one, bit for bit, on every rank."""
    assert_ranks_identical(results, "resumed")
    resumed, uninterrupted = results[0]["resumed"], results[0]["uninterrupted"]
    assert resumed["actives"] == uninterrupted["actives"]
    assert torch.equal(resumed["scores"], uninterrupted["scores"])
    assert resumed["fingerprint"] == uninterrupted["fingerprint"]
    assert_same_params(resumed["params"], uninterrupted["params"])


# ------------------------------------------------------------------ DDP (2 gloo ranks)
@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return workers.launch(workers.ddp_worker, str(tmp_path_factory.mktemp("ddp")))


@needs_gloo
@pytest.mark.parametrize("scenario", ["ddp_first", "ist_first", "nofreeze"])
def test_ddp_ranks_identical_and_match_single_process(ddp_results, scenario):
    assert_ranks_identical(ddp_results, scenario)
    run = ddp_results[0][scenario]
    assert len({tuple(a) for a in run["actives"]}) > 1  # the active set did change
    assert run["scores"].abs().sum() > 0  # importance rounds did update the scores
    assert_matches_single_process(run)


@needs_gloo
def test_ddp_first_order_depth_aware_matches_single_process(ddp_results):
    """Rank-local <dL_r/do, o - x>, averaged over ranks, equals the global-batch value."""
    assert_ranks_identical(ddp_results, "first_order")
    run = ddp_results[0]["first_order"]
    assert run["scores"].abs().sum() > 0
    assert_matches_single_process(run, estimator="first-order", sampling="depth-aware",
                                  freeze_inactive=False)


@needs_gloo
@pytest.mark.parametrize("freeze", [True, False])
def test_ddp_skip_inactive_buckets_is_exact_and_skips(ddp_results, freeze):
    key = f"skip_buckets_freeze={freeze}"
    assert_ranks_identical(ddp_results, key)
    assert_matches_single_process(ddp_results[0][key])
    counts = [rank[key]["buckets"] for rank in ddp_results]
    assert counts[0] == counts[1]
    assert counts[0]["skipped"] > 0 and counts[0]["reduced"] > 0


def test_skip_inactive_buckets_needs_ddp():
    model = workers.tiny_net()
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, seed=0)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        skip_inactive_buckets(model, opt)


@needs_gloo
def test_ddp_entropy_seed_is_rank0s(ddp_results):
    assert_ranks_identical(ddp_results, "entropy")  # same seed, sets, scores, params
    fixed = {ddp_results[0][key]["seed"] for key in ("ddp_first", "ist_first", "nofreeze")}
    assert fixed == {11, 12, 13}
    assert ddp_results[0]["entropy"]["seed"] not in fixed


@needs_gloo
def test_ddp_resume_matches_uninterrupted(ddp_results):
    assert_resume_matches_uninterrupted(ddp_results)


@needs_gloo
def test_ddp_misconfigurations_raise_on_every_rank(ddp_results):
    for rank in ddp_results:
        assert rank["error_find_unused"].startswith("ValueError")
        assert "find_unused_parameters=True" in rank["error_find_unused"]
        assert "freeze_inactive=False" in rank["error_find_unused"]
        assert rank["error_static_graph"].startswith("ValueError")
        assert "static_graph" in rank["error_static_graph"]
        assert rank["error_seed"].startswith("ValueError")
        assert "{0: 0, 1: 1}" in rank["error_seed"]
        assert rank["ok_nofreeze_plain_ddp"] == "no error"


# ------------------------------------------------------------------ FSDP2 (2 gloo ranks)
@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return workers.launch(workers.fsdp_worker, str(tmp_path_factory.mktemp("fsdp")))


@needs_gloo
def test_fsdp2_ranks_identical_and_match_single_process(fsdp_results):
    assert fsdp_results[0]["local_shape"] == (workers.WIDTH // 2, workers.WIDTH)  # sharded
    assert_ranks_identical(fsdp_results, "fsdp")
    assert_matches_single_process(fsdp_results[0]["fsdp"])


@needs_gloo
@pytest.mark.parametrize("policy", [None, "offload"])
def test_fsdp2_optimizer_built_before_sharding(fsdp_results, policy):
    """The HF Trainer's FSDP2 order: ISTOptimizer built on the whole model, then
    accelerate shards it and puts the shards in the optimizer's place (before the fix the
    layers kept the unsharded parameters: the active sets stopped reaching the model)."""
    run = fsdp_results[0][f"fsdp_prepared_{policy}"]
    assert_ranks_identical(fsdp_results, f"fsdp_prepared_{policy}")
    built_after = fsdp_results[0]["fsdp"]  # the same seed, built on the sharded model
    assert run["actives"] == built_after["actives"]
    assert torch.equal(run["scores"], built_after["scores"])
    assert_same_params(run["params"], built_after["params"])
    assert_matches_single_process(run)


@needs_gloo
@pytest.mark.parametrize("policy", ["drop", "offload"])
def test_fsdp2_with_state_policy(fsdp_results, policy):
    run = fsdp_results[0][f"fsdp_{policy}"]
    assert run["state_policy"] == policy
    assert_ranks_identical(fsdp_results, f"fsdp_{policy}")
    assert_matches_single_process(run, state_policy=policy)


@needs_gloo
def test_fsdp2_dcp_resume_matches_uninterrupted(fsdp_results):
    assert_resume_matches_uninterrupted(fsdp_results)


# ------------------------------------------------------------------ HF Trainer + launchers
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    # accelerate's multi-process launcher (torchrun underneath) also runs on CPU; its
    # --cpu mode would need mpirun.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port())]


@needs_gloo
@pytest.mark.parametrize(("launcher", "route"), [("torchrun", "instance"), ("accelerate", "cls")])
def test_hf_trainer_ddp(tmp_path, launcher, route):
    """instance: Trainer(optimizers=(ISTOptimizer, None)), captured importance batches;
    cls: Trainer(optimizer_cls_and_kwargs=ist_optimizer_cls(...)) + add_ist_callback("eval")."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = _launcher(launcher) + [str(Path(__file__).parent / "dist_trainer_script.py"),
                                     str(tmp_path), route]
    # Output to files, not pipes: a process the ranks leave behind (torch 2.7's compile
    # worker pool, on the floor row) holds inherited pipes open after the launcher is done,
    # and reading them to their end then waits until it is killed. Own session, so that a
    # hang kills the launcher *and* its workers.
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout_file, err.open("w") as stderr_file, \
            subprocess.Popen(command, env=env, stdout=stdout_file, stderr=stderr_file,
                             start_new_session=True) as process:
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    stdout, stderr = out.read_text(), err.read_text()
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["wrapper"] == "DistributedDataParallel"
        assert rank["find_unused"] is True
        assert rank["fingerprint"]["num_steps"] == 20
        assert rank["rounds"] == 4
        assert rank["captures"] is (route == "instance")  # "eval" replaced the capture
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert_same_params(ranks[0]["params"], ranks[1]["params"])


# ------------------------------------------------------------------ single process
def test_not_distributed_by_default():
    assert not ist_dist.is_initialized()
    assert resolve_group(None) is None
    opt = ISTOptimizer(torch.optim.SGD, workers.tiny_net(), lr=0.1, seed=1)
    assert opt.process_group is None
    assert check_ranks_agree(opt)["seed"] == 1


def test_process_group_without_init_is_an_error():
    with pytest.raises(ValueError, match="not initialized"):
        resolve_group(object())
    with pytest.raises(ValueError, match="process_group="):
        ISTOptimizer(torch.optim.SGD, workers.tiny_net(), lr=0.1, process_group=object())


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_agree_on_seed_single_process_keeps_the_seed(seed):
    assert agree_on_seed(seed, None) == seed


def test_agree_on_seed_single_process_draws_fresh_entropy():
    state = torch.random.get_rng_state()
    seeds = {agree_on_seed(None, None) for _ in range(4)}
    assert len(seeds) == 4
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=6))
def test_average_single_process_is_identity_in_float64(values):
    out = average_across_ranks(torch.tensor(values, dtype=torch.float32), None)
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    torch.testing.assert_close(out, torch.tensor(values, dtype=torch.float64), equal_nan=True)


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:nccl", "mpi"])
def test_collective_device_is_cpu_for_cpu_backends(monkeypatch, backend):
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    assert ist_dist._collective_device(object()) == torch.device("cpu")


def test_collective_device_is_the_current_accelerator_for_nccl(monkeypatch):
    class FakeAccelerator:
        @staticmethod
        def current_accelerator():
            return torch.device("cuda")

        @staticmethod
        def current_device_index():
            return 3

    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch, "accelerator", FakeAccelerator, raising=False)
    assert ist_dist._collective_device(object()) == torch.device("cuda", 3)


def test_late_init_raises_at_step(monkeypatch):
    model = workers.tiny_net()
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, sampling="uniform", seed=0)
    monkeypatch.setattr(ist_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    check_not_initialized_late()  # a single rank cannot disagree with itself
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    model(**workers.batch(0, None, 1)).backward()
    with pytest.raises(RuntimeError, match="after this ISTOptimizer was built"):
        opt.step()
    assert opt.num_steps == 0


def test_dcp_helpers_single_process_roundtrip_and_missing_ist():
    model = workers.tiny_net()
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=3, **{
        k: v for k, v in workers.IST_KWARGS.items() if k != "lr"})
    workers.train(model, opt, range(6), None, 1)
    state = get_optimizer_state_dict(model, opt)
    assert state["ist"]["sampler"]["num_steps"] == 6 and "state" in state
    other_model = workers.tiny_net()
    other_model.load_state_dict(model.state_dict())
    other = ISTOptimizer(torch.optim.AdamW, other_model, lr=1e-2, seed=9, **{
        k: v for k, v in workers.IST_KWARGS.items() if k != "lr"})
    set_optimizer_state_dict(other_model, other, copy.deepcopy(state))  # a saved copy
    assert check_ranks_agree(other) == check_ranks_agree(opt)
    workers.train(model, opt, range(6, 9), None, 1)
    workers.train(other_model, other, range(6, 9), None, 1)
    assert_same_params(workers.full_params(other_model), workers.full_params(model))
    with pytest.raises(ValueError, match="no 'ist' entry"):
        set_optimizer_state_dict(model, opt, {k: v for k, v in state.items() if k != "ist"})
    bad = copy.deepcopy(state)
    bad["state"]["blocks.9.lin.weight"] = bad["state"]["head.weight"]
    with pytest.raises(ValueError, match=r"does not have: \['blocks.9.lin.weight'\]"):
        set_optimizer_state_dict(model, opt, bad)


def test_fsdp1_is_rejected_with_a_pointer_to_fsdp2():
    from torch.distributed.fsdp import FullyShardedDataParallel

    # FSDP1 cannot be built on CPU (it needs an accelerator); the check is by type.
    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(fsdp1)
    model = workers.tiny_net()
    model.add_module("wrapped", fsdp1)
    for freeze in (True, False):
        with pytest.raises(ValueError, match="fully_shard"):
            check_wrapping(model, freeze_inactive=freeze)
        with pytest.raises(ValueError, match="FSDP1"):
            ISTOptimizer(torch.optim.SGD, model, lr=0.1, freeze_inactive=freeze)
