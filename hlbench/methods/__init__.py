"""Training methods the shared loop drives (base.Method); HL plugs into any of them via the labelled loss."""
from .base import Method, Stream
from .labelled_loss import LabelledLoss
from .mask2former import Mask2Former
from .supervised import Supervised
from .u2pl import U2PL
from .unimatch import UniMatch

METHODS = {"supervised": Supervised, "u2pl": U2PL, "unimatch": UniMatch, "mask2former": Mask2Former}

__all__ = ["METHODS", "LabelledLoss", "Mask2Former", "Method", "Stream", "Supervised", "U2PL", "build_method"]


def build_method(cfg) -> Method:
    """The method named by cfg.method.name (validated by hlbench.config_checks), configured from the run config."""
    return METHODS[cfg.method.name](cfg)
