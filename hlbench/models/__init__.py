"""Model zoo: ResNet backbones, mmseg-compatible decode heads and the Segmentor with its HL branch."""

from hlbench.models.build import BACKBONES, HEADS, build_model, trained_model
from hlbench.models.checkpoints import load_checkpoint
from hlbench.models.pretrained import load_pretrained
from hlbench.models.segmentor import Segmentor

__all__ = ["BACKBONES", "HEADS", "Segmentor", "build_model", "load_checkpoint", "load_pretrained", "trained_model"]
