"""The CUDA paths: side-stream offload, bitsandbytes (paged) 8-bit, the backward cut under
checkpointing, importance rounds under bf16 autocast, resume (also layer by layer under
offload, and of first-order state mapped to the device), memory budget, cuBLAS workspaces.

Each test runs on ``"cpu"`` (tiny shapes, in the normal suite: it keeps the test code itself
working) and on ``"cuda"`` (marked ``cuda``: skipped without a device; ``pytest -m cuda`` or
``bash scripts/gpu-check.sh`` runs them on a GPU, with shapes large enough for the copies
to take longer than the host takes to enqueue the next step).
"""

from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot
from test_backward import BackwardCounter
from test_residency import Blocks

from ist_optim import BackwardCut, ISTOptimizer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _on(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _blocks_model(device: str, num_layers: int, width: int) -> Blocks:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Blocks(num_layers, width)
    return model.to(device)


def _inputs(device: str, steps: int, width: int, batch: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, width, generator=g).to(device) for _ in range(steps)]


class BusyDefaultStream:
    """Enqueues large matrix products on the current (default) CUDA stream.

    Run before ``step()``, they delay the optimizer's update on the default stream, so a
    side-stream copy of the updated state that did not wait for the default stream would
    copy the state of before the update.
    """

    def __init__(self, device: str, size: int = 4096, products: int = 4):
        g = torch.Generator(device=device).manual_seed(2)
        self.a = torch.randn(size, size, device=device, generator=g) / size**0.5
        self.out = torch.empty_like(self.a)
        self.products = products

    def __call__(self) -> None:
        for _ in range(self.products):
            torch.mm(self.a, self.a, out=self.out)


def _train_blocks(model, optimizer_cls, policy, inputs, busy, **kwargs):
    opt = ISTOptimizer(optimizer_cls, model, seed=3, active_layers=2, sampling="uniform",
                       state_policy=policy, **kwargs)
    sets = []
    # No host synchronization inside the loop: no .item(), no printing, no memory_report()
    # or state_dict() (they wait for the copies), so the host runs ahead of the device as
    # in real training and a missing stream wait shows as a mismatch.
    for step, x in enumerate(inputs):
        sets.append(opt.active_layers)
        model(x).backward()
        if step % 2 == 0:
            # even steps: default stream busy before the update (catches a copy-out that
            # does not wait for the update); odd steps: default stream idle, the update
            # follows the short forward/backward at once (catches an update that does not
            # wait for the copy-in of newly drawn layers)
            busy()
        opt.step()
        opt.zero_grad()
    return opt, sets, opt.memory_report()["state_bytes_offloaded"]


def _state_on_cpu(state):
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _state_on_cpu(v) for k, v in state.items()}
    return state


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("inner", ["adamw", "adamw8bit"])
@pytest.mark.parametrize("device", DEVICES)
def test_offload_is_bit_identical_to_keep_with_a_busy_default_stream(device, inner):
    """The race this exists for (an update that does not wait for the copy back, a copy
    out that does not wait for the update) shows in the AdamW variant, whose loop never
    synchronizes the host. bitsandbytes' 8-bit update synchronizes per parameter, which
    hides such a race: that variant checks the 8-bit state's round trip, not the order.
    The order itself is asserted on every CI run with delayed fake copies
    (tests/test_streams.py)."""
    cuda = device == "cuda"
    # 8 layers of 4096 x 4096 on CUDA: 128 MB of AdamW state per layer, so the copies
    # outlast the host's enqueueing of the next forward/backward
    width, steps = (4096, 50) if cuda else (16, 12)
    if inner == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(lr=1e-3)
    else:
        cls, kwargs = _bnb().optim.AdamW8bit, dict(lr=1e-3, min_8bit_size=0)
    initial = _blocks_model(device, 8, width)
    inputs = _inputs(device, steps, width)
    busy = BusyDefaultStream(device, size=4096 if cuda else 32)

    runs = {}
    for name, policy in [("keep", "keep"), ("keep again", "keep"), ("offload", "offload")]:
        model = copy.deepcopy(initial)
        opt, sets, offloaded = _train_blocks(model, cls, policy, inputs, busy, **kwargs)
        runs[name] = (model, opt, sets, offloaded)

    (model_keep, opt_keep, sets_keep, _), (model_off, opt_off, sets_off, offloaded) = (
        runs["keep"], runs["offload"])
    # the same active sets, step by step, and varied ones
    assert sets_keep == sets_off and len({tuple(s) for s in sets_off}) > 5
    assert offloaded > 0
    assert all(torch.isfinite(p).all() for p in model_keep.parameters())
    # the device itself is deterministic here: two keep runs agree, so a mismatch below
    # is the offload's
    for a, b in zip(model_keep.parameters(), runs["keep again"][0].parameters(), strict=True):
        assert torch.equal(a, b), "two identical keep runs differ: the device is not deterministic"
    for (n, a), (_, b) in zip(model_keep.named_parameters(), model_off.named_parameters(),
                              strict=True):
        assert torch.equal(a, b), n
    # the checkpoint of the offloading run holds the keep run's state (the offloaded
    # entries come from host memory, the active ones from the device)
    sd_keep = _state_on_cpu(opt_keep.state_dict()["state"])
    sd_off = _state_on_cpu(opt_off.state_dict()["state"])
    assert sd_keep.keys() == sd_off.keys()
    assert _same(sd_keep, sd_off)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_adamw8bit_defaults_to_keep_and_matches_adamw8bit(device):
    bnb = _bnb()
    cuda = device == "cuda"
    width, steps = (512, 20) if cuda else (16, 6)  # paged buffers from 1e5 elements
    initial = _blocks_model(device, 6, width)
    inputs = _inputs(device, steps, width)
    kwargs = dict(seed=5, active_layers=2, sampling="uniform", lr=1e-3, min_8bit_size=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Paged optimizers are not supported on CPU")
        model_paged, model_plain = copy.deepcopy(initial), copy.deepcopy(initial)
        paged = ISTOptimizer(bnb.optim.PagedAdamW8bit, model_paged, **kwargs)
        assert paged.state_policy == "keep"  # the default, also on CUDA
        with pytest.raises(ValueError, match="paged optimizer"):
            ISTOptimizer(bnb.optim.PagedAdamW8bit, copy.deepcopy(initial),
                         state_policy="offload", **kwargs)
        plain = ISTOptimizer(bnb.optim.AdamW8bit, model_plain, state_policy="keep", **kwargs)
        for x in inputs:
            for model, opt in ((model_paged, paged), (model_plain, plain)):
                model(x).backward()
                opt.step()
                opt.zero_grad()
    assert paged.active_layers == plain.active_layers
    for (n, a), (_, b) in zip(model_paged.named_parameters(), model_plain.named_parameters(),
                              strict=True):
        assert torch.equal(a, b), n
    states = list(paged.state.values())
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    if cuda:  # the weights' state lives in bitsandbytes' paged (managed) buffers
        assert any(getattr(s["state1"], "is_paged", False) for s in states)


def _checkpointed_lora(device: str, checkpointing: str, active: list[int] | None = None):
    """LoRA model under gradient checkpointing with forced input grads (what peft and
    transformers do); ``active``: train only these blocks' adapters (by hand)."""
    model = lora_model(6).to(device)
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    model.enable_input_require_grads()
    model.train()
    blocks = list(model.base_model.model.model.layers)
    if active is not None:
        for i, block in enumerate(blocks):
            for n, p in block.named_parameters():
                p.requires_grad_("lora_" in n and i in active)
    return model, blocks


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_cut_under_gradient_checkpointing(device, checkpointing):
    active = [3, 5]
    model, blocks = _checkpointed_lora(device, checkpointing, active)
    batch = _on(lm_batch(seed=1), device)
    counter = BackwardCounter(blocks)
    model(**batch).loss.backward()
    assert counter.counts == [1] * 6  # forced input grads: backward reaches every block
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    counter.counts = [0] * 6

    cut = BackwardCut(blocks, active, model=model)
    model(**batch).loss.backward()
    assert counter.counts == [0, 0, 0, 1, 1, 1] and cut.cuts > 0
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == reference.keys() and got
    for name, grad in reference.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    cut.remove()
    counter.remove()


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
@pytest.mark.parametrize("device", DEVICES)
def test_ist_training_with_the_cut_matches_training_without(device, checkpointing):
    results = []
    for skip in (True, False):
        model, blocks = _checkpointed_lora(device, checkpointing)
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=7, skip_backward=skip,
                           update_interval=2)
        counter = BackwardCounter(blocks)
        below = 0
        for step in range(5):
            lowest = min(opt.active_layers)
            counter.counts = [0] * 6
            model(**_on(lm_batch(seed=step), device)).loss.backward()
            below += sum(counter.counts[:lowest])
            opt.step()
            opt.zero_grad()
        results.append((below, params_snapshot(model), opt.scores))
    (below_cut, params_cut, scores_cut), (below_full, params_full, scores_full) = results
    assert below_cut == 0 and below_full > 0
    torch.testing.assert_close(scores_cut, scores_full, rtol=1e-4, atol=1e-4)
    for name in params_full:
        torch.testing.assert_close(params_cut[name], params_full[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


class DtypeProbe:
    """Records the output dtype of one module while it is enabled."""

    def __init__(self, module: torch.nn.Module):
        self.dtypes: list[torch.dtype] = []
        self.handle = module.register_forward_hook(
            lambda _m, _a, out: self.dtypes.append(out.dtype))


@pytest.mark.parametrize("precision", ["autocast", "bf16-weights"])
@pytest.mark.parametrize("device", DEVICES)
def test_importance_rounds_in_bf16(device, precision):
    """Training and the rounds (step() inside the autocast region, as when a whole loop
    runs under ``accelerator.autocast()``) in bf16: rounds run in bf16, give finite
    losses, update the scores, and leave every parameter exactly as it was."""
    model = lora_model(6).to(device)
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16,
                              enabled=precision == "autocast")
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=2, update_interval=2)
    probe = DtypeProbe(model.base_model.model.model.layers[0].mlp.up_proj)
    round_steps = []
    for step in range(6):
        with autocast:
            model(**_on(lm_batch(seed=step), device)).loss.backward()
            opt.step()
        opt.zero_grad()
        if opt.last_round is not None and opt.last_round["step"] == opt.num_steps:
            round_steps.append(opt.num_steps)
            assert all(torch.isfinite(torch.tensor(opt.last_round["losses"])))
    assert round_steps == [2, 4, 6]
    assert set(probe.dtypes) == {torch.bfloat16}  # training and round forwards ran in bf16
    assert torch.count_nonzero(opt.scores) > 0

    # a round restores the model bit for bit, and its losses are those of fp32 to bf16
    # precision
    batch = _on(lm_batch(seed=9), device)
    sets = [[0, 1, 2], [3, 4, 5]]
    before = params_snapshot(model)
    with autocast:
        losses = opt.measure_suppressed_losses(sets, batch)
    after = params_snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert torch.isfinite(losses).all()
    if precision == "autocast":
        reference = opt.measure_suppressed_losses(sets, batch)  # fp32
        torch.testing.assert_close(losses, reference, rtol=3e-2, atol=0.0)
    probe.handle.remove()


def _train_lm(model, opt, device, steps, start=0):
    sets = []
    for step in range(start, start + steps):
        sets.append(opt.active_layers)
        model(**_on(lm_batch(seed=step), device)).loss.backward()
        opt.step()
        opt.zero_grad()
    return sets


@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_a_checkpoint_written_on_the_device(device, tmp_path):
    """The default policy (``"offload"`` on CUDA) checkpoints through torch.save; the
    resumed run equals the uninterrupted one bit for bit, and the file loads on the CPU."""
    kwargs = dict(lr=1e-2, seed=11, update_interval=3, active_layers=2)
    full_model = lora_model(8).to(device)
    full = ISTOptimizer(torch.optim.AdamW, full_model, **kwargs)
    assert full.state_policy == ("offload" if device == "cuda" else "keep")
    full_sets = _train_lm(full_model, full, device, 10)

    first_model = lora_model(8).to(device)
    first = ISTOptimizer(torch.optim.AdamW, first_model, **kwargs)
    sets = _train_lm(first_model, first, device, 5)
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()},
               tmp_path / "ckpt.pt")
    del first_model, first

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model = lora_model(8).to(device)
    resumed_model.load_state_dict(saved["model"])
    resumed = ISTOptimizer(torch.optim.AdamW, resumed_model, **dict(kwargs, seed=999))
    resumed.load_state_dict(saved["optimizer"])
    sets += _train_lm(resumed_model, resumed, device, 5, start=5)
    assert sets == full_sets
    assert torch.equal(resumed.scores, full.scores) and resumed.num_steps == 10
    for (n, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters(),
                              strict=True):
        assert torch.equal(a, b), n

    # the same file on a CPU-only machine: the sampler and the inner state load
    on_cpu = torch.load(tmp_path / "ckpt.pt", weights_only=True, map_location="cpu")
    cpu_model = lora_model(8)
    cpu_model.load_state_dict(on_cpu["model"])
    cpu_opt = ISTOptimizer(torch.optim.AdamW, cpu_model, **kwargs)
    cpu_opt.load_state_dict(on_cpu["optimizer"])
    assert cpu_opt.active_layers == full_sets[5] and cpu_opt.num_steps == 5
    assert torch.equal(cpu_opt.scores, on_cpu["optimizer"]["ist"]["sampler"]["scores"].double())
    assert _same(_state_on_cpu(cpu_opt.state_dict()["state"]),
                 _state_on_cpu(on_cpu["optimizer"]["state"]))


def _budget_llama(device: str, shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=2 * shape["hidden"], num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=shape["seq"], use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(device)


def _peak_of_a_run(device: str, shape: dict, **kwargs) -> dict:
    """Full fine-tuning of a fresh 8-block Llama with ``kwargs``: the peak
    (CUDA: ``max_memory_allocated`` over the run; CPU: exact tensor bytes of every step,
    ``account_step``), the blocks checkpointed per step and the active sets. Everything
    the run allocated is freed before it returns (the next run's peak is its own)."""
    run = _train_for_peak(device, shape, **kwargs)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return run


def _train_for_peak(device: str, shape: dict, **kwargs) -> dict:
    from ist_optim import account_step

    cuda = device == "cuda"
    model = _budget_llama(device, shape)
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g)
               .to(device) for _ in range(shape["steps"])]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0, sampling="uniform",
                       active_layers=2, state_policy=shape["policy"], **kwargs)
    run = {"peak": 0, "checkpointed": [], "sets": []}

    def step(ids):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for ids in batches:
        run["sets"].append(opt.active_layers)
        run["checkpointed"].append(opt.memory_report()["checkpointed_layers"])
        if cuda:
            step(ids)
        else:
            run["peak"] = max(run["peak"], account_step(lambda i=ids: step(i), model=model,
                                                        optimizer=opt).peak_bytes)
    if cuda:
        torch.cuda.synchronize()
        run["peak"] = torch.cuda.max_memory_allocated()
    run["policy"] = opt.memory_budget.policy if opt.memory_budget is not None else None
    opt.close()
    return run


BUDGET_SHAPES = {  # activations dominate, so checkpointing can bring a step under budget
    "cpu": dict(hidden=64, vocab=256, batch=4, seq=128, steps=4, policy="drop"),
    "cuda": dict(hidden=512, vocab=2048, batch=8, seq=512, steps=6, policy="offload"),
}


@pytest.mark.parametrize("device", DEVICES)
def test_memory_budget_bounds_the_measured_peak(device):
    """``memory_budget`` (the bytes a training step may peak at, weights included) against
    the measured peak (CUDA: ``torch.cuda.max_memory_allocated``, which also counts the
    cuBLAS workspaces the budget reserves; CPU: exact tensor bytes). The budget is the
    planner's: every pair of active blocks fits it with checkpointing, some only with
    checkpointing; the same active sets without a budget peak above it."""
    shape = BUDGET_SHAPES[device]
    memory_shape = (shape["batch"], shape["seq"])
    probe = _peak_of_a_run(device, shape, memory_budget="1TiB", memory_shape=memory_shape)
    policy = probe["policy"]
    pairs = [[a, b] for a in range(8) for b in range(a + 1, 8)]
    free = {tuple(pair): policy.peak(pair, []) for pair in pairs}
    policy.limit = -1  # nothing fits: decide() finds each pair's lowest peak
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowest = {tuple(pair): policy.decide(pair).peak_bytes for pair in pairs}
    assert all(lowest[pair] < free[pair] for pair in free)
    worst = max(lowest.values())
    limit = worst + (max(free[tuple(s)] for s in probe["sets"]) - worst) // 2
    assert limit > worst
    budget = math.ceil((limit + policy.reserve_bytes) / (1 - policy.headroom))

    unbudgeted = _peak_of_a_run(device, shape)
    assert unbudgeted["sets"] == probe["sets"]
    assert unbudgeted["peak"] > budget  # the budget binds
    budgeted = _peak_of_a_run(device, shape, memory_budget=budget, memory_shape=memory_shape)
    assert budgeted["sets"] == probe["sets"] and any(budgeted["checkpointed"])
    assert budgeted["peak"] <= budget, (budgeted["peak"], budget, unbudgeted["peak"])


@pytest.mark.parametrize("device", DEVICES)
def test_first_order_state_loaded_onto_the_device_resumes(device):
    """accelerate's ``prepare`` round-trips the optimizer's state dict onto the device and
    the multi-GPU Trainer loads it with ``map_location=device``: the first-order probe's
    counts must come back to the host, where the round concatenates them with its sums."""
    kwargs = dict(lr=1e-2, seed=0, estimator="first-order", update_interval=2,
                  active_layers=2)
    model = lora_model(4).to(device)
    opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
    _train_lm(model, opt, device, 3)  # step 3: the probe holds a step's sums and counts
    assert int(opt.state_dict()["ist"]["rounds"]["probe"]["counts"].sum()) > 0

    def to_device(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {k: to_device(v) for k, v in value.items()}
        if isinstance(value, list):
            return [to_device(v) for v in value]
        return value

    saved = to_device(opt.state_dict())
    resumed_model = lora_model(4).to(device)
    resumed_model.load_state_dict(model.state_dict())
    resumed = ISTOptimizer(torch.optim.AdamW, resumed_model, **dict(kwargs, seed=5))
    resumed.load_state_dict(saved)
    probe = resumed.state_dict()["ist"]["rounds"]["probe"]
    assert probe["counts"].device.type == "cpu" and probe["sums"].device.type == "cpu"
    _train_lm(model, opt, device, 1, start=3)
    _train_lm(resumed_model, resumed, device, 1, start=3)  # step 4 runs a round
    assert resumed.last_round is not None and resumed.last_round["step"] == 4
    assert torch.equal(resumed.scores, opt.scores)


@pytest.mark.cuda
def test_cublas_workspaces_fit_what_the_budget_reserves(record_property):
    """A stream's first matrix products get cuBLAS workspaces from the caching allocator
    (one for this thread, one for autograd's backward thread), which
    ``max_memory_allocated`` counts and no tensor owns: measured on a fresh stream, they
    must fit :func:`ist_optim.memory.budget.cuda_workspace_bytes` (what ``memory_budget``
    reserves on CUDA). The measurement goes to the GPU check's summary."""
    from ist_optim.memory.budget import cuda_workspace_bytes

    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(512, 512, device=device, generator=g, requires_grad=True)
    w = torch.randn(512, 512, device=device, generator=g, requires_grad=True)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream(device=device)
    with torch.cuda.stream(stream):
        before = torch.cuda.memory_allocated(device)
        y = x @ w
        y.backward(torch.ones_like(y))
        stream.synchronize()
        grown = torch.cuda.memory_allocated(device) - before
    tensors = sum(-(-t.numel() * t.element_size() // 512) * 512 for t in (y, x.grad, w.grad))
    workspaces = grown - tensors
    record_property("cublas_workspace_bytes", workspaces)
    record_property("reserved_bytes", cuda_workspace_bytes(device))
    assert 0 < workspaces <= cuda_workspace_bytes(device), (workspaces,
                                                             cuda_workspace_bytes(device))


@pytest.mark.cuda
def test_resume_under_offload_fits_where_the_state_of_every_layer_would_not():
    """Full fine-tuning with "offload": loading a checkpoint puts one inactive layer's
    state on the device at a time, never every layer's (the CPU test of the same order:
    tests/test_checkpoint.py)."""
    device = "cuda"
    initial = _blocks_model(device, 8, 2048)  # 16 MiB of weights, 32 MiB of state per block
    model = copy.deepcopy(initial)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=3, active_layers=1,
                       sampling="uniform", state_policy="offload")
    for x in _inputs(device, 16, 2048):
        model(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    per_layer = 2 * sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    offloaded = opt.memory_report()["state_bytes_offloaded"]
    assert offloaded >= 3 * per_layer  # at least 3 inactive blocks have state to load
    saved = opt.state_dict()  # host (offloaded blocks) and device (the active one)
    saved = {**saved, "state": _state_on_cpu(saved["state"])}
    opt.close()
    del opt, model
    resumed_model = copy.deepcopy(initial)
    resumed = ISTOptimizer(torch.optim.AdamW, resumed_model, lr=1e-3, seed=9, active_layers=1,
                           sampling="uniform", state_policy="offload")
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    resumed.load_state_dict(saved)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - base
    # the active block and the head, or one other block at a time (+ 1 MiB of slack);
    # loading every block at once would hold all of their state together
    assert grown <= 2 * per_layer + 2**20, (grown, per_layer, offloaded)
    assert resumed.memory_report()["state_bytes_offloaded"] == offloaded
