"""hlbench: pixel-hardness learning (HL) for semantic segmentation, in plain PyTorch."""
