"""mmseg's SegformerHead, which the authors' SegFormer rows ran. The SegFormer paper's all-MLP decoder (and HF
transformers') uses Linear layers without normalisation; mmseg's uses 1×1 conv + BN + ReLU modules instead."""

import torch
import torch.nn as nn

from hlbench.errors import ConfigError
from hlbench.models.heads import ConvBNReLU, DecodeHead, resize


class SegformerHead(DecodeHead):
    """Each stage read projected to `channels` by a 1×1 ConvBNReLU (`convs`), upsampled to the first read stage's
    size, concatenated and fused by a 1×1 ConvBNReLU (`fusion_conv`), then `conv_seg`.

    Args:
        in_channels: channels of each stage read (list, one per entry of in_index).
        in_index: backbone stages read, finest first (mmseg: [0, 1, 2, 3]).
    """

    def __init__(self, in_channels, channels, num_classes, in_index=(0, 1, 2, 3), **kwargs):
        if not isinstance(in_channels, list) or len(in_channels) != len(in_index):
            raise ConfigError(f"SegformerHead needs a list model.head.in_index (one per stage read), got {in_index}")
        super().__init__(in_channels, channels, num_classes, in_index=list(in_index), **kwargs)
        self.convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels)
        self.fusion_conv = ConvBNReLU(len(in_channels) * channels, channels, 1)

    def forward(self, inputs):
        levels = [inputs[i] for i in self.in_index]
        size = levels[0].shape[2:]
        outs = [resize(conv(x), size, self.align_corners) for conv, x in zip(self.convs, levels)]
        return self.classify(self.fusion_conv(torch.cat(outs, dim=1)))
