"""Checkpoint an ``ISTOptimizer`` through ``torch.distributed.checkpoint`` (DCP).

:func:`get_optimizer_state_dict` / :func:`set_optimizer_state_dict` wrap DCP's functions of
the same names: the inner optimizer's state goes through DCP (parameter names as keys,
FSDP2 state as sharded DTensors, ready for ``torch.distributed.checkpoint.save``), and the
wrapper's state rides beside it under ``"ist"``. See docs/distributed.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.checkpoint import pop_ist_entry
from .ranks import ddp_class

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import ISTOptimizer

__all__ = ["get_optimizer_state_dict", "set_optimizer_state_dict"]


def get_optimizer_state_dict(
    model: nn.Module, opt: ISTOptimizer, *, options: Any = None
) -> dict[str, Any]:
    """``torch.distributed.checkpoint``'s optimizer state dict of ``opt`` plus its ``"ist"`` entry.

    The inner optimizer goes through
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` (parameter names
    as keys, FSDP2 state as sharded DTensors, ready for ``torch.distributed.checkpoint.save``);
    the wrapper's state (scores, generator, active set, step), identical on every rank,
    is added under ``"ist"``.

    Args:
        model: the model as the optimizer sees it (FSDP2-sharded, DDP or plain).
        opt: the ``ISTOptimizer``.
        options: a ``torch.distributed.checkpoint.state_dict.StateDictOptions``.

    Example:
        >>> import torch
        >>> from ist_optim import ISTOptimizer
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        >>> model = torch.nn.Sequential(*blocks)
        >>> opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, layers=list(blocks),
        ...                    sampling="uniform", seed=0)
        >>> state = get_optimizer_state_dict(model, opt)
        >>> sorted(state), state["ist"]["sampler"]["num_steps"]
        (['ist', 'param_groups', 'state'], 0)
        >>> set_optimizer_state_dict(model, opt, state)
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict as dcp_get

    with opt.full_state() as inner:  # offloaded layers' state included
        state = dcp_get(model, inner, options=options)
    state["ist"] = opt.ist_state_dict()
    return state


_WRAPPER_NAMES = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}


def _checkpoint_names(model: nn.Module) -> dict[int, str]:
    """Parameter id -> the name ``torch.distributed.checkpoint`` uses for it (wrapper
    components such as DDP's leading ``module`` or ``torch.compile``'s ``_orig_mod`` removed)."""
    ddp = ddp_class()
    is_ddp = ddp is not None and isinstance(model, ddp)
    names = {}
    for name, p in model.named_parameters():
        parts = [part for part in name.split(".") if part not in _WRAPPER_NAMES]
        if is_ddp and parts and parts[0] == "module":
            parts = parts[1:]
        names[id(p)] = ".".join(parts)
    return names


def set_optimizer_state_dict(
    model: nn.Module, opt: ISTOptimizer, state_dict: dict[str, Any], *, options: Any = None
) -> None:
    """Load what :func:`get_optimizer_state_dict` returned (e.g. after
    ``torch.distributed.checkpoint.load``); the next step trains the saved active set.

    ``torch.distributed.checkpoint`` loads state only into parameters that require grad,
    and IST freezes inactive layers; so while loading, exactly the parameters being loaded
    that have saved state require grad (layers never trained have none), then IST's own
    ``requires_grad`` settings are put back. Under ``state_policy="offload"`` the inactive
    layers are loaded and offloaded one at a time (:meth:`ISTOptimizer.load_layerwise`).

    Raises:
        ValueError: without an ``"ist"`` entry, for a flattened optimizer state dict, for
            saved state of a parameter this model does not have, or for another number of
            layers or trainable parameters (as ``ISTOptimizer.load_state_dict``).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as dcp_set

    state_dict, ist = pop_ist_entry(
        state_dict, "it was not made by ist_optim.distributed.get_optimizer_state_dict; load a "
        "plain optimizer's state with torch.distributed.checkpoint.state_dict."
        "set_optimizer_state_dict(model, opt.optimizer, ...)")
    if not isinstance(state_dict.get("state"), dict):
        raise ValueError(
            "set_optimizer_state_dict needs the nested optimizer state dict ('state' and "
            "'param_groups' keys); save it without flatten_optimizer_state_dict=True"
        )
    ist = opt.check_ist_state_dict(ist)
    names = _checkpoint_names(model)
    unknown = set(state_dict["state"]) - set(names.values())
    if unknown:
        raise ValueError(
            f"the checkpoint has optimizer state for parameters this model does not have: "
            f"{sorted(unknown)[:5]}; load it into the model it was saved from"
        )
    trainable = [*(p for params in opt.layer_groups.params for p in params),
                 *opt.layer_groups.outside]

    def load(params: list[torch.Tensor] | None) -> None:
        """DCP's load of the saved state of ``params`` (None: every parameter's)."""
        wanted = None if params is None else {id(p) for p in params}
        chosen = {names.get(id(p)) for p in trainable if wanted is None or id(p) in wanted}
        part = {**state_dict, "state": {k: v for k, v in state_dict["state"].items()
                                        if k in chosen}}
        flags = [(p, p.requires_grad) for p in trainable]
        try:
            for p in trainable:
                p.requires_grad_(names.get(id(p)) in part["state"])
            dcp_set(model, opt.optimizer, part, options=options)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    opt.load_layerwise(ist, load)
