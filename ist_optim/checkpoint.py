"""The ``"ist"`` entry of an ISTOptimizer checkpoint: splitting it off and checking it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["STATE_FORMAT_VERSION", "check_ist_state", "pop_ist_entry"]

STATE_FORMAT_VERSION = 1


def pop_ist_entry(state_dict: Mapping[str, Any], fix: str) -> tuple[dict[str, Any], dict]:
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
    inner = dict(state_dict)
    ist = inner.pop("ist", None)
    if ist is None:
        raise ValueError(f"state_dict has no 'ist' entry: {fix}")
    return inner, ist


def check_ist_state(
    ist: Mapping[str, Any], *, num_layers: int, layer_numels: list[int], estimator: str
) -> None:
    """Refuse an ``"ist"`` entry saved for other layers, adapters, estimator or format.

    Raises:
        ValueError: naming what differs and how to load the checkpoint.
    """
    version = ist.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise ValueError(
            f"IST state format_version {version!r} is not the supported {STATE_FORMAT_VERSION}"
        )
    saved_estimator = ist.get("estimator", "paper")
    if saved_estimator != estimator:
        raise ValueError(
            f"checkpoint was saved with estimator={saved_estimator!r}, this optimizer uses "
            f"estimator={estimator!r}; build it with estimator={saved_estimator!r}"
        )
    if ist["num_layers"] != num_layers:
        raise ValueError(
            f"checkpoint has {ist['num_layers']} IST layers, this optimizer has "
            f"{num_layers}; load it into a model with the same layers and adapters"
        )
    saved = list(ist["layer_numels"])
    if saved != layer_numels:
        differ = [i for i, (a, b) in enumerate(zip(saved, layer_numels, strict=True)) if a != b]
        raise ValueError(
            f"checkpoint's trainable parameter counts differ in layers {differ}: "
            f"{[saved[i] for i in differ]} saved vs {[layer_numels[i] for i in differ]} "
            "here (other adapter rank or targets?)"
        )
