"""torch.compile under IST: compile_blocks keeps the compile count bounded, the backward cut
and the training result unchanged; whole-model compiles are refused with the route to use.

Compiles use ``backend="aot_eager"``: guards, recompiles and requires_grad variants are
dynamo's and AOTAutograd's, the same for every backend, without inductor's C++ codegen
(tens of seconds per graph on CPU). python -m benchmarks.compile runs inductor.
"""

from __future__ import annotations

import tempfile
import warnings

import pytest
import torch
import torch._dynamo
from conftest import lm_batch, lora_model, tiny_llama
from test_backward import BackwardCounter
from torch._dynamo.utils import counters

from ist_optim import ISTOptimizer, compile_blocks, is_compiled_block

STEPS = 50


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _blocks(model):
    return list(model.base_model.model.model.layers)


def _train(model, opt, steps, on_step=None):
    for step in range(steps):
        model(**lm_batch(2, 8, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step + 1)


def _compiled_ist(update_interval: int):
    """A fresh dynamo cache and counters, a 4-layer LoRA Llama, its ISTOptimizer, blocks
    compiled with aot_eager (inductor's guards without the C++ build)."""
    torch._dynamo.reset()
    counters.clear()
    model = lora_model(4)
    model.config.use_cache = False
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0,
                       update_interval=update_interval)
    compile_blocks(opt, backend="aot_eager")
    return model, opt


@pytest.fixture(scope="module")
def compiled_run():
    """50 IST steps (paper sampling and importance rounds) with compiled blocks, beside the
    same 50 steps in eager mode; the recompile limit is lifted so that a storm would show
    as a growing count instead of a silent fallback to eager."""
    model, opt = _compiled_ist(update_interval=10)
    graphs = {}
    # torch 2.7 renamed cache_size_limit to recompile_limit
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") \
        else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 1000}):
        _train(model, opt, STEPS, lambda s: graphs.__setitem__(s, _graphs()))
    eager = lora_model(4)
    eager.config.use_cache = False
    eager_opt = ISTOptimizer(torch.optim.AdamW, eager, lr=1e-2, seed=0, update_interval=10)
    _train(eager, eager_opt, STEPS)
    yield {"graphs": graphs, "model": model, "opt": opt, "eager": eager,
           "eager_opt": eager_opt}
    torch._dynamo.reset()


def test_compile_count_is_bounded_and_does_not_grow(compiled_run):
    graphs = compiled_run["graphs"]
    assert graphs[1] >= 1  # the blocks did compile
    # adapters frozen/trained x input requiring grad or not x grad mode: at most 8
    assert graphs[25] == graphs[STEPS] <= 8, graphs
    assert compiled_run["opt"].last_round is not None  # rounds (no-grad, eval) ran too


def test_compiled_training_matches_eager(compiled_run):
    assert compiled_run["opt"].active_layers == compiled_run["eager_opt"].active_layers
    compiled = dict(compiled_run["model"].named_parameters())
    for name, param in compiled_run["eager"].named_parameters():
        torch.testing.assert_close(compiled[name], param, rtol=1e-4, atol=1e-5)


def test_backward_cut_holds_with_compiled_blocks():
    torch._dynamo.reset()
    counters.clear()
    model = lora_model(6)
    model.config.use_cache = False
    model.enable_input_require_grads()  # forces backward through every block without a cut
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=3, sampling="uniform")
    compile_blocks(opt, backend="aot_eager")
    counter = BackwardCounter(_blocks(model))
    below, above = 0, 0
    for step in range(6):
        lowest = min(opt.active_layers)
        counter.counts = [0] * 6
        model(**lm_batch(seed=step)).loss.backward()
        below += sum(counter.counts[:lowest])
        above += sum(counter.counts[lowest:])
        opt.step()
        opt.zero_grad()
    counter.remove()
    assert _graphs() >= 1 and below == 0 and above > 0
    torch._dynamo.reset()


def test_trainer_runs_with_compiled_blocks():
    from transformers import Trainer, TrainingArguments

    from ist_optim.integrations import add_ist_callback

    model, opt = _compiled_ist(update_interval=2)
    data = [{k: v[0] for k, v in lm_batch(1, 8, seed=i).items()} for i in range(8)]
    args = TrainingArguments(tempfile.mkdtemp(), max_steps=6, per_device_train_batch_size=2,
                             use_cpu=True, report_to=[], disable_tqdm=True,
                             save_strategy="no", logging_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    add_ist_callback(trainer, log_layers=False)
    trainer.train()
    assert opt.num_steps == 6 and 1 <= _graphs() <= 8
    torch._dynamo.reset()


def test_trainer_torch_compile_is_refused_with_the_route():
    from transformers import Trainer, TrainingArguments

    from ist_optim.integrations import ISTCallback, add_ist_callback

    model = lora_model(2)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, sampling="uniform")
    args = TrainingArguments(tempfile.mkdtemp(), max_steps=1, use_cpu=True, report_to=[],
                             disable_tqdm=True, save_strategy="no", torch_compile=True)
    data = [{k: v[0] for k, v in lm_batch(1, 8).items()}]
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    with pytest.raises(ValueError, match=r"torch_compile=False.*compile_blocks"):
        add_ist_callback(trainer)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                      callbacks=[ISTCallback()])
    with pytest.raises(ValueError, match="compile_blocks"):
        trainer.train()
    torch._dynamo.reset()


def test_whole_model_compile_is_refused_unless_requires_grad_is_static():
    model = lora_model(2)
    with pytest.raises(ValueError, match=r"compiled as a whole.*compile_blocks"):
        ISTOptimizer(torch.optim.AdamW, torch.compile(model), lr=1e-2)
    ISTOptimizer(torch.optim.AdamW, torch.compile(model), lr=1e-2, freeze_inactive=False)
    with pytest.raises(ValueError, match="compiled as a whole"):
        compile_blocks(torch.compile(model))


@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_whole_model_compiled_after_construction_is_caught_at_the_next_step(how):
    """The order most scripts use: optimizer first, then torch.compile(model). The step
    raises before it changes anything, naming compile_blocks."""
    model = lora_model(2)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    if how == "torch.compile":
        compiled = torch.compile(model, backend="aot_eager")
    else:
        model.compile(backend="aot_eager")
        compiled = model
    compiled(**lm_batch(2, 8)).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"compiled as a whole.*after the ISTOptimizer.*"
                                           r"compile_blocks"):
        opt.step()
    assert opt.num_steps == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    torch._dynamo.reset()


def test_eager_and_compiled_blocks_are_not_mistaken_for_a_whole_model_compile():
    model = lora_model(2)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    with pytest.warns(UserWarning, match="use_cache = False"):
        compile_blocks(opt, backend="aot_eager")
    _train(model, opt, 2)
    assert opt.num_steps == 2
    opt.close()
    assert not model._forward_pre_hooks  # the guard's hook is removed with the others
    torch._dynamo.reset()


def test_compile_blocks_binds_one_compiled_forward_and_is_idempotent():
    model = lora_model(3)
    with pytest.warns(UserWarning, match="use_cache = False"):
        blocks = compile_blocks(model, backend="aot_eager")
    assert model.config.use_cache is False
    assert blocks == _blocks(model) and all(is_compiled_block(b) for b in blocks)
    functions = {b.forward.__func__ for b in blocks}
    assert len(functions) == 1  # one compiled function (one cache) for every block
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compile_blocks(model, backend="aot_eager") == blocks
    assert {b.forward.__func__ for b in blocks} == functions
    assert not is_compiled_block(lora_model(1).base_model.model.model.layers[0])


def test_compile_blocks_refuses_what_cannot_work():
    with pytest.raises(TypeError, match="model or an ISTOptimizer"):
        compile_blocks("model")
    with pytest.raises(TypeError, match="model or an ISTOptimizer"):
        compile_blocks(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    model = lora_model(2)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, estimator="first-order")
    with pytest.raises(ValueError, match=r"submodule .*lora_B.*estimator='normalized'"):
        compile_blocks(opt)
    model = lora_model(2)
    with pytest.warns(UserWarning, match="use_cache"):
        compile_blocks(model)
    with pytest.raises(ValueError, match=r"compile_blocks; estimator='first-order'"):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, estimator="first-order")
    model = lora_model(2)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        compile_blocks(model)
    model = lora_model(2)
    block = _blocks(model)[1]
    block.forward = block.forward  # an instance attribute, as accelerate's hooks set
    with pytest.raises(ValueError, match="block 1 .* own `forward`"):
        compile_blocks(model)
    assert not any(is_compiled_block(b) for b in _blocks(model))  # nothing half-done


def test_compiled_blocks_and_memory_budget_refuse_each_other():
    """memory_budget switches blocks' checkpointing per step; compiled blocks cannot follow
    (torch 2.13 fails on checkpointed blocks that record no graph). Either order is refused
    with the way out, and nothing is left half-done."""
    model = lora_model(3)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, sampling="uniform", seed=0,
                       memory_budget="1GiB", memory_shape=(2, 8))
    with pytest.raises(ValueError, match="block 0 .* memory_budget; .* drop memory_budget"):
        compile_blocks(opt)
    with pytest.raises(ValueError, match="memory_budget"):
        compile_blocks(model)  # the model route too: the blocks know who manages them
    assert not any(is_compiled_block(b) for b in _blocks(model))
    opt.close()  # gives the blocks back: now they compile
    with pytest.warns(UserWarning, match="use_cache"):
        compile_blocks(model, backend="aot_eager")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"compiled blocks \(blocks \[0, 1, 2\] went through"):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, sampling="uniform", seed=0,
                     memory_budget="1GiB", memory_shape=(2, 8))
    assert [p.requires_grad for p in model.parameters()] == flags


def test_a_failed_construction_lets_go_of_the_budget_blocks():
    model = tiny_llama(2)  # no adapters: the rounds refuse suppression_mode="adapters"
    with pytest.raises(ValueError, match="needs peft tuner layers"):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, memory_budget="1GiB",
                     memory_shape=(2, 8), suppression_mode="adapters")
    with pytest.warns(UserWarning, match="use_cache"):
        compile_blocks(model, backend="aot_eager")  # not held by the failed optimizer
