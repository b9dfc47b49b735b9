"""Backward skipping: no block below the lowest active layer runs backward."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import lm_batch, lora_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from ist_optim import BackwardCut, ISTOptimizer, reaches_trainable_parameter


def _blocks(model):
    return list(model.base_model.model.model.layers)


class BackwardCounter:
    """Counts, per block, backward passes that reach the block's output."""

    def __init__(self, blocks):
        self.counts = [0] * len(blocks)
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]

    def _hook(self, index):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda g: self.counts.__setitem__(index, self.counts[index] + 1))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _setup(checkpointing: str | None, active, train_embeddings=False):
    model = lora_model(6)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    model.enable_input_require_grads()
    model.train()
    embed = model.base_model.model.model.embed_tokens.weight
    embed.requires_grad_(train_embeddings)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        for n, p in block.named_parameters():
            p.requires_grad_("lora_" in n and i in active)
    return model, blocks


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_no_backward_below_the_lowest_active_layer(checkpointing):
    active = [3, 5]
    model, blocks = _setup(checkpointing, active)
    batch = lm_batch(seed=1)
    counter = BackwardCounter(blocks)
    model(**batch).loss.backward()
    assert counter.counts == [1] * 6  # without the cut, backward reaches every block
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    counter.counts = [0] * 6

    cut = BackwardCut(blocks, active, model=model)  # model: where transformers < 4.52 keeps
    model(**batch).loss.backward()                  # its checkpoint function
    assert counter.counts[:3] == [0, 0, 0] and counter.counts[3:] == [1, 1, 1]
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == reference.keys() and got
    for name, grad in reference.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7)
    cut.remove()
    counter.remove()


def test_no_cut_when_a_trained_parameter_lives_below():
    model, blocks = _setup(None, [4], train_embeddings=True)
    counter = BackwardCounter(blocks)
    cut = BackwardCut(blocks, [4])
    model(**lm_batch()).loss.backward()
    assert counter.counts == [1] * 6 and cut.cuts == 0
    assert model.base_model.model.model.embed_tokens.weight.grad is not None


def test_nothing_to_cut_without_forced_input_grads():
    model = lora_model(4)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        for n, p in block.named_parameters():
            p.requires_grad_("lora_" in n and i == 2)
    cut = BackwardCut(blocks, [2])
    counter = BackwardCounter(blocks)
    model(**lm_batch()).loss.backward()
    assert counter.counts == [0, 0, 1, 1] and cut.cuts == 0


def test_ist_optimizer_cuts_and_matches_uncut_training():
    results = []
    for skip in (True, False):
        model = lora_model(6)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=7, skip_backward=skip,
                           update_interval=2)
        counter = BackwardCounter(_blocks(model))
        below = 0
        for step in range(5):
            lowest = min(opt.active_layers)
            counter.counts = [0] * 6
            model(**lm_batch(seed=step)).loss.backward()
            below += sum(counter.counts[:lowest])
            opt.step()
            opt.zero_grad()
        results.append((below, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (below_cut, params_cut), (below_full, params_full) = results
    assert below_cut == 0 and below_full > 0
    for name in params_full:
        torch.testing.assert_close(params_cut[name], params_full[name], rtol=1e-5, atol=1e-6)


def test_handles_are_removable():
    model = lora_model(3)
    cut = BackwardCut(_blocks(model), [1])
    assert len(cut.handles) == 3
    cut.remove()
    assert not cut.handles
    assert all(not b._forward_pre_hooks for b in _blocks(model))


def test_reaches_trainable_parameter():
    w = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    x = torch.ones(2, requires_grad=True)
    assert reaches_trainable_parameter((w * 2).sum())
    assert not reaches_trainable_parameter((x * frozen).sum())
    assert reaches_trainable_parameter(w)
    assert not reaches_trainable_parameter(x)


# 9. cost: the backward cut walks the graph once per forward, not once per block ----------
def test_graph_walks_grow_linearly_with_depth_when_embeddings_train():
    def walked(num_layers):
        model = lora_model(num_layers, modules_to_save=["embed_tokens"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the outside group is large here
            opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0,
                               sampling="uniform", active_layers=1)
        opt.set_active_layers([num_layers - 1])  # the cut acts up to the top block
        model(**lm_batch()).loss.backward()
        cut = opt.activator.backward_cut
        assert cut is not None and cut.cuts == 0  # embeddings train: nothing may be cut
        return cut.nodes_walked

    small, large = walked(4), walked(16)
    # linear: 4x the blocks, about 4x the nodes; re-walking per block would be ~16x
    assert large <= 5 * small


# 10. every gradient-checkpointing mode users meet: the cut acts, the updates are those of
#     the same run without the cut ------------------------------------------------------
HF_MODES = {"default": None, "reentrant": {"use_reentrant": True},
            "non-reentrant": {"use_reentrant": False}}


def _enable_hf(model, mode):
    kwargs = HF_MODES[mode]
    if kwargs is None:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()  # what peft, TRL, axolotl and the Trainer do


def _ist_run(make_model, enable, *, skip, enable_after=False, steps=4, batch=lm_batch,
             **options):
    """Train IST for ``steps``; returns (backward passes below the lowest active layer per
    step, the final parameters, warnings raised)."""
    model, blocks = make_model()
    if not enable_after:
        enable(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=3, skip_backward=skip,
                           update_interval=2, **options)
        if enable_after:  # the HF Trainer enables checkpointing in train(), after the optimizer
            enable(model)
        counter = BackwardCounter(blocks)
        below = []
        for step in range(steps):
            lowest = min(opt.active_layers)
            counter.counts = [0] * len(blocks)
            model.train()
            model(**batch(seed=step)).loss.backward()
            below.append(sum(counter.counts[:lowest]))
            opt.step()
            opt.zero_grad()
    counter.remove()
    opt.close()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return below, params, [str(w.message) for w in caught]


def _hf_model():
    model = lora_model(6)
    return model, _blocks(model)


@pytest.mark.parametrize("enable_after", [False, True], ids=["before", "after"])
@pytest.mark.parametrize("mode", list(HF_MODES))
def test_every_hf_checkpointing_mode_cuts_and_updates_as_without_the_cut(mode, enable_after):
    """transformers 4.x to 5.17 checkpoint ``Module.__call__``, so the blocks' hooks run inside
    the checkpoint; reentrant (4.x's default, axolotl's) crashed there at the first backward.
    The cut now happens before the checkpoint, in every mode and whenever it is enabled."""
    def enable(model):
        _enable_hf(model, mode)

    cut_below, cut_params, cut_warnings = _ist_run(_hf_model, enable, skip=True,
                                                   enable_after=enable_after)
    full_below, full_params, _ = _ist_run(_hf_model, enable, skip=False,
                                          enable_after=enable_after)
    assert cut_below == [0, 0, 0, 0]
    assert sum(full_below) > 0  # without the cut, backward reaches the frozen blocks below
    assert not [w for w in cut_warnings if "backward cut" in w]
    for name, value in full_params.items():
        assert torch.equal(cut_params[name], value), name


class LoopModel(nn.Module):
    """A model whose own forward calls torch.utils.checkpoint around each block (no
    transformers): an embedding made to require grad, as ``enable_input_require_grads``
    does, then blocks, then a linear head."""

    def __init__(self, reentrant: bool | None, width: int = 8, depth: int = 5) -> None:
        super().__init__()
        gen = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh())
                                    for _ in range(depth))
        self.head = nn.Linear(width, 16)
        torch.random.set_rng_state(gen)
        self.embed.requires_grad_(False)
        self.head.requires_grad_(False)
        self.reentrant = reentrant

    def forward(self, input_ids, labels):
        hidden = self.embed(input_ids).requires_grad_(True)
        for block in self.blocks:
            if self.reentrant is None:
                hidden = block(hidden)
            else:
                hidden = checkpoint(block, hidden, use_reentrant=self.reentrant)
        logits = self.head(hidden)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return SimpleNamespace(loss=loss)


def _loop_model(reentrant):
    def make():
        model = LoopModel(reentrant)
        return model, list(model.blocks)
    return make


def _loop_batch(seed):
    ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_torch_checkpoint_called_by_the_model_in_either_mode(reentrant):
    """Non-reentrant: the hooks cut inside the checkpoint. Reentrant: nothing outside the
    model's own call can be reached, so backward still runs below (it crashed before with
    "none of output has requires_grad=True"); the updates are those without the cut and
    one warning names the fix."""
    def run(skip):
        return _ist_run(_loop_model(reentrant), lambda model: None, skip=skip,
                        batch=_loop_batch, layers="blocks", active_layers=2)

    cut_below, cut_params, cut_warnings = run(True)
    full_below, full_params, _ = run(False)
    assert sum(full_below) > 0
    notes = [w for w in cut_warnings if "backward cut cannot act" in w]
    if reentrant:
        assert cut_below == full_below and len(notes) == 1 and "use_reentrant=False" in notes[0]
    else:
        assert cut_below == [0, 0, 0, 0] and not notes
    for name, value in full_params.items():
        assert torch.equal(cut_params[name], value), name
