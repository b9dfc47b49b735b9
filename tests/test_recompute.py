"""``BlockCheckpointer`` (ist_optim/core/recompute.py): checkpointing switched per block and
per step, for plain modules and transformers decoder layers, and given back on remove()."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from ist_optim.core.recompute import BlockCheckpointer, _CheckpointedForward, is_checkpoint_managed


class Counting(nn.Module):
    """A block that counts its forward calls (a recomputation calls it again)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.fc(x)) * scale


def _run(blocks: list[Counting]) -> torch.Tensor:
    x = torch.ones(2, 4, requires_grad=True)
    for block in blocks:
        x = block(x, scale=2.0)
    x.sum().backward()
    return x.detach()


def test_exactly_the_set_blocks_are_recomputed_and_the_result_is_unchanged():
    torch.manual_seed(0)
    blocks = [Counting() for _ in range(3)]
    reference = _run(blocks)
    grads = [b.fc.weight.grad.clone() for b in blocks]
    for b in blocks:
        b.calls, b.fc.weight.grad = 0, None
    ckpt = BlockCheckpointer(blocks)
    ckpt.set([2, 0])
    assert ckpt.checkpointed == [0, 2]
    assert torch.equal(_run(blocks), reference)
    assert [b.calls for b in blocks] == [2, 1, 2]  # forward, and again in backward
    for b, g in zip(blocks, grads, strict=True):
        assert torch.allclose(b.fc.weight.grad, g)
    ckpt.set([1])
    for b in blocks:
        b.calls = 0
    _run(blocks)
    assert [b.calls for b in blocks] == [1, 2, 1]


def test_no_recomputation_without_grad_or_in_eval_mode():
    block = Counting()
    ckpt = BlockCheckpointer([block])
    ckpt.set([0])
    with torch.no_grad():
        block(torch.ones(1, 4))
    block.eval()
    block(torch.ones(1, 4, requires_grad=True)).sum().backward()
    assert block.calls == 2
    ckpt.remove()


def test_remove_gives_back_the_forward_and_the_management():
    block = Counting()
    own = block.__dict__.get("forward")
    ckpt = BlockCheckpointer([block])
    assert is_checkpoint_managed(block) and not ckpt.took_over
    ckpt.set([0])
    assert "forward" in block.__dict__
    ckpt.remove()
    assert block.__dict__.get("forward") is own and not is_checkpoint_managed(block)
    assert ckpt.checkpointed == []


def test_a_block_checkpointed_before_is_reported_as_taken_over():
    block = Counting()
    BlockCheckpointer([block]).set([0])
    assert BlockCheckpointer([block]).took_over
    assert not BlockCheckpointer([Counting()]).took_over


def test_changes_made_elsewhere_are_seen():
    blocks = [Counting() for _ in range(2)]
    ckpt = BlockCheckpointer(blocks)
    ckpt.set([1])
    assert not ckpt.changed_elsewhere()
    del blocks[1].forward  # someone put the block's own forward back
    assert ckpt.changed_elsewhere()
    ckpt.set([1])
    assert not ckpt.changed_elsewhere()


def test_transformers_layers_use_their_own_switch():
    model = tiny_llama(3)
    layers = list(model.model.layers)
    ckpt = BlockCheckpointer(layers)
    ckpt.set([1])
    assert [bool(layer.gradient_checkpointing) for layer in layers] == [False, True, False]
    assert all("forward" not in layer.__dict__ for layer in layers)
    model.gradient_checkpointing_enable()  # the Trainer's switch turns every layer on
    assert ckpt.changed_elsewhere()
    ckpt.set([1])
    assert not ckpt.changed_elsewhere()
    ckpt.remove()
    assert not is_checkpoint_managed(layers[0])


def test_an_index_that_is_not_a_block_is_refused():
    ckpt = BlockCheckpointer([Counting()])
    with pytest.raises(ValueError, match=r"blocks \[1\] out of range: there are 1 blocks"):
        ckpt.set([1])


def test_a_checkpointer_that_takes_over_can_turn_the_earlier_wrappers_off():
    """A second checkpointer over blocks another one wrapped (an earlier optimizer with
    memory_budget, not closed) decides alone: set([]) checkpoints nothing, and remove()
    gives back the earlier wrappers."""
    blocks = [torch.nn.Linear(2, 2) for _ in range(2)]
    first = BlockCheckpointer(blocks)
    first.set([0, 1])
    earlier = [b.__dict__["forward"] for b in blocks]
    second = BlockCheckpointer(blocks)
    assert second.took_over
    second.set([])
    assert all("forward" not in b.__dict__ for b in blocks)  # the class's own forward
    assert not second.changed_elsewhere()
    second.set([0])
    assert isinstance(blocks[0].__dict__["forward"], _CheckpointedForward)
    assert "forward" not in blocks[1].__dict__
    second.remove()
    assert [b.__dict__["forward"] for b in blocks] == earlier


def test_unwrapping_keeps_a_forward_the_user_patched():
    block = torch.nn.Linear(2, 2)
    patched = block.forward
    block.forward = lambda x: patched(x) * 2  # the user's own forward
    own = block.__dict__["forward"]
    first = BlockCheckpointer([block])
    first.set([0])
    second = BlockCheckpointer([block])
    second.set([])
    assert block.__dict__["forward"] is own
