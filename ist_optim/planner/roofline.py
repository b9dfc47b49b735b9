"""Step time from the operators a step runs: each operator's FLOPs and bytes, priced.

The planner runs one block and the head on the ``meta`` device (:mod:`.blocks`); under
:class:`OpCounter` each operator they dispatch is recorded with its FLOPs (torch's own
formulas, :data:`torch.utils.flop_counter.flop_registry`) and the bytes it reads and
writes (its tensor arguments and results; views and allocations move nothing). A
:class:`Device` runs an operator in ``flops / flops_per_second + bytes /
bytes_per_second`` seconds: the two bounds of a roofline added, not their maximum (an
operator is not assumed to hide its memory traffic behind its arithmetic, which a large
matrix product nearly does and a thin one or an element-wise operator does not). Summed
over the operators of a step (:meth:`ist_optim.MemoryPlanner.step_time`), that is the
step's time on the device, without launch overheads; what the planner reports is that
time relative to another set-up's (checked against measured ratios in
docs/benchmarks.md, "Predicted step time", where the maximum is compared too).

Example:
    >>> device = Device("toy", flops_per_second=100.0, bytes_per_second=10.0)
    >>> ops = (OpCost(flops=1000, bytes=50), OpCost(flops=0, bytes=40))
    >>> seconds(ops, device)   # 1000 / 100 + 50 / 10, then 40 / 10
    19.0
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["DEVICES", "Device", "OpCost", "OpCounter", "seconds"]

#: Operators that move no data: they make a tensor without writing it, or alias one.
_NO_TRAFFIC = frozenset({
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
    "aten::new_empty_strided", "aten::detach", "aten::lift_fresh", "aten::alias",
    "aten::_unsafe_view", "aten::_local_scalar_dense", "profiler::_record_function_enter_new",
    "profiler::_record_function_exit"})


class OpCost(NamedTuple):
    """One operator: its FLOPs, the bytes it reads and writes, and whether it computes in
    float32 (or wider), which a GPU's tensor cores do not speed up."""

    flops: int
    bytes: int
    fp32: bool = False


class OpCounter(TorchDispatchMode):
    """Record every operator dispatched inside it as an :class:`OpCost` (:attr:`ops`).

    Works on the ``meta`` device (shapes are all it reads). FLOPs come from the formulas of
    :class:`torch.utils.flop_counter.FlopCounterMode` (and ``custom_mapping``, as there).

    Example:
        >>> a = torch.empty(64, 32, device="meta")
        >>> with OpCounter() as counter:
        ...     b = (a @ a.T).relu()
        >>> [(op.flops, op.bytes) for op in counter.ops]   # mm, then relu (the .T is a view)
        [(262144, 32768), (0, 32768)]
    """

    def __init__(self, custom_mapping: dict[Any, Any] | None = None) -> None:
        super().__init__()
        self._formulas = FlopCounterMode(display=False,
                                         custom_mapping=custom_mapping or {}).flop_registry
        self.ops: list[OpCost] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._schema.name in _NO_TRAFFIC:
            return out
        formula = self._formulas.get(func._overloadpacket)
        flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
        tensors = [t for t in tree_flatten((args, kwargs, out))[0]
                   if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        wide = any(t.dtype in (torch.float32, torch.float64) for t in outputs or tensors)
        self.ops.append(OpCost(flops, moved, wide))
        return out


@dataclass(frozen=True)
class Device:
    """How fast a device computes and moves data, for :func:`seconds`.

    Attributes:
        name: the device's name (a key of :data:`DEVICES`, or what :meth:`measure` was
            told).
        flops_per_second: dense matrix-product throughput in 16-bit types (tensor cores).
        bytes_per_second: memory bandwidth.
        fp32_flops_per_second: throughput of float32 products (None: as
            ``flops_per_second``, as on a CPU measured in float32).
    """

    name: str
    flops_per_second: float
    bytes_per_second: float
    fp32_flops_per_second: float | None = None

    def __post_init__(self) -> None:
        for field_name in ("flops_per_second", "bytes_per_second"):
            value = getattr(self, field_name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Invalid {field_name}: {value!r}; expected a rate > 0")

    def op_seconds(self, op: OpCost) -> float:
        """Seconds of one operator: its arithmetic, then its memory traffic."""
        rate = self.flops_per_second
        if op.fp32 and self.fp32_flops_per_second is not None:
            rate = self.fp32_flops_per_second
        return op.flops / rate + op.bytes / self.bytes_per_second

    @classmethod
    def measure(cls, name: str = "this machine", *, dtype: torch.dtype = torch.float32,
                size: int = 1024, repeats: int = 5) -> Device:
        """This process's CPU as a :class:`Device`: the best of ``repeats`` timings of a
        ``size x size`` matrix product in ``dtype`` (FLOPs/s) and of a 64 MiB copy
        (bytes read and written per second), with torch's current thread count.

        Example:
            >>> Device.measure(size=64, repeats=1).bytes_per_second > 0
            True
        """
        a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
        big = torch.empty(2**26 // 4, dtype=torch.float32)
        out = torch.empty_like(big)

        def best(run: Any) -> float:
            run()  # warm
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            return max(min(times), 1e-9)

        matmul = best(lambda: torch.mm(a, a))
        copy = best(lambda: out.copy_(big))
        return cls(name, flops_per_second=2 * size**3 / matmul,
                   bytes_per_second=2 * big.numel() * big.element_size() / copy)


#: Data-sheet rates of common training GPUs (dense, SXM): 16-bit tensor-core FLOPs/s,
#: float32 FLOPs/s (no TF32, torch's default for matrix products), HBM bytes/s.
DEVICES: dict[str, Device] = {
    "h100": Device("h100", 989e12, 3.35e12, 67e12),
    "h200": Device("h200", 989e12, 4.8e12, 67e12),
    "a100": Device("a100", 312e12, 2.039e12, 19.5e12),
}


def seconds(ops: Iterable[OpCost], device: Device) -> float:
    """Seconds ``device`` takes to run ``ops`` one after another (:meth:`Device.op_seconds`)."""
    return sum(device.op_seconds(op) for op in ops)
