"""axolotl plugin: IST from a YAML file (``plugins: [ist_optim.integrations.axolotl.ISTPlugin]``).

axolotl (``axolotl train cfg.yml``) loads a plugin by dotted path from any installed
package. :class:`ISTPlugin` adds the ``ist_*`` YAML keys to axolotl's config schema
(:class:`ISTArgs`, validated with the rest of the YAML), refuses the settings that cannot
work with IST, and after axolotl built its trainer replaces the trainer's optimizer by an
:class:`ist_optim.ISTOptimizer` around the optimizer axolotl would have used (same class,
constructor arguments and param groups: learning rates, weight decay, LoRA+ groups), so
axolotl's scheduler, checkpoints and ``resume_from_checkpoint`` see the ISTOptimizer. It
attaches :class:`ist_optim.integrations.ISTCallback` first among the callbacks, so the
``ist/*`` keys reach every log.

Importing this module needs only torch: ``ISTPlugin`` (which subclasses axolotl's
``BasePlugin``) and ``ISTArgs`` (a pydantic model) are built when first accessed, and the
pure parts (:func:`ist_options`, :func:`check_axolotl_config`, :func:`install_ist_optimizer`)
work without axolotl. See docs/axolotl.md.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..config import ISTConfig
from ..optimizer import ISTOptimizer
from ..options import plain
from .common import DDP_UNUSED_REASON, DEEPSPEED_REFUSAL, unwrap_ist_optimizer
from .wrap import wrap_built_optimizer
from .yaml_keys import (
    IMPORTANCE_SOURCES,
    OPTION_KEYS,
    PLUGIN_KEYS,
    YAML_DEFAULTS,
    YAML_NOTES,
    PluginKey,
    yaml_keys_table,
    yaml_option_keys,
    yaml_rows,
)

__all__ = [
    "IMPORTANCE_SOURCES",
    "LORA_KERNEL_KEYS",
    "OPTIMIZER_ALIAS_PREFIX",
    "OPTION_KEYS",
    "PLUGIN_KEYS",
    "PluginKey",
    "YAML_DEFAULTS",
    "YAML_NOTES",
    "check_axolotl_config",
    "check_axolotl_ddp",
    "default_lora_kernels_off",
    "describe",
    "install_ist_optimizer",
    "ist_args_model",
    "ist_options",
    "resolve_optimizer_alias",
    "yaml_keys_table",
    "yaml_option_keys",
]

logger = logging.getLogger(__name__)


#: ``optimizer: ist_adamw_torch`` means ``adamw_torch`` wrapped by IST; without the plugin
#: axolotl passes the name to transformers, which refuses it, so the run stops instead of
#: training without IST.
OPTIMIZER_ALIAS_PREFIX = "ist_"

# Optimizers that do not step through ``optimizer.step()`` on the param groups (fused
# backward, layer-wise hooks) or need ``optimizer.train()/eval()`` calls IST does not forward.
_REFUSED_OPTIMIZER_PARTS = ("lomo", "layerwise", "schedule_free")
_ADAPTERS = (None, "lora", "qlora")
#: axolotl's fused LoRA kernels, which it turns on when unset; the plugin turns them off
#: when unset (IST is not verified with them; the memory budget's planner cannot run them).
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel",
                    "lora_embedding_kernel")
# axolotl's schema defaults of the batch shape (0.19.0), for validating a raw YAML.
_SHAPE_DEFAULTS = {"micro_batch_size": 1, "sequence_len": 512}


# ---------------------------------------------------------------------- pure parts
def resolve_optimizer_alias(optimizer: Any) -> tuple[Any, bool]:
    """``(name, aliased)``: ``"ist_adamw_torch"`` -> ``("adamw_torch", True)``.

    Example:
        >>> resolve_optimizer_alias("ist_adamw_bnb_8bit")
        ('adamw_bnb_8bit', True)
        >>> resolve_optimizer_alias("adamw_torch")
        ('adamw_torch', False)
    """
    name = getattr(optimizer, "value", optimizer)  # axolotl's enum members are str enums
    if isinstance(name, str) and name.startswith(OPTIMIZER_ALIAS_PREFIX):
        return name[len(OPTIMIZER_ALIAS_PREFIX):], True
    return optimizer, False


def ist_options(cfg: Mapping[str, Any], *, config_cls: type = ISTConfig) -> dict[str, Any]:
    """The ``ISTOptimizer`` keywords an axolotl config asks for, validated by ``ISTConfig``.

    Only the ``ist_*`` keys that are set (not None) are passed; the rest keep the
    optimizer's defaults. ``ist_seed`` defaults to axolotl's ``seed``; with
    ``ist_memory_budget`` the batch shape of the memory prediction is
    ``(micro_batch_size, sequence_len)``.

    Args:
        cfg: the axolotl config (a dict or axolotl's ``DictDefault``).
        config_cls: the options' declaration (``ISTConfig``; a subclass in tests).

    Raises:
        ValueError, TypeError: one line naming the YAML key, the value and the range.

    Example:
        >>> ist_options({"ist_active_layers": 2, "ist_sampling": "uniform", "seed": 7})
        {'active_layers': 2, 'sampling': 'uniform', 'seed': 7}
        >>> ist_options({"ist_update_interval": 0})
        Traceback (most recent call last):
        ...
        ValueError: ist_update_interval: Invalid update_interval: 0; expected an int >= 1
        >>> ist_options({"ist_memory_budget": 24})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ist_memory_budget=24 has no unit, ...: ... e.g. ist_memory_budget: 24GiB
    """
    keys = yaml_option_keys(config_cls)
    options = {keys[key]: cfg[key] for key in keys if cfg.get(key) is not None}
    if "seed" not in options and cfg.get("seed") is not None:
        options["seed"] = cfg["seed"]
    budget = options.get("memory_budget")
    if budget is not None and not isinstance(budget, str):
        raise ValueError(f"ist_memory_budget={budget!r} has no unit, and in Python it would "
                         f"be {budget!r} bytes: write the size with its unit, e.g. "
                         f"ist_memory_budget: {budget}GiB")
    if budget is not None:
        batch, seq = cfg.get("micro_batch_size"), cfg.get("sequence_len")
        if batch is None or seq is None:
            raise ValueError(
                "ist_memory_budget predicts each step's memory from micro_batch_size and "
                f"sequence_len (got {batch!r}, {seq!r}); set both in the YAML")
        options["memory_shape"] = (int(batch), int(seq))
    try:
        config_cls(**options)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{_yaml_key_of(str(err), keys)}: {err}") from None
    return options


def _yaml_key_of(message: str, keys: Mapping[str, str]) -> str:
    """The ``ist_*`` key whose option the message names first (``ist_*`` if none)."""
    found = [(m.start(), key) for key, option in keys.items()
             if (m := re.search(rf"\b{option}\b", message))]
    return min(found)[1] if found else "ist_*"


def check_axolotl_ddp(cfg: Mapping[str, Any], world_size: int) -> None:
    """Refuse what fails under DDP (``world_size`` > 1) once IST freezes the layers that sit
    out a step: they get no gradient, so DDP must look for unused parameters
    (``ddp_find_unused_parameters: true``; the HF Trainer turns the search off for a
    checkpointed full model), and that search fails under reentrant checkpointing, which
    axolotl's ``gradient_checkpointing: true`` uses unless told otherwise ("Expected to
    mark a variable ready only once", seen through LLaMA-Factory's trainer on 2 gloo
    ranks; axolotl's own DDP does not run on a CPU).

    Raises:
        ValueError: naming the key and the value to set.

    Example:
        >>> check_axolotl_ddp({"ddp_find_unused_parameters": True}, world_size=2)
        >>> check_axolotl_ddp({}, world_size=1)
        >>> check_axolotl_ddp({}, world_size=2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ddp_find_unused_parameters=None under DDP: ...; set ..._parameters: true
    """
    if world_size <= 1 or cfg.get("ist_freeze_inactive", True) is False:
        return
    why = DDP_UNUSED_REASON
    if cfg.get("ddp_find_unused_parameters") is not True:
        raise ValueError(f"ddp_find_unused_parameters={cfg.get('ddp_find_unused_parameters')!r}"
                         f" {why}; set ddp_find_unused_parameters: true")
    kwargs = cfg.get("gradient_checkpointing_kwargs") or {}
    if cfg.get("gradient_checkpointing") is True and kwargs.get("use_reentrant") is not False:
        raise ValueError(
            f"gradient_checkpointing: true with use_reentrant={kwargs.get('use_reentrant')!r} "
            f"{why}, which reentrant checkpointing defeats; set gradient_checkpointing_kwargs: "
            "{use_reentrant: false}")


def check_axolotl_config(cfg: Mapping[str, Any], *, config_cls: type = ISTConfig) -> None:
    """Refuse, with one line each, the axolotl settings that cannot work with the plugin.

    Refused: ``lisa_n_layers`` (axolotl's LISA flips ``requires_grad`` under the plugin's
    own layer choice), ``gradient_checkpointing`` with ``ist_memory_budget`` (the budget
    checkpoints per step only the blocks it needs), ``torch_compile`` (each active set
    would recompile the whole model), DeepSpeed and FSDP (their optimizer is built inside
    the engine), RL trainers (``rl:``; the importance rounds measure ``model(**batch).loss``
    of SFT batches), ReLoRA, adapters other than LoRA / QLoRA (or none: full
    fine-tuning), optimizers that do not step on their param groups (LOMO, layer-wise
    GaLore / APOLLO, schedule-free), and ``ist_importance_batches: eval`` without an
    eval split. Also validates the ``ist_*`` options (:func:`ist_options`).

    Raises:
        ValueError: naming the setting and the fix.

    Example:
        >>> check_axolotl_config({"adapter": "lora", "ist_active_layers": 2})
        >>> check_axolotl_config({"lisa_n_layers": 4})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: lisa_n_layers=4 is axolotl's LISA, ... remove lisa_n_layers and ...
    """
    if cfg.get("lisa_n_layers"):
        raise ValueError(
            f"lisa_n_layers={cfg['lisa_n_layers']} is axolotl's LISA, which flips "
            "requires_grad at each step; the IST plugin samples the layers itself: remove "
            "lisa_n_layers and lisa_step_interval (ist_active_layers sets the layers per step)")
    if cfg.get("ist_memory_budget") is not None and cfg.get("gradient_checkpointing"):
        raise ValueError(
            f"gradient_checkpointing={cfg['gradient_checkpointing']!r} with "
            f"ist_memory_budget={cfg['ist_memory_budget']!r}: the budget checkpoints per step "
            "only the blocks that step needs to fit; set gradient_checkpointing: false")
    kernels = [key for key in LORA_KERNEL_KEYS if cfg.get(key)]
    if cfg.get("ist_memory_budget") is not None and kernels:
        raise ValueError(
            f"{', '.join(kernels)} with ist_memory_budget: the budget's memory planner runs "
            "stock transformer blocks, which axolotl's fused LoRA kernels patch; set "
            f"{', '.join(f'{key}: false' for key in kernels)}")
    if cfg.get("torch_compile"):
        raise ValueError(
            "torch_compile: true compiles the whole model, and every IST step freezes other "
            "layers, so each active set would recompile it; set torch_compile: false")
    if cfg.get("deepspeed"):
        raise ValueError(f"deepspeed={cfg['deepspeed']!r}: {DEEPSPEED_REFUSAL}")
    for key in ("fsdp", "fsdp_config"):
        if cfg.get(key):
            raise ValueError(
                f"{key} is set: axolotl's FSDP builds the optimizer inside accelerate's FSDP "
                "set-up, which the IST plugin cannot wrap; train on one device or with DDP "
                f"(remove {key}), or use FSDP2 in your own loop (docs/distributed.md)")
    check_axolotl_ddp(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.get("rl"):
        raise ValueError(
            f"rl={cfg['rl']!r}: the IST plugin supports supervised fine-tuning and "
            "pretraining (its importance rounds measure model(**batch).loss); remove rl or "
            "the plugin")
    if cfg.get("relora") or cfg.get("relora_steps"):
        raise ValueError(
            "ReLoRA merges and resets the adapters and the optimizer state on its own "
            "schedule, under IST's per-layer state; remove the relora settings or the plugin")
    adapter = cfg.get("adapter") or None
    if adapter not in _ADAPTERS:
        raise ValueError(
            f"adapter={adapter!r} is not supported by the IST plugin; use lora, qlora, or no "
            "adapter (full fine-tuning)")
    name, _ = resolve_optimizer_alias(cfg.get("optimizer"))
    if isinstance(name, str) and any(part in name for part in _REFUSED_OPTIMIZER_PARTS):
        raise ValueError(
            f"optimizer={name!r} does not update through optimizer.step() on its param "
            "groups (or needs optimizer.train()/eval()), so IST cannot choose the layers it "
            "trains; use e.g. adamw_torch, adamw_torch_fused or adamw_bnb_8bit")
    source = cfg.get("ist_importance_batches")
    if source is not None and source not in IMPORTANCE_SOURCES:
        raise ValueError(
            f"Invalid ist_importance_batches: {source!r}; expected one of {IMPORTANCE_SOURCES}")
    if source == "eval" and not (cfg.get("val_set_size") or cfg.get("test_datasets")):
        raise ValueError(
            "ist_importance_batches: eval needs an eval split; set val_set_size (or "
            "test_datasets), or use ist_importance_batches: train")
    if source in ("eval", "train") and cfg.get("ist_sampling") == "uniform":
        raise ValueError(
            f"ist_importance_batches: {source} is set but ist_sampling: uniform runs no "
            "importance rounds; drop ist_importance_batches")
    ist_options(cfg, config_cls=config_cls)


def default_lora_kernels_off(cfg: Any) -> list[str]:
    """Set axolotl's fused LoRA kernel keys that the YAML leaves unset to False, in place.

    axolotl turns them on when unset; IST's adapter damping and backward cut are verified
    on peft's LoRA layers, and the memory budget's planner cannot run the patched blocks.
    Runs on the raw config (``BasePlugin.register``), before axolotl's validation.

    Returns:
        The keys set.

    Example:
        >>> cfg = {"adapter": "lora", "lora_qkv_kernel": True}
        >>> default_lora_kernels_off(cfg)
        ['lora_mlp_kernel', 'lora_o_kernel', 'lora_embedding_kernel']
        >>> cfg["lora_qkv_kernel"], cfg["lora_o_kernel"]
        (True, False)
    """
    if cfg.get("adapter") not in ("lora", "qlora"):
        return []
    unset = [key for key in LORA_KERNEL_KEYS if cfg.get(key) is None]
    for key in unset:
        cfg[key] = False
    return unset


def install_ist_optimizer(trainer: Any, options: Mapping[str, Any],
                          model: nn.Module | None = None) -> ISTOptimizer:
    """Replace ``trainer``'s optimizer-to-be by an ``ISTOptimizer`` around the same optimizer.

    Lets the trainer build its optimizer (``trainer.create_optimizer()``: axolotl's param
    groups, weight decay, LoRA+ and embedding learning rates; nothing is allocated yet),
    then builds ``ISTOptimizer(type(built), model, params=<its param groups>, **options,
    **<the trainer's constructor kwargs>)`` and sets it as ``trainer.optimizer``. The
    Trainer then builds its scheduler over it and loads/saves it in checkpoints.

    Args:
        trainer: a ``transformers.Trainer`` (axolotl's trainers are ones) before ``train()``.
        options: ``ISTOptimizer`` keywords (:func:`ist_options`).
        model: the model to sample layers of (default: ``trainer.model``).

    Returns:
        The ISTOptimizer, also at ``trainer.optimizer``.

    Raises:
        RuntimeError: when the trainer already holds an optimizer that has state or is an
            ISTOptimizer, or built an optimizer whose constructor arguments are unknown.

    Example:
        >>> import tempfile, torch
        >>> from transformers import Trainer, TrainingArguments
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        ...     def forward(self, x, labels):
        ...         return {"loss": (self.blocks[0](x) - labels).pow(2).mean()}
        >>> args = TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to=[],
        ...                          optim="adamw_torch", weight_decay=0.1)
        >>> trainer = Trainer(model=Net(), args=args)
        >>> opt = install_ist_optimizer(trainer, {"active_layers": 1, "seed": 0})
        >>> trainer.optimizer is opt, type(opt.optimizer).__name__, opt.num_layers
        (True, 'AdamW', 4)
        >>> sorted(group["weight_decay"] for group in opt.param_groups)
        [0.0, 0.1]
    """
    model = trainer.model if model is None else model
    current = getattr(trainer, "optimizer", None)
    if current is not None:
        try:
            unwrap_ist_optimizer(current)
        except TypeError:
            pass
        else:
            raise RuntimeError("the trainer already trains with an ISTOptimizer; install one only")
        if len(current.state):
            raise RuntimeError(
                "the trainer's optimizer already holds state (it has stepped); install the "
                "ISTOptimizer before training starts")
        trainer.optimizer = None  # built again below, as the trainer would build it
    built = trainer.create_optimizer()
    optimizer = wrap_built_optimizer(trainer, built, options, model)
    logger.info("%s", describe(optimizer))
    return optimizer


def describe(optimizer: ISTOptimizer) -> str:
    """One line saying what the ISTOptimizer trains (logged when the plugin installs it).

    Example:
        >>> import torch
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        >>> opt = ISTOptimizer(torch.optim.SGD, torch.nn.Sequential(*blocks), lr=0.1,
        ...                    layers=list(blocks), active_layers=1, sampling="uniform")
        >>> print(describe(opt))  # doctest: +NORMALIZE_WHITESPACE
        IST: SGD over 4 layers, 1 trained per step (uniform sampling, paper estimator,
        state policy keep)
    """
    config = optimizer.config
    first = ("" if optimizer.num_trained == optimizer.num_active
             else f", {optimizer.num_trained} in the coming step")
    return (f"IST: {type(optimizer.optimizer).__name__} over {optimizer.num_layers} layers, "
            f"{optimizer.num_active} trained per step{first} ({config.sampling} sampling, "
            f"{config.estimator} estimator, state policy {optimizer.state_policy})")


# ---------------------------------------------------------------------- axolotl classes
@functools.cache
def ist_args_model(config_cls: type = ISTConfig) -> type:
    """``ISTArgs``: the pydantic model of the ``ist_*`` keys that axolotl merges into its
    config schema, one field per key of :func:`yaml_keys_table` (None: IST's default), and
    a validator that runs :func:`check_axolotl_config` on the whole config.

    Raises:
        RuntimeError: without pydantic.
    """
    try:
        from pydantic import BaseModel, Field, create_model, model_validator
    except ImportError as err:  # a RuntimeError: axolotl only logs an ImportError, trains on
        raise RuntimeError(f"the IST axolotl plugin needs pydantic ({err})") from err

    class Checked(BaseModel):
        @model_validator(mode="before")
        @classmethod
        def check_ist(cls, data: Any) -> Any:
            if not isinstance(data, Mapping):
                return data
            name, aliased = resolve_optimizer_alias(data.get("optimizer"))
            if aliased:
                data = {**data, "optimizer": name}
            try:  # axolotl fills these defaults after this validator; the real values
                # reach ist_options when the plugin builds the optimizer
                check_axolotl_config({**_SHAPE_DEFAULTS, **data}, config_cls=config_cls)
            except TypeError as err:  # pydantic reports ValueErrors as validation errors
                raise ValueError(str(err)) from None
            return data

    fields = {key: (kind, Field(default=None, description=plain(f"{meaning} (unset: "
                                                                f"{default})")))
              for key, kind, default, meaning in yaml_rows(config_cls, for_docs=False)}
    model: type = create_model("ISTArgs", __base__=Checked, __module__=__name__,
                               **fields)  # type: ignore[call-overload]
    model.__doc__ = "The ``ist_*`` YAML keys of the IST axolotl plugin (None: IST's default)."
    return model


@functools.cache
def _plugin_class() -> type:
    """``ISTPlugin``: built on axolotl's ``BasePlugin`` when first accessed."""
    try:
        from axolotl.integrations.base import BasePlugin
    except ImportError as err:  # a RuntimeError: axolotl only logs an ImportError, trains on
        raise RuntimeError(
            f"ist_optim.integrations.axolotl.ISTPlugin needs axolotl ({err}); install it "
            "(pip install axolotl) in the environment that runs `axolotl train`") from err

    from .callback import add_ist_callback
    from .quantized import keep_4bit_layout

    # axolotl shows INFO records of loggers named axolotl*, only warnings of the others
    plugin_log = logging.getLogger("axolotl.integrations.ist_optim")

    class ISTPlugin(BasePlugin):  # type: ignore[misc, valid-type]
        """IST for axolotl: list it under ``plugins:`` and set ``ist_*`` keys.

        Hooks: ``get_input_args`` (the ``ist_*`` keys, :class:`ISTArgs`, validated with
        the YAML), ``register`` (logs that IST is on; turns axolotl's fused LoRA kernels off
        when the YAML leaves them unset), ``post_trainer_create`` (keeps a 4-bit base's
        layout, :func:`~ist_optim.integrations.keep_4bit_layout`; installs the ISTOptimizer
        around the optimizer axolotl would build, and the IST callback).
        """

        def get_input_args(self) -> str:
            return f"{__name__}.ISTArgs"

        def register(self, cfg: dict) -> None:
            plugin_log.info("IST plugin loaded: the optimizer will train a sampled subset of "
                            "layers per step (ist_* keys)")
            turned_off = default_lora_kernels_off(cfg)
            if turned_off:
                plugin_log.info("IST plugin: %s set to false (unset in the YAML; axolotl "
                                "would turn them on)", ", ".join(turned_off))

        def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
            check_axolotl_config(cfg)
            kept = keep_4bit_layout(trainer.model)
            if kept:
                plugin_log.info("IST plugin: %d 4-bit layers keep their training layout "
                                "(bitsandbytes repacks them for its CPU kernel in the "
                                "importance rounds' eval forwards otherwise)", kept)
            optimizer = install_ist_optimizer(trainer, ist_options(cfg))
            plugin_log.info("%s", describe(optimizer))
            source = cfg.get("ist_importance_batches") or "last"
            log_layers = cfg.get("ist_log_layers")
            add_ist_callback(
                trainer, importance_batches=None if source == "last" else source,
                log_layers=True if log_layers is None else bool(log_layers))

    ISTPlugin.__module__ = __name__
    return ISTPlugin


_LAZY = {"ISTArgs": ist_args_model, "ISTPlugin": _plugin_class}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _LAZY[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
