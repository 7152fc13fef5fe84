"""compose(overrides): the run config as `python -m hlbench.run <overrides>` composes it, from anywhere.

The runner, the benchmark, the weights list and the tests all compose through it, so that they read the same
config tree the same way. Inside a running Hydra app (the runner) it uses that app's context; elsewhere it opens
one for the call.

`profile=smoke` trains, in place of the experiment's model, the tiny model of the same family that the model config
names under `smoke` (hlbench/conf/model/tiny/): compose adds that `model=` choice, so the run is a model a file
describes rather than the experiment's model with some widths merged over.
"""
from __future__ import annotations

from contextlib import nullcontext

import hydra
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

CONFIG_MODULE = "hlbench.conf"
VERSION_BASE = "1.3"
SMOKE_PROFILE = "smoke"


def hydra_context():
    """A Hydra context on hlbench's config tree, unless one is already open."""
    if GlobalHydra.instance().is_initialized():
        return nullcontext()
    return initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE)


def profile_of(overrides: list[str]) -> str | None:
    """The profile the overrides choose (the last `profile=` wins, as in Hydra)."""
    chosen = [o.value() for o in OverridesParser.create().parse_overrides(list(overrides))
              if o.key_or_group == "profile"]
    return chosen[-1] if chosen else None


def with_smoke_model(overrides: list[str], model_cfg) -> list[str]:
    """The overrides plus `model=<the tiny model of the family>` where they choose profile=smoke and the composed
    model names one (a tiny model names none: it is its own dry run)."""
    if profile_of(overrides) != SMOKE_PROFILE or not model_cfg.get("smoke"):
        return list(overrides)
    return [*overrides, f"model={model_cfg.smoke}"]


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The composed run config for `overrides` (with Hydra's own node when `return_hydra_config`, which holds the
    runtime choices, e.g. which experiment and profile)."""
    with hydra_context():
        cfg = hydra.compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
        smoke = with_smoke_model(overrides, cfg.model)
        if smoke != list(overrides):
            cfg = hydra.compose("config", overrides=smoke, return_hydra_config=return_hydra_config)
        return cfg
