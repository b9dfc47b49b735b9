"""Optimizer-state residency: where the state of layers outside the active set lives.

Policies:

* ``"keep"``: state of every visited layer stays in the inner optimizer (the paper's
  behaviour; memory grows to the state of all layers).
* ``"offload"``: when a layer leaves the active set, its per-parameter state is taken out of
  the inner optimizer and moved to host memory (pinned on CUDA); it is moved back, tensor
  for tensor and bit for bit, when the layer is drawn again. On CUDA both directions run on
  a side stream and overlap the next forward/backward; the step waits for them.
* ``"drop"``: the state is deleted (like BAdam). A re-activated layer starts fresh: Adam
  moments are zero and its per-parameter ``step`` restarts at 0, so bias correction starts
  over for that layer.

Only the state of IST layers moves; the outside group (embeddings, heads) always keeps its
state. Every tensor of a parameter's state moves (bitsandbytes' quantization maps and
absmax tensors included); non-tensor entries are kept as they are. Paged bitsandbytes
optimizers manage their own paging and are refused for ``"offload"``/``"drop"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim import Optimizer

from ..config import STATE_POLICIES, StatePolicy

__all__ = ["STATE_POLICIES", "StateResidency", "resolve_state_policy", "state_bytes"]

BATCHED_COPY_BYTES = 1 << 20
"""State tensors smaller than this (per layer, device and dtype) are copied to and from
host memory together, in one copy; larger ones are copied one by one."""


def state_bytes(state: Iterable[dict[str, Any]]) -> int:
    """Bytes of every tensor in an iterable of per-parameter state dicts."""
    return sum(v.numel() * v.element_size() for entry in state for v in entry.values()
               if isinstance(v, torch.Tensor))


def resolve_state_policy(policy: StatePolicy | None, optimizer: Optimizer,
                         device: torch.device, *, sharded: bool = False) -> StatePolicy:
    """The state policy an optimizer uses: the user's ``policy``, else the default.

    The default is ``"offload"`` on CUDA and ``"keep"`` elsewhere (offloading to host
    memory from the host gains nothing); ``"keep"`` for a paged bitsandbytes ``optimizer``
    (it pages its own state, and refuses ``"offload"``) and for ``sharded`` (FSDP2
    DTensor) parameters on CUDA, whose state is already sharded across the ranks and
    whose placement pinned host copies would lose; an explicit ``"offload"`` is refused
    there. On the CPU "offload" moves nothing and works.

    Raises:
        ValueError: for ``"offload"`` with sharded parameters on CUDA.

    Example:
        >>> adam = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])
        >>> cuda, cpu = torch.device("cuda"), torch.device("cpu")
        >>> resolve_state_policy(None, adam, cuda), resolve_state_policy(None, adam, cpu)
        ('offload', 'keep')
        >>> resolve_state_policy(None, adam, cuda, sharded=True)
        'keep'
    """
    on_cuda = device.type == "cuda"
    if sharded and on_cuda and policy == "offload":
        raise ValueError(
            "state_policy='offload' does not support FSDP2 (DTensor) parameters on CUDA: its "
            "pinned host copies are plain tensors and lose the shard's placement. Use "
            "state_policy='keep' (the default here; FSDP2 already shards the state across "
            "ranks) or 'drop'"
        )
    if policy is not None:
        return policy
    if getattr(optimizer, "is_paged", False) or (sharded and on_cuda):
        return "keep"
    return "offload" if on_cuda else "keep"


class StateResidency:
    """Moves or drops the inner optimizer's per-parameter state as layers change.

    Args:
        optimizer: the inner optimizer, whose ``state`` is keyed by parameter.
        policy: ``"keep"``, ``"offload"`` or ``"drop"``.

    Raises:
        ValueError: for an unknown policy, or ``"offload"``/``"drop"`` with a paged
            bitsandbytes optimizer.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(3); opt.step()
        >>> res = StateResidency(opt, "offload")
        >>> res.deactivate([p]); p in opt.state, res.offloaded_bytes() > 0
        (False, True)
        >>> res.activate([p]); p in opt.state
        True
    """

    def __init__(self, optimizer: Optimizer, policy: StatePolicy):
        if policy not in STATE_POLICIES:
            raise ValueError(f"Invalid state_policy: {policy!r}; expected one of {STATE_POLICIES}")
        if policy != "keep" and getattr(optimizer, "is_paged", False):
            raise ValueError(
                f"state_policy={policy!r} cannot be used with the paged optimizer "
                f"{type(optimizer).__name__}: it pages its own state buffers, which are not "
                "released by moving or dropping them. Use state_policy='keep', or a non-paged "
                "optimizer such as bitsandbytes.optim.AdamW8bit."
            )
        self.optimizer = optimizer
        self.policy: StatePolicy = policy
        # param -> {key: (value on host, device it came from or None for non-tensors)}
        self._store: dict[torch.Tensor, dict[str, Any]] = {}
        # param -> the batch of one deactivate() call it was offloaded with (CUDA only):
        # {"params": set of params, "flats": [(host flat buffer, device, [(param, key,
        # offset, shape)])]}; a batch that comes back whole needs one copy per flat buffer
        self._batch_of: dict[torch.Tensor, dict[str, Any]] = {}
        self._streams: dict[torch.device, Any] = {}
        self._pending: list[tuple[torch.device, Any]] = []  # events of copies in flight

    # ------------------------------------------------------------------ transitions
    def deactivate(self, params: Iterable[torch.Tensor]) -> None:
        """Take the state of ``params`` out of the optimizer (offload or drop it).

        Pass one layer's parameters per call: on CUDA their state tensors are copied to
        host memory with one copy per (device, dtype), and come back the same way.
        """
        if self.policy == "keep":
            return
        params = list(params)
        # stored first, popped last: an interrupt in between leaves the state in both places
        # (the next deactivate stores it again), never in neither
        entries = [(p, entry) for p in params if (entry := self.optimizer.state.get(p))]
        if entries and self.policy == "offload":
            self._offload(entries)
            self._record_streams()
        for p in params:
            self.optimizer.state.pop(p, None)

    def _offload(self, entries: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        on_cuda: dict[tuple[torch.device, torch.dtype], list] = {}
        for p, entry in entries:
            stored = self._store.setdefault(p, {})
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                    on_cuda.setdefault((value.device, value.dtype), []).append((p, key, value))
                elif isinstance(value, torch.Tensor):
                    stored[key] = (value, value.device)  # host memory already
                else:
                    stored[key] = (value, None)
        if not on_cuda:
            return
        batch: dict[str, Any] = {"params": {p for p, _ in entries}, "flats": []}
        for device in {device for device, _ in on_cuda}:
            self._side_stream(device).wait_stream(torch.cuda.current_stream(device))
        for (device, dtype), items in on_cuda.items():
            # small tensors travel together (one copy); a large one alone, so that no
            # device buffer of the layer's whole state is ever allocated for the copy
            small = [item for item in items
                     if item[2].numel() * item[2].element_size() < BATCHED_COPY_BYTES]
            chunks = [small] if small else []
            chunks += [[item] for item in items
                       if item[2].numel() * item[2].element_size() >= BATCHED_COPY_BYTES]
            for chunk in chunks:
                batch["flats"].append(self._copy_out(chunk, device, dtype))
        for p in batch["params"]:
            self._batch_of[p] = batch

    def _copy_out(self, chunk: list, device: torch.device, dtype: torch.dtype) -> tuple:
        """One pinned host buffer and one copy for the state tensors of ``chunk``."""
        stream = self._side_stream(device)
        total = sum(value.numel() for _, _, value in chunk)
        with torch.cuda.stream(stream):
            host = torch.empty(total, dtype=dtype, pin_memory=True)
            if len(chunk) == 1:
                flat = chunk[0][2].reshape(-1)
            else:
                flat = torch.cat([value.reshape(-1) for _, _, value in chunk])
            host.copy_(flat, non_blocking=True)
        layout, offset = [], 0
        for p, key, value in chunk:
            value.record_stream(stream)  # keep the device buffer alive until copied
            self._store[p][key] = (host[offset:offset + value.numel()].view(value.shape), device)
            layout.append((p, key, offset, value.shape))
            offset += value.numel()
        return host, device, layout

    def activate(self, params: Iterable[torch.Tensor]) -> None:
        """Give offloaded state of ``params`` back to the optimizer, on its original device."""
        if self.policy != "offload":
            return
        wanted = [p for p in params if p in self._store]
        wanted_set = set(wanted)
        whole = []  # batches coming back complete: one copy per flat buffer
        for p in wanted:
            batch = self._batch_of.get(p)
            if (batch is not None and all(b is not batch for b in whole)
                    and batch["params"] <= wanted_set):
                whole.append(batch)
        restored: dict[torch.Tensor, dict[str, Any]] = {}
        for batch in whole:
            for host, device, layout in batch["flats"]:
                moved = self._to_device((host, device))
                for p, key, offset, shape in layout:
                    restored.setdefault(p, {})[key] = moved[offset:offset + shape.numel()
                                                            ].view(shape)
        for p in wanted:  # given back first, then forgotten (see deactivate)
            done = restored.get(p, {})
            self.optimizer.state[p] = {
                k: done[k] if k in done else self._to_device(v) for k, v in self._store[p].items()}
            del self._store[p]
            self._batch_of.pop(p, None)
        self._record_streams()

    def _side_stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _to_device(self, stored: tuple[Any, torch.device | None]) -> Any:
        value, device = stored
        if device is None or device == value.device:
            return value
        if device.type != "cuda":
            return value.to(device)
        stream = self._side_stream(device)
        with torch.cuda.stream(stream):
            moved = torch.empty(value.shape, dtype=value.dtype, device=device)
            moved.copy_(value, non_blocking=True)
        moved.record_stream(torch.cuda.current_stream(device))
        return moved

    def _record_streams(self) -> None:
        """One event per side stream used, marking the end of the copies just issued."""
        for device, stream in self._streams.items():
            event = torch.cuda.Event()
            event.record(stream)
            self._pending.append((device, event))

    def wait(self) -> None:
        """Make the current CUDA stream wait for copies in flight (before the update)."""
        for device, event in self._pending:
            torch.cuda.current_stream(device).wait_event(event)
        self._pending.clear()

    def synchronize(self) -> None:
        """Block the host until every copy in flight is done (before reading state)."""
        for _device, event in self._pending:
            event.synchronize()
        self._pending.clear()

    # ------------------------------------------------------------------ accounting / io
    @contextmanager
    def full_state(self) -> Iterator[Optimizer]:
        """The inner optimizer with every offloaded state entry put back, for reading
        (``state_dict()``, the DCP helpers, ``memory_report()``).

        Inside the context ``optimizer.state`` holds the state of every layer (offloaded
        entries as their host tensors); on exit the offloaded entries leave it again.

        Example:
            >>> import torch
            >>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.Adam([p])
            >>> p.grad = torch.ones(2); opt.step()
            >>> res = StateResidency(opt, "offload"); res.deactivate([p])
            >>> with res.full_state() as full:
            ...     p in full.state
            True
            >>> p in opt.state
            False
        """
        offloaded = self.offloaded_state()
        self.optimizer.state.update(offloaded)
        try:
            yield self.optimizer
        finally:
            for param in offloaded:
                self.optimizer.state.pop(param, None)

    def offloaded_bytes(self) -> int:
        return state_bytes(self._host_entries().values())

    def offloaded_state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """The offloaded per-parameter state as plain host tensors (synchronizes first).

        A parameter whose state the optimizer holds too (a switch interrupted between
        storing and removing it) is left out: the optimizer's entry is the live one.
        """
        self.synchronize()
        return self._host_entries()

    def _host_entries(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {p: {k: v for k, (v, _) in entry.items()} for p, entry in self._store.items()
                if p not in self.optimizer.state}

    def clear(self) -> None:
        """Forget every offloaded entry (a checkpoint load put them in the optimizer)."""
        self.synchronize()
        self._store.clear()
        self._batch_of.clear()
