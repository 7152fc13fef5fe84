"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") as mmpretrain 1.x builds it for mmseg's UPerNet configs,
under mmpretrain's state-dict keys so that the mmcls ImageNet files load as is."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from hlbench.errors import ConfigError
from hlbench.models.transformer_parts import DropPath, check_stage_lists, drop_path_rates

# mmpretrain's LN2d default, the official ConvNeXt's LayerNorm eps.
LN_EPS = 1e-6


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map (mmpretrain's LayerNorm2d): normalised channels-last, so
    that it is the same op as the blocks' LayerNorm on permuted features."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2).contiguous()


class ConvNeXtBlock(nn.Module):
    """7×7 depthwise conv, LayerNorm, inverted bottleneck (4×) as Linear layers on channels-last features, layer
    scale `gamma`, stochastic depth on the residual branch."""

    def __init__(self, channels, drop_prob, layer_scale_init_value, mlp_ratio=4):
        super().__init__()
        self.depthwise_conv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=LN_EPS)
        self.pointwise_conv1 = nn.Linear(channels, mlp_ratio * channels)
        self.act = nn.GELU()
        self.pointwise_conv2 = nn.Linear(mlp_ratio * channels, channels)
        self.gamma = nn.Parameter(torch.full((channels,), float(layer_scale_init_value)))
        self.drop_path = DropPath(drop_prob)

    def forward(self, x):
        out = self.norm(self.depthwise_conv(x).permute(0, 2, 3, 1))
        out = self.pointwise_conv2(self.act(self.pointwise_conv1(out))).permute(0, 3, 1, 2)
        return x + self.drop_path(out * self.gamma.view(1, -1, 1, 1))


class ConvNeXt(nn.Module):
    """mmpretrain ConvNeXt with `gap_before_final_norm=False`: `downsample_layers` (the 4×4 stem conv + LayerNorm,
    then LayerNorm + 2×2 stride-2 conv before stages 1-3), `stages` of ConvNeXtBlocks, and a LayerNorm `norm{i}`
    on each of the four outputs. The ImageNet files fill at most norm3 (the classifier's final norm); norm0-2 start
    at (1, 0).

    Args:
        depths, channels: blocks and width per stage (ConvNeXt-B: 3, 3, 27, 3 and 128, 256, 512, 1024).
        drop_path_rate: stochastic depth of the last block, rising linearly from 0 over all blocks.
        layer_scale_init_value: initial value of every block's `gamma` (mmseg's UPerNet configs: 1.0).
    """

    def __init__(self, depths=(3, 3, 27, 3), channels=(128, 256, 512, 1024), drop_path_rate=0.4,
                 layer_scale_init_value=1.0):
        super().__init__()
        check_stage_lists("convnext", len(depths), channels=channels)
        if layer_scale_init_value <= 0:
            raise ConfigError(f"model.backbone.layer_scale_init_value must be > 0 (the blocks' gamma), got "
                              f"{layer_scale_init_value}")
        stem = nn.Sequential(nn.Conv2d(3, channels[0], 4, stride=4), ChannelsFirstLayerNorm(channels[0], eps=LN_EPS))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(ChannelsFirstLayerNorm(cin, eps=LN_EPS), nn.Conv2d(cin, cout, 2, stride=2))
            for cin, cout in zip(channels[:-1], channels[1:])])
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(c, p, layer_scale_init_value) for p in rates))
            for c, rates in zip(channels, drop_path_rates(drop_path_rate, depths)))
        for i, c in enumerate(channels):
            self.add_module(f"norm{i}", ChannelsFirstLayerNorm(c, eps=LN_EPS))
        self.out_channels = list(channels)
        # mmpretrain's init: truncated normal (std 0.02) convs and linears with zero biases.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        outs = []
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers, self.stages)):
            x = stage(downsample(x))
            outs.append(getattr(self, f"norm{i}")(x))
        return outs
