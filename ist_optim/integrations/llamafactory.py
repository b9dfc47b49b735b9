"""LLaMA-Factory: IST from a LLaMA-Factory YAML with ``ist_*`` keys.

``ist-llamafactory train cfg.yaml [key=value ...]`` is ``llamafactory-cli train`` with IST:
it reads the YAML as LLaMA-Factory does (OmegaConf, ``key=value`` overrides), takes the
``ist_*`` keys out (the same keys and validation as the axolotl plugin, ``ist_optim.ISTConfig``
documents each), refuses what cannot work with IST in one line, and runs LLaMA-Factory's
own ``run_exp`` with every other key. While it runs, the ``create_optimizer`` of
LLaMA-Factory's trainers (SFT, pre-training, reward modelling, DPO, KTO) wraps the optimizer
LLaMA-Factory builds (its class, constructor arguments and param groups) in an
:class:`ist_optim.ISTOptimizer`, and attaches :class:`ist_optim.integrations.ISTCallback`,
so LLaMA-Factory's scheduler, checkpoints, ``resume_from_checkpoint`` and logs see IST.

Why a command, not a plugin: LLaMA-Factory's trainers build the optimizer in their own
``create_optimizer`` through a fixed chain (``use_galore``, ``use_apollo``, ``use_badam``,
...), its argument parser refuses unknown YAML keys, and its callbacks never see the
trainer. LLaMA-Factory's v1 ``OptimizerPlugin`` registry (``optim_config: {name: ist}``) is
registered too, where it exists (:func:`register_v1_optimizer`). See docs/llamafactory.md.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .axolotl import describe
from .common import DDP_UNUSED_REASON, DEEPSPEED_REFUSAL
from .quantized import keep_4bit_layout
from .wrap import wrap_built_optimizer
from .yaml_keys import IMPORTANCE_SOURCES, OPTION_KEYS, PLUGIN_KEYS

__all__ = [
    "REFUSED_KEYS",
    "STAGES",
    "check_llamafactory_config",
    "for_ddp",
    "ist_trainers",
    "main",
    "register_v1_optimizer",
    "split_config",
]

logger = logging.getLogger(__name__)

#: LLaMA-Factory stages whose trainers build their optimizer in ``create_optimizer``
#: (``ppo`` builds two models' optimizers in its own loop: refused).
STAGES = ("sft", "pt", "rm", "dpo", "kto")
_TRAINER_MODULES = tuple(f"llamafactory.train.{stage}.trainer" for stage in STAGES)

#: LLaMA-Factory settings that choose another optimizer (or the layers itself), with the
#: reason IST cannot honour them; refused when set.
REFUSED_KEYS: dict[str, str] = {
    "use_badam": "BAdam trains one block at a time with its own optimizer",
    "use_galore": "GaLore builds its own optimizer (layer-wise or projected)",
    "use_apollo": "APOLLO builds its own optimizer",
    "use_adam_mini": "Adam-mini builds its own optimizer",
    "use_muon": "Muon builds its own optimizer",
    "loraplus_lr_ratio": "LoRA+ builds its own param groups and optimizer",
    "use_ray": "Ray runs the trainers in other processes, outside this command",
}

# The batch shape of ``ist_memory_budget``'s prediction, LLaMA-Factory's names.
_SHAPE_KEYS = ("per_device_train_batch_size", "cutoff_len")


def split_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                 dict[str, Any]]:
    """Split a LLaMA-Factory config into its own keys, the ``ISTOptimizer`` keywords and
    the callback's keys (:data:`ist_optim.integrations.yaml_keys.PLUGIN_KEYS`).

    ``ist_seed`` defaults to LLaMA-Factory's ``seed`` (42 when unset, as there); with
    ``ist_memory_budget`` the batch shape of the memory prediction is
    ``(per_device_train_batch_size, cutoff_len)`` (LLaMA-Factory's defaults 8 and 2048).

    Raises:
        ValueError: for an ``ist_*`` key that is not an IST option, or an invalid value
            (one line naming the key).

    Example:
        >>> split_config({"stage": "sft", "ist_active_layers": 2, "seed": 3})
        ({'stage': 'sft', 'seed': 3}, {'active_layers': 2, 'seed': 3}, {})
    """
    from .axolotl import ist_options

    known = {*OPTION_KEYS, *PLUGIN_KEYS}
    unknown = sorted(k for k in cfg if k.startswith("ist_") and k not in known)
    if unknown:
        raise ValueError(f"unknown IST keys {unknown}; the ist_* keys are "
                         f"{', '.join(sorted(known))}")
    theirs = {k: v for k, v in cfg.items() if k not in known}
    callback = {k: cfg[k] for k in PLUGIN_KEYS if cfg.get(k) is not None}
    source = callback.get("ist_importance_batches")
    if source is not None and source not in IMPORTANCE_SOURCES:
        raise ValueError(f"Invalid ist_importance_batches: {source!r}; expected one of "
                         f"{IMPORTANCE_SOURCES}")
    options = ist_options({**{k: cfg[k] for k in OPTION_KEYS if k in cfg},
                           "seed": cfg.get("seed", 42),
                           "micro_batch_size": cfg.get(_SHAPE_KEYS[0], 8),
                           "sequence_len": cfg.get(_SHAPE_KEYS[1], 2048)})
    return theirs, options, callback


def check_llamafactory_config(cfg: Mapping[str, Any]) -> None:
    """Refuse, with one line each, the LLaMA-Factory settings IST cannot honour.

    Refused: ``stage`` other than :data:`STAGES`, the optimizer choices of
    :data:`REFUSED_KEYS`, DeepSpeed (``deepspeed:``; :data:`DEEPSPEED_REFUSAL`), a
    finetuning type other than LoRA (QLoRA: with ``quantization_bit``) or full, and
    ``torch_compile``.

    Raises:
        ValueError: naming the setting and the fix.

    Example:
        >>> check_llamafactory_config({"stage": "sft", "finetuning_type": "lora"})
        >>> check_llamafactory_config({"stage": "sft", "use_badam": True})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: use_badam=True: BAdam trains one block at a time ...: remove use_badam ...
    """
    stage = cfg.get("stage", "sft")
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: ist-llamafactory runs the stages {STAGES}; "
                         "PPO builds its optimizers in its own loop")
    for key, why in REFUSED_KEYS.items():
        value = cfg.get(key)
        if value not in (None, False):
            raise ValueError(
                f"{key}={value!r}: {why}; IST chooses the layers and wraps the optimizer "
                f"LLaMA-Factory builds: remove {key} (ist_active_layers sets the layers per "
                "step)")
    if cfg.get("deepspeed"):
        raise ValueError(f"deepspeed={cfg['deepspeed']!r}: {DEEPSPEED_REFUSAL}")
    kind = cfg.get("finetuning_type", "lora")
    if kind not in ("lora", "full"):
        raise ValueError(f"finetuning_type={kind!r}: ist-llamafactory trains lora (QLoRA "
                         "with quantization_bit) or full; IST samples transformer blocks")
    if cfg.get("torch_compile"):
        raise ValueError(
            "torch_compile: true compiles the whole model, and every IST step freezes other "
            "layers, so each active set would recompile it; set torch_compile: false")


def for_ddp(args: Mapping[str, Any], options: Mapping[str, Any],
            world_size: int) -> dict[str, Any]:
    """LLaMA-Factory's keys for a run on ``world_size`` processes. Under DDP the layers
    that sit out a step get no gradient, so DDP must look for unused parameters
    (``ddp_find_unused_parameters``, which LLaMA-Factory turns off for LoRA when unset),
    and that search cannot follow reentrant checkpointing (``use_reentrant_gc``,
    LLaMA-Factory's default: DDP fails with "Expected to mark a variable ready only
    once"). IST sets both where they are unset and gradient checkpointing is on.

    Raises:
        ValueError: for ``ddp_find_unused_parameters: false`` or ``use_reentrant_gc:
            true`` under DDP with frozen inactive layers (IST's default).

    Example:
        >>> for_ddp({"stage": "sft"}, {}, world_size=2)
        {'stage': 'sft', 'ddp_find_unused_parameters': True, 'use_reentrant_gc': False}
        >>> for_ddp({"stage": "sft"}, {}, world_size=1)
        {'stage': 'sft'}
    """
    args = dict(args)
    if world_size <= 1 or options.get("freeze_inactive", True) is False:
        return args
    why = DDP_UNUSED_REASON
    if args.get("ddp_find_unused_parameters") is False:
        raise ValueError(f"ddp_find_unused_parameters=False {why}; remove the key (IST sets "
                         "it to true) or set it to true")
    args.setdefault("ddp_find_unused_parameters", True)
    if not args.get("disable_gradient_checkpointing"):
        if args.get("use_reentrant_gc") is True:
            raise ValueError(f"use_reentrant_gc=True {why}, which reentrant checkpointing "
                             "defeats; remove the key (IST sets it to false) or set it to "
                             "false")
        args.setdefault("use_reentrant_gc", False)
    return args


def _trainer_classes() -> list[type]:
    """LLaMA-Factory's trainer classes that define ``create_optimizer``."""
    from transformers import Trainer

    found = []
    for name in _TRAINER_MODULES:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Trainer)
                    and value.__module__ == name and "create_optimizer" in vars(value)):
                found.append(value)
    if not found:
        raise RuntimeError(
            "found no LLaMA-Factory trainer with a create_optimizer in "
            f"{', '.join(_TRAINER_MODULES)}: this llamafactory release builds its optimizer "
            "elsewhere; ist-llamafactory supports llamafactory 0.9.5")
    return found


@contextlib.contextmanager
def ist_trainers(options: Mapping[str, Any], *, importance_batches: str | None = None,
                 log_layers: bool = True) -> Iterator[list[type]]:
    """While inside, LLaMA-Factory's trainers train with IST: their ``create_optimizer``
    keeps a 4-bit base's layout (:func:`~ist_optim.integrations.keep_4bit_layout`), lets
    LLaMA-Factory build its optimizer, then puts an ``ISTOptimizer`` around it
    (:func:`ist_optim.integrations.wrap.wrap_built_optimizer`) and attaches the IST
    callback. Restored on exit. Yields the patched classes."""
    from .callback import add_ist_callback

    classes = _trainer_classes()
    originals = {cls: vars(cls)["create_optimizer"] for cls in classes}

    def wrap(original: Any) -> Any:
        def create_optimizer(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.optimizer is None:
                kept = keep_4bit_layout(self.model)
                if kept:
                    logger.info("IST: %d 4-bit layers keep their training layout "
                                "(bitsandbytes repacks them for its CPU kernel in the "
                                "importance rounds' eval forwards otherwise)", kept)
                built = original(self, *args, **kwargs)  # LLaMA-Factory's own choice
                optimizer = wrap_built_optimizer(self, built, options)
                logger.info("%s", describe(optimizer))
                add_ist_callback(self, importance_batches=importance_batches,
                                 log_layers=log_layers)
            return self.optimizer

        create_optimizer.__doc__ = original.__doc__
        return create_optimizer

    try:
        for cls, original in originals.items():
            cls.create_optimizer = wrap(original)
        yield classes
    finally:
        for cls, original in originals.items():
            cls.create_optimizer = original


def register_v1_optimizer() -> bool:
    """Register ``ist`` in LLaMA-Factory's v1 ``OptimizerPlugin`` registry, where it exists:
    ``optim_config: {name: ist, ...}`` then builds ``ISTOptimizer(AdamW, model, **rest)``
    (``lr`` and AdamW's keywords pass to AdamW, ``ist_*``-less IST option names to IST).
    Returns whether the registry was found."""
    try:
        from llamafactory.v1.plugins.trainer_plugins.optimizer import OptimizerPlugin
    except ImportError:
        return False
    if not hasattr(OptimizerPlugin("ist"), "register"):
        return False

    @OptimizerPlugin("ist").register()
    def build(model: Any, config: Any) -> Any:
        import torch

        from ..optimizer import ISTOptimizer

        kwargs = {k: v for k, v in dict(config).items() if k != "name"}
        return ISTOptimizer(torch.optim.AdamW, model, **kwargs)

    return True


def _read_config(path: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The YAML with ``key=value`` overrides, as ``llamafactory-cli train`` reads it
    (OmegaConf, which LLaMA-Factory installs; plain YAML without overrides otherwise)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        if overrides:
            raise ValueError("key=value overrides need omegaconf, which LLaMA-Factory "
                             "installs: pip install llamafactory") from None
        import yaml

        with open(path, encoding="utf-8") as file:
            config = yaml.safe_load(file)
    else:
        merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_cli(list(overrides)))
        config = OmegaConf.to_container(merged)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of LLaMA-Factory keys")
    return config


USAGE = ("usage: ist-llamafactory train CONFIG.yaml [key=value ...]\n"
         "LLaMA-Factory's train command with IST: the YAML takes ist_* keys "
         "(docs/llamafactory.md)")


def main(argv: Sequence[str] | None = None) -> int:
    """``ist-llamafactory train cfg.yaml [key=value ...]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "train" or not argv[1].endswith((".yaml", ".yml")):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        cfg = _read_config(argv[1], argv[2:])
        check_llamafactory_config(cfg)
        args, options, callback = split_config(cfg)
        args = for_ddp(args, options, int(os.environ.get("WORLD_SIZE", "1")))
    except (ValueError, TypeError, OSError) as err:
        print(f"ist-llamafactory: {err}", file=sys.stderr)
        return 2
    try:
        from llamafactory.train.tuner import run_exp
    except ImportError as err:
        print(f"ist-llamafactory: needs LLaMA-Factory ({err}): pip install llamafactory",
              file=sys.stderr)
        return 2
    register_v1_optimizer()
    package_log = logging.getLogger("ist_optim")
    if not package_log.handlers:  # LLaMA-Factory shows its own loggers' INFO lines only
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[ist_optim] %(message)s"))
        package_log.addHandler(handler)
        package_log.setLevel(logging.INFO)
    source = callback.get("ist_importance_batches", "last")
    with ist_trainers(options, importance_batches=None if source == "last" else source,
                      log_layers=bool(callback.get("ist_log_layers", True))):
        run_exp(args=args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
