"""hlbench: pixel-hardness learning (HL) for semantic segmentation, in plain PyTorch."""
from .epochs import register_resolvers

# Configs name `${epoch_iters:...}` (hlbench/epochs.py); any reader of a config tree imports hlbench first.
register_resolvers()
