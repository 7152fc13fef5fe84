"""The Lite R-ASPP head of MobileNetV3 (Howard et al. 2019, §6.3) as mmseg 1.x builds it, with mmseg's keys."""

import torch
import torch.nn as nn

from hlbench.errors import ConfigError
from hlbench.models.heads import DecodeHead, resize
from hlbench.models.mobilenet import ConvNormAct, init_conv_weights

# mmseg's image pooling: a 49×49 average pool with strides (16, 20), sized for 1/8 of a 512×1024 crop (a 64×128
# map, pooled to 1×4). The deepest input must therefore be at least 49×49: at output stride 8, an input of 385+.
# mmseg fixes it; `pool_kernel` / `pool_stride` exist for the toy model of profile=smoke (tiny/lraspp_mobilenetv3).
IMAGE_POOL_KERNEL, IMAGE_POOL_STRIDE = 49, (16, 20)


class LRASPPHead(DecodeHead):
    """LR-ASPP: the deepest input through `aspp_conv` (1×1 conv, BN, ReLU) gated by a sigmoid of its pooled context
    (`image_pool`), then `conv_up_input`; then, from the deepest skip to the finest, upsample, concatenate the skip's
    1×1 projection (`convs.conv<i>`) and fuse (`conv_ups.conv_up<i>`, 1×1 conv, BN, ReLU).

    Args:
        in_index: the stages read, finest first; the last one is the deep input, the others the skips (mmseg:
            MobileNetV3 layers 1, 3 and 16, i.e. all three of its outputs).
        branch_channels: width of each skip's projection, one per skip.
        bn_eps: of the head's BNs (the authors' config: 1e-3, as the backbone's).
        pool_kernel, pool_stride: of the image pooling (mmseg's 49 and (16, 20)).
    """

    def __init__(self, in_channels, channels, num_classes, in_index=(0, 1, 2), branch_channels=(32, 64), bn_eps=1e-5,
                 pool_kernel=IMAGE_POOL_KERNEL, pool_stride=IMAGE_POOL_STRIDE, **kwargs):
        if not isinstance(in_channels, list) or len(in_channels) != len(branch_channels) + 1:
            raise ConfigError(f"LRASPPHead reads one stage per branch_channels entry plus the deep one; got in_index "
                              f"{in_index} and branch_channels {list(branch_channels)}")
        super().__init__(in_channels, channels, num_classes, in_index=list(in_index), **kwargs)
        self.convs = nn.Sequential()
        self.conv_ups = nn.Sequential()
        for i, (cin, width) in enumerate(zip(in_channels, branch_channels)):
            self.convs.add_module(f"conv{i}", nn.Conv2d(cin, width, 1, bias=False))
            self.conv_ups.add_module(f"conv_up{i}", ConvNormAct(channels + width, channels, act=nn.ReLU,
                                                                bn_eps=bn_eps))
        self.conv_up_input = nn.Conv2d(channels, channels, 1)
        self.aspp_conv = ConvNormAct(in_channels[-1], channels, act=nn.ReLU, bn_eps=bn_eps)
        self.image_pool = nn.Sequential(nn.AvgPool2d(pool_kernel, pool_stride),
                                        ConvNormAct(in_channels[-1], channels, act=nn.Sigmoid, norm=False, bias=False))
        # mmcv ConvModule's Kaiming init for the conv-BN-act modules; the plain convs keep PyTorch's, as in mmseg.
        for m in self.modules():
            if isinstance(m, ConvNormAct):
                init_conv_weights(m)

    def forward(self, inputs):
        *skips, x = [inputs[i] for i in self.in_index]
        x = self.aspp_conv(x) * resize(self.image_pool(x), x.shape[2:], self.align_corners)
        x = self.conv_up_input(x)
        for i in reversed(range(len(skips))):
            x = resize(x, skips[i].shape[2:], self.align_corners)
            x = self.conv_ups[i](torch.cat([x, self.convs[i](skips[i])], dim=1))
        return self.classify(x)
