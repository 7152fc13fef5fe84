"""Training methods: each turns a batch into (loss, logs) for the shared train loop; HL plugs into any of them."""
from .supervised import Supervised

METHODS = {"supervised": Supervised}


def build_method(cfg, ignore_index: int):
    """The method named by cfg.method.name, configured from the run config."""
    name = cfg.method.name
    if name not in METHODS:
        raise ValueError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name](hl=cfg.hl, loss=cfg.loss, ignore_index=ignore_index, aux_weight=cfg.model.aux.weight)
