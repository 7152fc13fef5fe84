"""compose(overrides): the run config as `python -m hlbench.run <overrides>` composes it, from anywhere.

The runner, the benchmark, the weights list and the tests all compose through it, so that they read the same
config tree the same way. Inside a running Hydra app (the runner) it uses that app's context; elsewhere it opens
one for the call.
"""
from __future__ import annotations

from contextlib import nullcontext

import hydra
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONFIG_MODULE = "hlbench.conf"
VERSION_BASE = "1.3"


def hydra_context():
    """A Hydra context on hlbench's config tree, unless one is already open."""
    if GlobalHydra.instance().is_initialized():
        return nullcontext()
    return initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE)


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The composed run config for `overrides` (with Hydra's own node when `return_hydra_config`, which holds the
    runtime choices, e.g. which experiment and profile)."""
    with hydra_context():
        return hydra.compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
