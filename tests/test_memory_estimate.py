"""estimate_peak_memory / MemoryPlanner: against the H200 measurements of a LLaMA-2-7B shape,
against exactly accounted CPU runs of small random Llamas, and its API contract."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig

from benchmarks.benchkit import memory_anchors as _anchors
from ist_optim import MemoryPlanner, account_step, estimate_peak_memory
from ist_optim.memory import load_config

# The measurements (H200 peaks of a LLaMA-2-7B shape, the accounted CPU cases) and the
# accounted-step helper live once, in benchmarks/benchkit/memory_anchors.py, which
# benchmarks/memory/planner.py compares the planner with too.
LLAMA2_7B, RAND, TOP = _anchors.LLAMA2_7B, _anchors.RAND, _anchors.TOP
H200, CPU_CASES = _anchors.H200, _anchors.CPU_CASES
_run_and_account = _anchors.accounted_step


@pytest.fixture(scope="module")
def h200_planners() -> dict[str, MemoryPlanner]:
    config = LlamaConfig(**LLAMA2_7B)
    common = dict(batch_size=8, seq_len=512, dtype=torch.bfloat16)
    return {
        "lora": MemoryPlanner(config, method="lora", lora_rank=32, **common),
        # the anchor's full AdamW and BAdam's inner AdamW ran with foreach=False
        "full": MemoryPlanner(config, method="full", foreach=False, **common),
        "bnb8": MemoryPlanner(config, method="full", optimizer="adamw8bit", **common),
        "badam": MemoryPlanner(config, method="full", optimizer="adamw-fp32-master",
                               foreach=False, **common),
    }


@pytest.mark.parametrize("row,measured,planner,kwargs", H200, ids=[r[0] for r in H200])
def test_h200_rows_within_10_percent(h200_planners, row, measured, planner, kwargs):
    est = h200_planners[planner].estimate(**kwargs)
    assert est.peak_gib == pytest.approx(measured, rel=0.10), (row, est.peak_gib, est.phase)
    assert est.peak_bytes == sum(est.breakdown.values())


def test_h200_weights_and_state_are_exact(h200_planners):
    lora = h200_planners["lora"].estimate()
    params = 6_738_415_616  # trainable_params_now of the "full" line
    adapters = 56_098_816  # of the "lora" line
    assert lora.breakdown["weights"] == 2 * params + 4 * adapters
    assert lora.breakdown["optimizer_state"] == 2 * 4 * adapters
    full = h200_planners["full"].estimate(train_embeddings=True, train_head=True)
    assert full.breakdown["optimizer_state"] == 2 * 2 * params


def test_checkpointing_costs_recompute_flops(h200_planners):
    lora = h200_planners["lora"]
    plain = lora.estimate(TOP)
    checkpointed = lora.estimate(TOP, gradient_checkpointing=True)
    forced = lora.estimate(TOP, gradient_checkpointing=True, cut_backward=False)
    assert plain.flops < checkpointed.flops < forced.flops
    assert checkpointed.peak_bytes < plain.peak_bytes


@pytest.mark.parametrize("method,active,embeddings,head", CPU_CASES)
def test_estimate_matches_an_accounted_cpu_run(method, active, embeddings, head):
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    measured = _run_and_account(config, method, active, embeddings=embeddings, head=head)
    est = estimate_peak_memory(config, batch_size=4, seq_len=64, dtype=torch.float32,
                               method=method, lora_rank=8, active_layers=active,
                               train_embeddings=embeddings, train_head=head, foreach=False)
    assert est.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.10)
    for part in ("optimizer_state", "gradients"):
        assert est.breakdown[part] == pytest.approx(measured.breakdown[part], rel=0.01,
                                                    abs=1024)


@pytest.mark.parametrize("active,checkpointing", [([0, 1, 2, 3], True), ([2, 3], False)])
def test_keep_logits_false_matches_a_loop_that_keeps_only_the_loss(active, checkpointing):
    """``loss = model(**batch).loss`` (the HF Trainer's way) frees the logits as soon as the
    forward returns; ``keep_logits=False`` models that (the default over-estimated such a
    loop by one logits tensor: 10% on SmolLM2-135M at 4 x 128)."""
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=4096)
    measured = _run_and_account(config, "lora", active, keep_output=False,
                                checkpointing=checkpointing).peak_bytes
    planner = MemoryPlanner(config, batch_size=4, seq_len=64, dtype=torch.float32,
                            foreach=False, keep_logits=False)
    dropped = planner.estimate(active, gradient_checkpointing=checkpointing).peak_bytes
    kept = planner.estimate(active, gradient_checkpointing=checkpointing,
                            keep_logits=True).peak_bytes
    assert dropped == pytest.approx(measured, rel=0.02)
    assert kept - dropped == planner.costs.logits_bytes  # the default: one logits tensor more
    assert kept > measured * 1.05


def test_planner_sums_are_monotone_in_the_active_set():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, vocab_size=256)
    planner = MemoryPlanner(config, batch_size=2, seq_len=32, dtype=torch.float32)
    peaks = [planner.estimate(list(range(low, 6))).peak_bytes for low in range(6)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]
    # layers above the lowest add state and adapter activations only
    assert planner.estimate([0, 5]).peak_bytes < planner.estimate([0, 1, 2, 3, 4, 5]).peak_bytes


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-3-8b", "qwen2.5-7b", "smollm2-135m"])
def test_named_shapes_have_their_published_parameter_counts(name):
    expected = {"llama-2-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248,
                "qwen2.5-7b": 7_615_616_512, "smollm2-135m": 134_515_008}[name]
    config = load_config(name)
    planner = MemoryPlanner(config, batch_size=1, seq_len=16, method="full")
    costs = planner.costs
    total = (costs.num_layers * costs.block_param_count + costs.embed_param_count
             + costs.head_param_count + costs.norm_param_count)
    assert total == expected


@pytest.mark.parametrize("kwargs,error,fragment", [
    ({"method": "int4"}, ValueError, "method must be one of"),
    ({"method": "lora", "optimizer": "galore"}, ValueError, "use method='full'"),
    ({"method": "full", "optimizer": "apollo", "projection_rank": 0}, ValueError,
     "projection rank must be an integer >= 1"),
    ({"method": "full", "projection_rank": 8}, ValueError, "projection_rank applies to"),
    ({"optimizer": "sgd"}, ValueError, "optimizer must be one of"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
    ({"active_layers": [0, 9]}, ValueError, "out of range"),
    ({"lora_targets": ["nope"]}, ValueError, "name no linear layer"),
    ({"lora_targets": "q_proj"}, TypeError, "list of module names"),
    ({"dtype": torch.int8}, TypeError, "floating torch.dtype"),
    ({"active_layers": []}, ValueError, "nothing trains"),
    ({"surprise": 1}, TypeError, "unexpected keyword"),
])
def test_bad_input_is_a_clear_error(kwargs, error, fragment):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, vocab_size=256)
    args = dict(batch_size=2, seq_len=8, dtype=torch.float32)
    args.update(kwargs)
    with pytest.raises(error, match=fragment):
        estimate_peak_memory(config, **args)


def test_config_must_be_a_pretrained_config():
    with pytest.raises(TypeError, match="PretrainedConfig"):
        estimate_peak_memory({"hidden_size": 4}, batch_size=1, seq_len=1)


@functools.cache
def _small_planner() -> MemoryPlanner:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, vocab_size=256)
    return MemoryPlanner(config, batch_size=2, seq_len=32, dtype=torch.float32)


@given(st.sets(st.integers(0, 5), min_size=1), st.integers(0, 5),
       st.sets(st.integers(0, 5)), st.booleans())
def test_training_one_more_layer_never_needs_less(active, extra, checkpointed, cut):
    planner = _small_planner()
    kwargs = {"gradient_checkpointing": sorted(checkpointed), "cut_backward": cut}
    less = planner.estimate(sorted(active), **kwargs)
    more = planner.estimate(sorted(active | {extra}), **kwargs)
    assert more.peak_bytes >= less.peak_bytes
    assert more.flops >= less.flops
    for est in (less, more):
        assert est.peak_bytes == sum(est.breakdown.values())
        assert min(est.breakdown.values()) >= 0


def test_a_tied_head_trains_the_shared_embedding():
    planner = MemoryPlanner(load_config("smollm2-135m"), batch_size=1, seq_len=16,
                            method="full")
    costs = planner.costs
    assert costs.head_bytes == 0  # tied: the head is the embedding
    est = planner.estimate([], train_head=True)
    assert est.breakdown["optimizer_state"] == 2 * (costs.embed_bytes + costs.norm_bytes)


def test_eager_attention_saves_the_probabilities():
    config = load_config("llama-2-7b")
    sdpa = MemoryPlanner(config, batch_size=8, seq_len=512, lora_rank=32)
    eager = MemoryPlanner(config, batch_size=8, seq_len=512, lora_rank=32, attention="eager")
    extra = (eager.costs.blocks[(False, True)].saved_bytes
             - sdpa.costs.blocks[(False, True)].saved_bytes)
    # eager keeps the fp32 softmax output and the bf16 probabilities (8 x 32 x 512 x 512)
    # minus the flash kernel's log-sum-exp; the rest is the same
    assert extra >= 8 * 32 * 512 * 512 * (4 + 2) - 8 * 32 * 512 * 4 - 2**27


# GaLore / APOLLO (issue 24): the planner's rows against the real optimizers, accounted on CPU.
PROJECTED_CASES = [
    # (planner optimizer, rank, update_proj_gap, batch, seq): gap 1 recomputes the projectors
    # in every step (the step a budget must hold); (4, 64) peaks in the loss backward,
    # (1, 8) in the optimizer step
    ("galore", 16, 200, 4, 64), ("galore", 16, 200, 1, 8), ("galore", 16, 1, 1, 8),
    ("apollo", 16, 200, 1, 8), ("apollo", 16, 1, 1, 8),
    # a rank above the blocks' sides (64..256): apollo-torch's random projector is not
    # capped at min(m, n) as GaLore's SVD is (the planner capped it, 2.4 vs 1.1 MiB)
    ("apollo", 192, 200, 1, 8), ("apollo", 192, 1, 1, 8),
    ("apollo-mini", 1, 200, 4, 64), ("apollo-mini", 1, 1, 1, 8),
]


def _projected_optimizer(name, model, rank, gap, params=None):
    """The optimizer the HF Trainer builds for optim="galore_adamw" / "apollo_adamw" with
    optim_target_modules the blocks' linear layers: their weights projected, the rest plain
    (``params``: only these of the model's parameters, for the layer-wise set-up)."""
    keep = None if params is None else {id(p) for p in params}
    named = [(n, p) for n, p in model.named_parameters() if keep is None or id(p) in keep]
    target = [p for n, p in named if ".layers." in n and p.dim() == 2]
    ids = {id(p) for p in target}
    other = [p for _, p in named if id(p) not in ids]
    if name == "galore":
        from galore_torch import GaLoreAdamW as cls

        settings = {"rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}
    else:
        from apollo_torch import APOLLOAdamW as cls

        mini = name == "apollo-mini"
        settings = {"rank": rank, "update_proj_gap": gap, "scale": 128.0 if mini else 1.0,
                    "proj_type": "std", "proj": "random",
                    "scale_type": "tensor" if mini else "channel"}
    groups = ([{"params": other}] if other else []) + \
        ([{"params": target, **settings}] if target else [])
    return cls(groups, lr=1e-4)


@pytest.mark.parametrize("name,rank,gap,batch,seq", PROJECTED_CASES)
def test_projected_optimizers_match_an_accounted_cpu_run(name, rank, gap, batch, seq):
    pytest.importorskip("galore_torch" if name == "galore" else "apollo_torch")
    from transformers import LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    opt = _projected_optimizer(name, model, rank, gap)
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    held = {}

    def step():
        held["out"] = model(input_ids=ids, labels=ids)
        held["out"].loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    measured = account_step(step, model=model, optimizer=opt)
    est = estimate_peak_memory(config, batch_size=batch, seq_len=seq, dtype=torch.float32,
                               method="full", optimizer=name, projection_rank=rank,
                               foreach=False, train_embeddings=True, train_head=True,
                               projection_update=gap == 1)
    assert est.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.02), est.phase
    assert est.breakdown["gradients"] == pytest.approx(measured.breakdown["gradients"],
                                                       abs=1024)
    if gap > 1:  # between updates the state is exact (moments, projectors, APOLLO's norms)
        assert est.breakdown["optimizer_state"] == measured.breakdown["optimizer_state"]


def test_projected_state_by_hand():
    """Llama block: q, k, v, o, gate, up, down projected to rank r, the two norms plain."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    common = dict(batch_size=1, seq_len=8, dtype=torch.bfloat16, method="full")
    r = 8
    # (m, n) = (out, in); m >= n: moments m x r, projector r x n; else r x n and m x r
    matrices = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    moments = sum(m * r if m >= n else r * n for m, n in matrices)
    projectors = sum(r * n if m >= n else m * r for m, n in matrices)
    norms = 2 * 64
    galore = MemoryPlanner(config, optimizer="galore", projection_rank=r, **common)
    apollo = MemoryPlanner(config, optimizer="apollo", projection_rank=r, **common)
    assert galore.estimate().breakdown["optimizer_state"] == 2 * 2 * (
        2 * moments + projectors + 2 * norms)
    assert apollo.estimate().breakdown["optimizer_state"] == 2 * 2 * (
        2 * moments + projectors + 2 * norms + 7)  # + one 0-d norm per projected matrix
    adamw = MemoryPlanner(config, **common).estimate()
    assert galore.estimate().peak_bytes < adamw.peak_bytes
    assert galore.estimate().breakdown["gradients"] == adamw.breakdown["gradients"]  # full rank


class _States:
    """The per-parameter optimizers of a layer-wise set-up, seen as one ``state``."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def state(self):
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}


@pytest.mark.parametrize("name,rank,batch,seq", [
    ("galore-layerwise", 16, 1, 8), ("apollo-mini-layerwise", 1, 1, 8),
    ("apollo-layerwise", 16, 4, 64)])
def test_layerwise_projected_optimizers_match_an_accounted_cpu_run(name, rank, batch, seq):
    """optim="galore_adamw_layerwise" / "apollo_adamw_layerwise" as the HF Trainer builds
    them: one optimizer per parameter, stepped in its post-accumulate-grad hook, which frees
    the gradient (projectors recomputed in every step: update_proj_gap=1)."""
    pytest.importorskip("galore_torch" if name.startswith("galore") else "apollo_torch")
    from transformers import LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    kind = name.removesuffix("-layerwise")
    optimizers = {p: _projected_optimizer(kind, model, rank, 1, params=[p])
                  for p in model.parameters()}

    def hook(p):
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    held = {}

    def step():
        held["out"] = model(input_ids=ids, labels=ids)
        held["out"].loss.backward()

    step()
    measured = account_step(step, model=model, optimizer=_States(list(optimizers.values())))
    est = estimate_peak_memory(config, batch_size=batch, seq_len=seq, dtype=torch.float32,
                               method="full", optimizer=name, projection_rank=rank,
                               foreach=False, train_embeddings=True, train_head=True)
    assert est.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.02), est.phase
    assert est.breakdown["gradients"] == 0
    assert est.breakdown["optimizer_state"] == measured.breakdown["optimizer_state"]


@given(st.integers(1, 2**20), st.sampled_from([32, 64, 128, 256]))
def test_quantized_weight_bytes_formula(numel, blocksize):
    from ist_optim.memory.quantized import QuantSpec, quantized_weight_bytes

    blocks = -(-numel // blocksize)
    plain = quantized_weight_bytes(numel, QuantSpec(blocksize=blocksize))
    nested = quantized_weight_bytes(numel, QuantSpec(double_quant=True, blocksize=blocksize))
    assert plain == -(-numel // 2) + 4 * 16 + 4 * blocks
    assert nested == -(-numel // 2) + 4 * 16 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4
    if blocks >= 400:  # past the nested code's 1 KiB, 8-bit scales win
        assert nested < plain


_SHAPES = st.lists(st.tuples(st.integers(1, 96), st.integers(1, 96)), min_size=1, max_size=5)


@given(_SHAPES, st.integers(1, 64), st.sampled_from(["galore", "apollo"]),
       st.sampled_from([2, 4]), st.booleans())
def test_projected_state_closed_form(shapes, rank, kind, element, update):
    from ist_optim.memory.projection import ProjectionSpec, projected_step

    spec = ProjectionSpec(kind, rank)
    targets = [True] * len(shapes)
    state, peak = projected_step(shapes, targets, element, spec, update)
    expected = 0
    for m, n in shapes:
        r = min(rank, m, n) if kind == "galore" else rank  # APOLLO: a random projector, uncapped
        moments = m * r if m >= n else r * n
        projector = r * n if m >= n else m * r
        if kind == "galore" and element == 4:  # a view of the whole SVD factor
            projector = min(m, n) * (n if m >= n else m)
        expected += element * (2 * moments + projector) + (element if kind == "apollo" else 0)
    assert state == expected
    # at least the two full-size buffers of the largest matrix's update (GaLore's
    # project_back and its scaled copy; APOLLO's scaled gradient and its limited copy)
    assert peak >= 2 * element * max(m * n for m, n in shapes)
    plain_state, _ = projected_step(shapes, [False] * len(shapes), element, spec, update)
    assert plain_state == 2 * element * sum(m * n for m, n in shapes)


def test_measuring_a_model_leaves_the_global_rng_alone():
    """The planner builds models to measure (on meta, and a tiny one on the CPU for the
    attention mask): their random initialisation must not draw from the global RNG."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    state = torch.random.get_rng_state()
    MemoryPlanner(config, batch_size=2, seq_len=16, dtype=torch.float32)
    assert torch.equal(state, torch.random.get_rng_state())


def test_a_config_with_a_padding_token_beyond_a_tiny_vocabulary():
    """The planner's tiny copy of the model (for the attention mask) keeps the special
    tokens' ids valid: a pad token id 3 crashed it with "Padding_idx must be within
    num_embeddings" (found by the axolotl integration test)."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32,
                         pad_token_id=3, bos_token_id=1, eos_token_id=[2, 30])
    planner = MemoryPlanner(config, batch_size=2, seq_len=16, dtype=torch.float32)
    assert planner.estimate([1]).peak_bytes > 0
