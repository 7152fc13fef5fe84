"""Value checks on a composed run config, so a bad value fails at start with one line naming the key.

Unknown keys are already rejected by Hydra (the composed config is in struct mode).
"""
from __future__ import annotations

from .hardness import IMAGE_REDUCTIONS, SCOPES
from .losses import DENOMINATORS, LOSS_NAMES

CHOICES = {
    "hl.scope": SCOPES,
    "hl.image_reduce": IMAGE_REDUCTIONS,
    "hl.ignore": ("keep", "exclude"),
    "loss.ce_denominator": DENOMINATORS,
    "loss.name": LOSS_NAMES,
    "optim.name": ("sgd", "adamw"),
    "train.norm": ("bn", "syncbn"),
    "eval.mode": ("whole", "slide"),
    "device": ("auto", "cpu", "cuda"),
    "logger.name": ("wandb", "none"),
}
POSITIVE_INTS = ("train.iters", "train.batch_size", "train.max_batch_per_device", "eval.batch_size",
                 "eval.window_batch", "train.log_interval")
NON_NEGATIVE = ("hl.lam", "hl.offset", "train.num_workers", "train.eval_interval", "train.ckpt_interval",
                "train.hl_map_interval", "optim.lr")


class ConfigError(ValueError):
    """A bad configuration value; reported as one line naming the key."""


# The authors' HL knobs (method.md §13); runs matching all of them are tagged hl_variant:reference.
HL_REFERENCE = {"lam": 0.01, "offset": 0.1, "scope": "batch", "ignore": "keep", "detach_features": True,
                "weight_aux": False, "lr_mult": 1.0}


def hl_variant(cfg) -> str:
    """"reference" when every HL knob equals the authors' code, else "custom"; "off" without HL."""
    if not cfg.hl.enabled:
        return "off"
    return "reference" if all(cfg.hl[k] == v for k, v in HL_REFERENCE.items()) else "custom"


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_config(cfg) -> None:
    """Raise ConfigError (one line) for the first invalid value."""
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
    if cfg.eval.mode == "slide" and (not cfg.eval.crop or not cfg.eval.stride):
        raise ConfigError("eval.mode=slide needs eval.crop=[h,w] and eval.stride=[h,w]")
    if cfg.hl.offset == 0:
        raise ConfigError("hl.offset=0 is not valid; expected > 0 (the offset bounds the weight ratio)")
