"""The ``"ist"`` entry of an ISTOptimizer checkpoint.

An ``ISTOptimizer`` checkpoint is the inner optimizer's state dict plus one ``"ist"`` entry
composed of named sub-dicts, one per concept, each written and checked by its owner::

    {"format_version": 2,
     "layers":  {"num_layers", "layer_names", "layer_numels"},   # the checkpoint signature
     "sampler": {**LayerSampler.state_dict(),  # rule name and state, scores, generator, step
                 **LayerActivator.state_dict()},  # the active set
     "rounds":  ImportanceRound.state_dict()}  # estimator, skipped rounds, scale, probe...

The ``"sampler"`` sub-dict has two owners, each writing and checking its own keys
(:class:`SharedEntry`): the sampler, and the activator, which records the active set.

Loading validates every part first (:func:`validate_ist_entry`), then applies: a bad entry
changes nothing. Format 1 (flat keys, written before version 0.2) is upgraded on load.

The inner optimizer's own state (offloaded entries included) is read through
:meth:`ist_optim.memory.residency.StateResidency.full_state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain
from typing import Any, Protocol

import torch
from torch.optim import Optimizer

__all__ = [
    "STATE_FORMAT_VERSION",
    "SharedEntry",
    "Stateful",
    "apply_ist_entry",
    "check_inner_structure",
    "inner_state_of",
    "ist_entry",
    "layer_signature",
    "pop_ist_entry",
    "upgrade_ist_entry",
    "validate_ist_entry",
]

STATE_FORMAT_VERSION = 2


class Stateful(Protocol):
    """What each part of the ``"ist"`` entry provides."""

    def state_dict(self) -> dict[str, Any]: ...

    def check_state(self, state: Mapping[str, Any]) -> None: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SharedEntry:
    """One sub-dict of the ``"ist"`` entry written by several owners, each its own keys:
    the state dicts are merged (a key two owners write is refused), each owner checks
    and loads the whole sub-dict, reading its own keys.

    Example:
        >>> class Part:
        ...     def __init__(self, key): self.key, self.value = key, 0
        ...     def state_dict(self): return {self.key: self.value}
        ...     def check_state(self, state): int(state[self.key])
        ...     def load_state_dict(self, state): self.value = state[self.key]
        >>> a, b = Part("a"), Part("b")
        >>> entry = SharedEntry(a, b)
        >>> entry.state_dict()
        {'a': 0, 'b': 0}
        >>> entry.load_state_dict({"a": 1, "b": 2}); (a.value, b.value)
        (1, 2)
    """

    def __init__(self, *owners: Stateful) -> None:
        self.owners = owners

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for owner in self.owners:
            state = owner.state_dict()
            clash = sorted(set(state) & set(merged))
            if clash:
                raise RuntimeError(f"{type(owner).__name__} writes {clash}, which another "
                                   "owner of the same checkpoint entry writes too")
            merged.update(state)
        return merged

    def check_state(self, state: Mapping[str, Any]) -> None:
        for owner in self.owners:
            owner.check_state(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for owner in self.owners:
            owner.load_state_dict(state)


def pop_ist_entry(state_dict: Mapping[str, Any], fix: str) -> tuple[dict[str, Any], Any]:
    """Split a checkpoint into the inner optimizer's part and the ``"ist"`` entry.

    Args:
        state_dict: what ``ISTOptimizer.state_dict()`` (or the DCP helper) produced.
        fix: how to load a checkpoint without the entry, for the error message.

    Raises:
        ValueError: when there is no ``"ist"`` entry.

    Example:
        >>> inner, ist = pop_ist_entry({"state": {}, "param_groups": [], "ist": {"x": 1}}, "")
        >>> sorted(inner), ist
        (['param_groups', 'state'], {'x': 1})
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    inner = dict(state_dict)
    ist = inner.pop("ist", None)
    if ist is None:
        raise ValueError(f"state_dict has no 'ist' entry: {fix}")
    return inner, ist


def layer_signature(names: list[str], numels: list[int]) -> dict[str, Any]:
    """The ``"layers"`` part: what a checkpoint must match to be loaded.

    Example:
        >>> layer_signature(["h.0", "h.1"], [8, 8])["num_layers"]
        2
    """
    return {"num_layers": len(names), "layer_names": list(names), "layer_numels": list(numels)}


def upgrade_ist_entry(ist: Mapping[str, Any]) -> dict[str, Any]:
    """Format 1 (flat keys) -> format 2 (named parts); format 2 is returned as it is, but
    for the sampling rule's name, which older writers kept at the top of the entry and
    which goes into the sampler's part (where it is checked).

    Raises:
        ValueError: for an unknown format version, or an entry that is not a mapping.

    Example:
        >>> v1 = {"format_version": 1, "num_layers": 1, "layer_names": ["h.0"],
        ...       "layer_numels": [4], "scores": None, "generator_state": None,
        ...       "active_layers": [0], "num_steps": 3, "seed": 0, "skipped_rounds": 0}
        >>> upgrade_ist_entry(v1)["sampler"]["num_steps"]
        3
    """
    if not isinstance(ist, Mapping):
        raise ValueError(f"the checkpoint's 'ist' entry is a {type(ist).__name__}, not a dict")
    version = ist.get("format_version")
    if version == STATE_FORMAT_VERSION:
        return _rule_into_sampler(dict(ist))
    if version != 1:
        raise ValueError(
            f"IST state format_version {version!r} is not one this version reads "
            f"(1 or {STATE_FORMAT_VERSION})"
        )
    missing = [k for k in ("num_layers", "layer_names", "layer_numels") if k not in ist]
    if missing:
        raise ValueError(f"IST checkpoint (format 1) has no {missing} entries")
    estimator_state = ist.get("estimator_state") or {}
    rounds = {
        "estimator": ist.get("estimator", "paper"),
        "skipped_rounds": ist.get("skipped_rounds", 0),
        "importance_batches_seen": ist.get("importance_batches_seen", 0),
        "scale": estimator_state.get("scale"),
        "probe": estimator_state.get("probe"),
    }
    sampler_keys = ("scores", "generator_state", "active_layers", "num_steps", "seed")
    return _rule_into_sampler({
        "format_version": STATE_FORMAT_VERSION,
        "layers": {k: ist[k] for k in ("num_layers", "layer_names", "layer_numels")},
        "sampler": {k: ist[k] for k in sampler_keys if k in ist},
        "rounds": rounds,
        **({"sampling": ist["sampling"]} if "sampling" in ist else {}),
    })


def _rule_into_sampler(ist: dict[str, Any]) -> dict[str, Any]:
    """The sampling rule's name where the sampler checks it: format 1 and the first
    format-2 writers kept it at the top of the entry (and never read it)."""
    sampler = ist.get("sampler")
    if "sampling" in ist and isinstance(sampler, Mapping) and "sampling" not in sampler:
        ist["sampler"] = {**sampler, "sampling": ist["sampling"]}
    return ist


def ist_entry(signature: Mapping[str, Any],
              parts: Mapping[str, Stateful | None]) -> dict[str, Any]:
    """The ``"ist"`` entry: format version, layer signature, and each part's state dict
    under its name (``None`` for a part the optimizer does not have).

    Example:
        >>> ist_entry(layer_signature(["h.0"], [4]), {"rounds": None})["format_version"]
        2
    """
    return {"format_version": STATE_FORMAT_VERSION, "layers": dict(signature),
            **{name: None if part is None else part.state_dict()
               for name, part in parts.items()}}


def apply_ist_entry(ist: Mapping[str, Any], parts: Mapping[str, Stateful | None]) -> None:
    """Load each part's sub-dict of an entry :func:`validate_ist_entry` returned."""
    for name, part in parts.items():
        if part is not None:
            part.load_state_dict(ist[name])


def _check_layers(saved: Any, here: Mapping[str, Any]) -> None:
    if not isinstance(saved, Mapping) or "num_layers" not in saved:
        raise ValueError("IST checkpoint has no valid 'layers' entry")
    if saved["num_layers"] != here["num_layers"]:
        raise ValueError(
            f"checkpoint has {saved['num_layers']} IST layers, this optimizer has "
            f"{here['num_layers']}; load it into a model with the same layers and adapters"
        )
    numels_saved, numels_here = list(saved["layer_numels"]), here["layer_numels"]
    if numels_saved != numels_here:
        differ = [i for i, (a, b) in enumerate(zip(numels_saved, numels_here, strict=True))
                  if a != b]
        raise ValueError(
            f"checkpoint's trainable parameter counts differ in layers {differ}: "
            f"{[numels_saved[i] for i in differ]} saved vs {[numels_here[i] for i in differ]} "
            "here (other adapter rank or targets?)"
        )


def validate_ist_entry(ist: Any, signature: Mapping[str, Any],
                       parts: Mapping[str, Stateful | None]) -> dict[str, Any]:
    """Upgrade and check a whole ``"ist"`` entry, changing nothing; return it upgraded.

    Args:
        ist: the checkpoint's ``"ist"`` entry (format 1 or 2).
        signature: :func:`layer_signature` of the optimizer loading it.
        parts: the optimizer's parts by name (``None`` for a part it does not have, such
            as the rounds of uniform sampling); each checks its own sub-dict.

    Raises:
        ValueError: naming the first thing that does not fit.
    """
    ist = upgrade_ist_entry(ist)
    _check_layers(ist.get("layers"), signature)
    for name, part in parts.items():
        state = ist.get(name)
        if part is None:
            continue
        if not isinstance(state, Mapping):
            if name == "rounds" and state is None:
                state = {"estimator": "paper"}  # saved by a run without rounds (uniform)
                ist[name] = state
            else:
                raise ValueError(f"IST checkpoint has no valid {name!r} entry")
        part.check_state(state)
    return ist


def check_inner_structure(optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Raise the ``ValueError`` the inner optimizer's ``load_state_dict`` would raise for
    ``state_dict`` (another number of param groups, or of parameters in one), before
    anything is loaded.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> check_inner_structure(opt, opt.state_dict())
        >>> check_inner_structure(opt, {"state": {}, "param_groups": []})
        Traceback (most recent call last):
        ...
        ValueError: the checkpoint's optimizer state has 0 param groups, this optimizer 1; ...
    """
    saved = state_dict.get("param_groups")
    if not isinstance(saved, list) or not isinstance(state_dict.get("state"), Mapping):
        raise ValueError("the checkpoint's optimizer state needs 'state' and 'param_groups' "
                         "entries (a torch optimizer's state_dict())")
    groups = optimizer.param_groups
    if len(saved) != len(groups):
        raise ValueError(f"the checkpoint's optimizer state has {len(saved)} param groups, "
                         f"this optimizer {len(groups)}; load it into the optimizer it was "
                         "saved from")
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved]
    if sizes != saved_sizes:
        raise ValueError(f"the checkpoint's param groups hold {saved_sizes} parameters, this "
                         f"optimizer's {sizes}; load it into the optimizer it was saved from")


def inner_state_of(optimizer: Optimizer, state_dict: Mapping[str, Any],
                   params: Iterable[torch.Tensor] | None) -> dict[str, Any]:
    """The part of a torch optimizer ``state_dict`` that holds the state of ``params``
    (matched to the saved ids in param-group order, as ``load_state_dict`` does), with the
    param groups as they are; ``params=None``: all of it.

    Example:
        >>> a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.Adam([a, b])
        >>> a.grad = b.grad = torch.ones(1); opt.step()
        >>> sorted(inner_state_of(opt, opt.state_dict(), [b])["state"])
        [1]
    """
    if params is None:
        return dict(state_dict)
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    current = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    param_of = {saved: id(p) for saved, p in zip(saved_ids, current, strict=False)}
    wanted = {id(p) for p in params}
    state = {k: v for k, v in state_dict["state"].items() if param_of.get(k) in wanted}
    return {**state_dict, "state": state}
