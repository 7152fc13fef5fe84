"""Value checks on a composed run config, so a bad value fails at start with one line naming the key.

Unknown keys are already rejected by Hydra (the composed config is in struct mode).
"""
from __future__ import annotations

from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from .engine.evaluator import EVAL_MODES
from .engine.optim import LR_SCHEDULES, OPTIMIZERS
from .engine.param_groups import LAYER_DECAY_TYPES
from .errors import ConfigError
from .engine.precision import PRECISIONS
from .hardness import IMAGE_REDUCTIONS
from .losses import DENOMINATORS, LOSS_NAMES
from .methods import METHODS
from .methods.mask2former import fixed_map_options
from .methods.labelled_loss import AUX_LOSSES, HL_IGNORE_MODES, HL_OHEM_MODES, HL_SCOPES, HL_SOURCES

__all__ = ["CHOICES", "ConfigError", "check_config"]

# Every choice list of the run config, checked here once at start; the code behind them trusts the values.
CHOICES = {
    "method.name": METHODS,
    "hl.scope": HL_SCOPES,
    "hl.image_reduce": IMAGE_REDUCTIONS,
    "hl.ignore": HL_IGNORE_MODES,
    "hl.semisup.ohem": HL_OHEM_MODES,
    "hl.source": HL_SOURCES,
    "loss.aux_name": AUX_LOSSES,
    "loss.ce_denominator": DENOMINATORS,
    "loss.name": LOSS_NAMES,
    "optim.name": OPTIMIZERS,
    "optim.lr_schedule": LR_SCHEDULES,
    "train.norm": ("bn", "syncbn"),
    "train.precision": PRECISIONS,
    "eval.mode": EVAL_MODES,
    "eval.select_from": (None, "all", "final_protocol"),
    "device": ("auto", "cpu", "cuda"),
    "logger.name": ("wandb", "none"),
    "data.on_bad_sample": ("error", "skip"),
}
POSITIVE_INTS = ("train.iters", "train.batch_size", "train.max_batch_per_device", "eval.batch_size",
                 "eval.window_batch", "train.log_interval", "train.reference.gpus", "train.reference.per_gpu")
NON_NEGATIVE = ("hl.lam", "hl.offset", "train.num_workers", "train.eval_interval", "train.ckpt_interval",
                "train.keep_checkpoints", "train.skip_nonfinite",
                "train.hl_map_interval", "optim.lr")


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _resolve_all(cfg) -> None:
    """Resolve every interpolation once, so a value derived from input (hlbench/epochs.py reads the split lists)
    fails here with its own one-line ConfigError rather than OmegaConf's wrapper, wherever it is first read."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as err:
        cause = err
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise ConfigError(f"{err.full_key}: {cause}") from None


def check_config(cfg) -> None:
    """Raise ConfigError (one line) for the first invalid value."""
    _resolve_all(cfg)
    for key, allowed in CHOICES.items():
        if (value := _get(cfg, key)) not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; expected one of {', '.join(map(str, allowed))}")
    for key in POSITIVE_INTS:
        value = _get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key}={value!r} is not valid; expected an integer >= 1")
    for key in NON_NEGATIVE:
        value = _get(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key}={value!r} is not valid; expected a number >= 0")
    if cfg.hl.scope == "group" and cfg.hl.group_size < 1:
        raise ConfigError(f"hl.group_size={cfg.hl.group_size!r} is not valid; expected an integer >= 1")
    divisor = cfg.eval.get("size_divisor")
    if divisor is not None and (isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1):
        raise ConfigError(f"eval.size_divisor={divisor!r} is not valid; expected null or an integer >= 1")
    for where, proto in (("eval", cfg.eval), ("eval.during", cfg.eval.during or {"mode": "whole"})):
        if proto["mode"] not in EVAL_MODES:
            raise ConfigError(f"{where}.mode={proto['mode']!r} is not valid; expected one of {', '.join(EVAL_MODES)}")
        if proto["mode"] != "whole" and not proto.get("crop"):
            raise ConfigError(f"{where}.mode={proto['mode']} needs {where}.crop=[h,w]")
        if proto["mode"].startswith("slide") and not proto.get("stride"):
            raise ConfigError(f"{where}.mode={proto['mode']} needs {where}.stride=[h,w]")
    if cfg.loss.focal_reference_bug and cfg.loss.name != "focal":
        raise ConfigError(f"loss.focal_reference_bug=true reproduces a bug of the authors' focal loss; it needs "
                          f"loss.name=focal, got {cfg.loss.name!r}")
    streams = METHODS[cfg.method.name].hl_streams
    if unknown := sorted(set(cfg.hl.semisup.apply_to) - set(streams)):
        raise ConfigError(f"hl.semisup.apply_to has {unknown}, which method={cfg.method.name} does not have; "
                          f"expected any of {', '.join(streams)}")
    if cfg.hl.image_reduce == "sum" and cfg.hl.scope in ("reference", "batch"):
        # Summing per-GPU normalisers would scale the loss with the device layout.
        raise ConfigError(f"hl.image_reduce=sum is for hl.scope=image|group, got hl.scope={cfg.hl.scope}")
    if cfg.hl.enabled and cfg.hl.source == "fixed" and not cfg.data.get("hl_map_dir"):
        raise ConfigError("hl.source=fixed needs data.hl_map_dir=<folder of stored HL maps>; python -m hlbench.hlmap "
                          "export experiment=<HL experiment> checkpoint=<file> out=<folder> writes one")
    _check_mask2former(cfg)
    if cfg.hl.offset == 0:
        raise ConfigError("hl.offset=0 is not valid; expected > 0 (the offset bounds the weight ratio)")
    channels = cfg.hl.head_channels
    if channels is not None and (not isinstance(channels, int) or isinstance(channels, bool) or channels < 1):
        raise ConfigError(f"hl.head_channels={channels!r} is not valid; expected null (the decode head's) or an "
                          f"integer >= 1")
    _check_paramwise(cfg.optim.paramwise)


def _check_mask2former(cfg) -> None:
    """method=mask2former and the mask2former head go together (the other methods read per-pixel logits); its HL is
    a stored map (hl.source=fixed) entering the loss as hl.fixed_map says, whose values FixedMapOptions checks."""
    mask_head = cfg.model.head.get("type") == "mask2former"
    if (cfg.method.name == "mask2former") != mask_head:
        raise ConfigError(f"method={cfg.method.name} with model.head.type={cfg.model.head.get('type')}: the "
                          f"mask2former head trains only with method=mask2former, and that method only with it")
    options = fixed_map_options(cfg)  # a ConfigError naming the hl.fixed_map key for a bad value
    if not mask_head or not cfg.hl.enabled:
        return
    if cfg.hl.source != "fixed":
        raise ConfigError("hl.source=online with Mask2Former: its HL map comes from another model's export "
                          "(hl.source=fixed, data.hl_map_dir); it has no HL branch of its own")
    if options.mode == "off":
        raise ConfigError("hl.fixed_map.mode=off on an HL run would train plain Mask2Former under the HL row's name; "
                          "set a mode, or hl.enabled=false for the baseline")


def _multiplier(key, value, nullable=False) -> None:
    if value is None and nullable:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}={value!r} is not valid; expected a number >= 0{' or null' if nullable else ''}")


def _check_paramwise(paramwise) -> None:
    """optim.paramwise (engine/param_groups.py): multipliers are numbers >= 0, custom keys set only lr_mult and
    decay_mult, and layer_decay, which replaces the other rules as in mmseg, comes alone."""
    for name, rule in (paramwise.custom_keys or {}).items():
        where = f"optim.paramwise.custom_keys.{name}"
        if not OmegaConf.is_dict(rule) or not rule or set(rule) - {"lr_mult", "decay_mult"}:
            raise ConfigError(f"{where}={rule!r} is not valid; expected {{lr_mult: x, decay_mult: y}} (either or both)")
        for key, value in rule.items():
            _multiplier(f"{where}.{key}", value)
    for key in ("norm_decay_mult", "bias_decay_mult"):
        _multiplier(f"optim.paramwise.{key}", paramwise[key], nullable=True)
    decay = paramwise.layer_decay
    if decay is None:
        return
    if not OmegaConf.is_dict(decay) or set(decay) != {"type", "rate", "num_layers"}:
        raise ConfigError(f"optim.paramwise.layer_decay={decay!r} is not valid; expected null or {{type: stage_wise, "
                          f"rate: r, num_layers: n}}")
    if decay.type not in LAYER_DECAY_TYPES:
        raise ConfigError(f"optim.paramwise.layer_decay.type={decay.type!r} is not valid; expected one of "
                          f"{', '.join(LAYER_DECAY_TYPES)}")
    if not isinstance(decay.rate, (int, float)) or isinstance(decay.rate, bool) or not 0 < decay.rate <= 1:
        raise ConfigError(f"optim.paramwise.layer_decay.rate={decay.rate!r} is not valid; expected a number in (0, 1]")
    if not isinstance(decay.num_layers, int) or isinstance(decay.num_layers, bool) or decay.num_layers < 1:
        raise ConfigError(f"optim.paramwise.layer_decay.num_layers={decay.num_layers!r} is not valid; expected an "
                          f"integer >= 1")
    others = ["custom_keys"] if paramwise.custom_keys else []
    others += [k for k in ("norm_decay_mult", "bias_decay_mult") if paramwise[k] is not None]
    if others:
        raise ConfigError(f"optim.paramwise.layer_decay replaces the other paramwise rules (mmseg's "
                          f"LearningRateDecayOptimizerConstructor); remove optim.paramwise.{others[0]}")
