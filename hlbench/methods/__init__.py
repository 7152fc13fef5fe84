"""Training methods: each turns a batch into (loss, logs) for the shared train loop; HL plugs into any of them."""
from omegaconf import OmegaConf

from .supervised import Supervised

METHODS = {"supervised": Supervised}


def build_method(cfg, ignore_index: int):
    """The method named by cfg.method.name, configured from the run config."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    stage0_weight = OmegaConf.select(cfg, "model.head.stage0.weight", default=0.4)
    return METHODS[name](hl=cfg.hl, loss=cfg.loss, ignore_index=ignore_index, aux_weight=cfg.model.aux.weight,
                         stage0_weight=stage0_weight)
