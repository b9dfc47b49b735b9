"""Estimation batches on their own: BatchCycler, BatchCapture, move_batch, default_loss_fn."""

from __future__ import annotations

from collections import OrderedDict, defaultdict, namedtuple
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

from ist_optim.importance.batches import (
    BatchCapture,
    BatchCycler,
    CapturedCall,
    LossFn,
    default_loss_fn,
    move_batch,
)

META = torch.device("meta")  # a device to move to on a CPU-only machine


# ------------------------------------------------------------------ BatchCycler
@given(length=st.integers(1, 7), offset=st.integers(0, 30), before=st.integers(0, 5),
       count=st.integers(1, 20))
def test_cycler_cycles_in_order_from_the_fast_forward_offset(length: int, offset: int,
                                                             before: int, count: int) -> None:
    batches = [f"b{i}" for i in range(length)]
    cycler = BatchCycler(batches)
    for _ in range(before):  # fast_forward positions from the start, whatever came before
        cycler.next()
    cycler.fast_forward(offset)
    assert cycler.seen == offset
    got = [cycler.next() for _ in range(count)]
    assert got == [batches[(offset + i) % length] for i in range(count)]
    assert cycler.seen == offset + count


@given(length=st.integers(1, 6), split=st.integers(0, 25), count=st.integers(1, 15))
def test_a_resumed_cycler_continues_where_the_first_stopped(length: int, split: int,
                                                            count: int) -> None:
    batches = list(range(length))
    first = BatchCycler(batches)
    for _ in range(split):
        first.next()
    resumed = BatchCycler(batches)
    resumed.fast_forward(first.seen)
    assert [resumed.next() for _ in range(count)] == [first.next() for _ in range(count)]


def test_cycler_restarts_a_dataloader_and_yields_its_batches_in_order() -> None:
    data = torch.arange(10.0).reshape(5, 2)
    loader = DataLoader(data, batch_size=2, shuffle=False)
    cycler = BatchCycler(loader)
    got = [cycler.next() for _ in range(7)]  # 3 batches per pass: 2 passes and one more
    expected = [data[0:2], data[2:4], data[4:5]] * 2 + [data[0:2]]
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert cycler.seen == 7


def test_cycler_starting_a_pass_leaves_the_global_rng_alone() -> None:
    loader = DataLoader(torch.arange(8.0), batch_size=2, shuffle=True)
    cycler = BatchCycler(loader)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    for _ in range(9):  # three new passes
        cycler.next()
    assert torch.equal(torch.random.get_rng_state(), state)
    # iterating the same loader directly does draw from the global RNG
    next(iter(loader))
    assert not torch.equal(torch.random.get_rng_state(), state)


def _gen() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize("one_shot", [iter([1, 2]), _gen(), map(int, "12")],
                         ids=["list_iterator", "generator", "map"])
def test_cycler_refuses_one_shot_iterators(one_shot: Iterator[Any]) -> None:
    with pytest.raises(TypeError, match="one-shot iterator"):
        BatchCycler(one_shot)


def test_cycler_of_no_batches_raises_a_clear_error() -> None:
    cycler = BatchCycler([])
    with pytest.raises(ValueError, match="importance_batches is empty"):
        cycler.next()
    assert cycler.seen == 0
    with pytest.raises(ValueError, match="importance_batches is empty"):
        BatchCycler([]).fast_forward(1)


class _Shrinking:
    """A re-iterable whose second pass is empty."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self) -> Iterator[str]:
        self.passes += 1
        return iter(["only"] if self.passes == 1 else [])


def test_cycler_raises_when_a_later_pass_is_empty() -> None:
    cycler = BatchCycler(_Shrinking())
    assert cycler.next() == "only"
    with pytest.raises(ValueError, match="empty"):
        cycler.next()
    assert cycler.seen == 1


# ------------------------------------------------------------------ BatchCapture
class _KwargsModel(nn.Module):
    """``model(**batch)`` with a loss (what the default loss_fn calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                num_items_in_batch: Any = None) -> dict[str, torch.Tensor]:
        out = self.linear(x).squeeze(-1)
        result = {"logits": out}
        if labels is not None:
            loss = (out - labels).pow(2).sum()
            result["loss"] = loss / (num_items_in_batch or out.numel())
        return result


def test_capture_keeps_a_reference_to_the_latest_call() -> None:
    model = _KwargsModel()
    capture = BatchCapture(model)
    assert capture.latest is None
    first = {"x": torch.ones(2, 3), "labels": torch.zeros(2)}
    second = {"x": torch.zeros(4, 3), "labels": torch.ones(4)}
    model(**first)
    model(**second)
    assert capture.latest is not None
    batch = capture.latest.as_batch()
    assert batch.keys() == second.keys()
    assert all(batch[k] is second[k] for k in second)  # no copy
    capture.remove()


def test_capture_leaves_out_num_items_in_batch() -> None:
    model = _KwargsModel()
    capture = BatchCapture(model)
    x, labels = torch.randn(4, 3), torch.randn(4)
    model(x=x, labels=labels, num_items_in_batch=100)
    assert capture.latest is not None
    assert set(capture.latest.kwargs) == {"x", "labels"}
    replayed = default_loss_fn(model, capture.latest)
    own = model(x=x, labels=labels)["loss"]
    assert torch.equal(replayed, own)  # the batch's own mean loss
    capture.remove()


def test_capture_as_batch_for_positional_and_mixed_calls() -> None:
    net = nn.Linear(3, 1)
    capture = BatchCapture(net)
    x = torch.ones(2, 3)
    net(x)
    assert capture.latest is not None and capture.latest.as_batch() is x
    capture.remove()

    model = _KwargsModel()
    capture = BatchCapture(model)
    labels = torch.zeros(2)
    model(x, labels=labels)
    latest = capture.latest
    assert isinstance(latest, CapturedCall)
    assert latest.as_batch() is latest  # neither a plain mapping nor a single argument
    assert latest.args[0] is x and latest.kwargs == {"labels": labels}
    capture.remove()


def test_capture_disabled_and_removed_capture_nothing() -> None:
    model = nn.Linear(3, 1)
    hooks = len(model._forward_pre_hooks)
    capture = BatchCapture(model)
    assert len(model._forward_pre_hooks) == hooks + 1
    a, b, c = torch.ones(1, 3), torch.zeros(1, 3), torch.full((1, 3), 2.0)
    model(a)
    capture.enabled = False
    model(b)
    assert capture.latest is not None and capture.latest.as_batch() is a
    capture.enabled = True
    capture.remove()
    assert len(model._forward_pre_hooks) == hooks
    model(c)
    assert capture.latest.as_batch() is a


# ------------------------------------------------------------------ move_batch
def test_move_batch_moves_nested_tensors_and_keeps_containers_and_the_rest() -> None:
    batch = {
        "ids": torch.ones(2, dtype=torch.long),
        "nested": [torch.zeros(1), (torch.ones(3), "text", 3)],
        "ordered": OrderedDict(a=torch.ones(1)),
        "none": None,
    }
    moved = move_batch(batch, META)
    assert type(moved) is dict and moved.keys() == batch.keys()
    assert moved["ids"].device == META and moved["ids"].dtype == torch.long
    assert moved["ids"].shape == (2,)
    assert type(moved["nested"]) is list and type(moved["nested"][1]) is tuple
    assert moved["nested"][0].device == META
    assert moved["nested"][1][0].device == META and moved["nested"][1][0].shape == (3,)
    assert moved["nested"][1][1:] == ("text", 3)
    assert type(moved["ordered"]) is OrderedDict and moved["ordered"]["a"].device == META
    assert moved["none"] is None
    # the input is not modified
    assert batch["ids"].device.type == "cpu" and batch["nested"][0].device.type == "cpu"


def test_move_batch_of_a_tensor_and_of_a_batch_encoding() -> None:
    assert move_batch(torch.ones(2), META).device == META
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": torch.ones(1, 4, dtype=torch.long)})
    moved = move_batch(encoding, META)
    assert isinstance(moved, transformers.BatchEncoding)
    assert moved["input_ids"].device == META


def test_move_batch_to_the_same_device_keeps_the_tensors() -> None:
    t = torch.ones(2)
    moved = move_batch({"t": t, "l": [t]}, torch.device("cpu"))
    assert moved["t"] is t and moved["l"][0] is t


Pair = namedtuple("Pair", ["inputs", "labels"])


def test_move_batch_moves_the_tensors_of_a_namedtuple() -> None:
    """It used to return a namedtuple unchanged (its tensors stayed where they were)."""
    moved = move_batch(Pair(torch.ones(2), torch.zeros(2)), META)
    assert isinstance(moved, Pair)
    assert moved.inputs.device == META and moved.labels.device == META


def test_move_batch_moves_a_defaultdict_batch() -> None:
    """It used to rebuild it as ``type(batch)(dict)``, which a defaultdict refuses."""
    batch: defaultdict[str, Any] = defaultdict(list, x=torch.ones(2))
    moved = move_batch(batch, META)
    assert moved["x"].device == META and batch["x"].device == torch.device("cpu")
    assert isinstance(moved, defaultdict) and moved.default_factory is list


# ------------------------------------------------------------------ default_loss_fn
class _OutputWithLoss:
    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss


class _AttrLossModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> _OutputWithLoss:
        return _OutputWithLoss(self.weight * x.sum() * scale)


def test_default_loss_fn_returns_model_of_the_batch_dot_loss() -> None:
    model = _AttrLossModel()
    x = torch.tensor([1.0, 2.0])
    loss = default_loss_fn(model, {"x": x, "scale": 3.0})
    assert loss.item() == pytest.approx(2.0 * 3.0 * 3.0)
    loss.backward()  # the graph is kept: it is the model's own loss tensor
    assert model.weight.grad is not None and model.weight.grad.item() == pytest.approx(9.0)
    fn: LossFn = default_loss_fn
    assert fn(model, {"x": x}).item() == pytest.approx(6.0)


def test_default_loss_fn_reads_a_loss_key_and_a_scalar_output() -> None:
    model = _KwargsModel()
    batch = {"x": torch.randn(3, 3), "labels": torch.randn(3)}
    assert torch.equal(default_loss_fn(model, batch), model(**batch)["loss"])

    class Scalar(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum()

    assert default_loss_fn(Scalar(), {"x": torch.ones(4)}).item() == 4.0


def test_default_loss_fn_replays_a_captured_call_as_it_was_made() -> None:
    model = _AttrLossModel()
    call = CapturedCall((torch.tensor([1.0, 1.0]),), {"scale": 5.0})
    assert default_loss_fn(model, call).item() == pytest.approx(2.0 * 2.0 * 5.0)


def test_default_loss_fn_errors() -> None:
    model = _KwargsModel()
    with pytest.raises(RuntimeError, match="no loss"):
        default_loss_fn(model, {"x": torch.ones(2, 3)})  # no labels: no loss
    with pytest.raises(TypeError, match="needs a mapping batch, got Tensor"):
        default_loss_fn(model, torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="no loss"):
        default_loss_fn(nn.Identity(), {"input": torch.ones(2)})  # not a scalar
