"""HRNet (Wang et al., "Deep High-Resolution Representation Learning for Visual Recognition", HRNetV2) with mmseg
1.x's module and key names, so the MSRA ImageNet files mmseg names (open-mmlab://msra/hrnetv2_*) load as they are.

mmseg's fuse step differs from timm's: a lower branch is upsampled bilinearly (align_corners False) by the stride
ratio and then resized to the target branch's exact size, so any input size works (TotalText is tested at
arbitrary sizes); timm upsamples by nearest neighbour.
"""

import torch.nn as nn

from hlbench.errors import ConfigError
from hlbench.models.heads import resize
from hlbench.models.resnet import BasicBlock, Bottleneck, make_stage

BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}
STAGE_KEYS = ("num_modules", "num_branches", "block", "num_blocks", "num_channels")
STEM_CHANNELS = 64  # fixed in mmseg's HRNet and in the ImageNet files


def _conv_bn(cin, cout, kernel_size, stride=1, relu=True):
    """conv + BN (+ ReLU) as a plain Sequential: mmseg's transition and fuse keys are `<i>.0.weight`, `<i>.1.*`."""
    layers = [nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def fuse_upsample(x, factor, size):
    """mmseg's fuse upsampling: bilinear to int(side · factor), then bilinear to the target branch's `size`. On odd
    sides the two differ (13 → 26 → 25), and matching mmseg's logits needs both steps."""
    x = resize(x, [int(side * factor) for side in x.shape[2:]], align_corners=False)
    return resize(x, size, align_corners=False)


class HRModule(nn.Module):
    """One exchange unit: each branch runs its blocks (`branches`), then every output branch sums all branches
    brought to its resolution (`fuse_layers[i][j]`: 1×1 conv + BN + upsampling from a lower branch, a chain of
    stride-2 3×3 convs from a higher one), followed by ReLU.

    Args:
        multiscale_output: fuse to every branch; False fuses to branch 0 only (mmseg's last module of stage 4 with
            multiscale_output=False).
    """

    def __init__(self, block, num_blocks, channels, multiscale_output=True):
        super().__init__()
        widths = [c * block.expansion for c in channels]
        self.branches = nn.ModuleList(make_stage(block, w, c, 1, [1] * n)[0]
                                      for w, c, n in zip(widths, channels, num_blocks))
        self.num_outputs = len(widths) if multiscale_output else 1
        if len(widths) > 1:
            self.fuse_layers = nn.ModuleList(nn.ModuleList(self._fuse(widths, j, i) for j in range(len(widths)))
                                             for i in range(self.num_outputs))

    @staticmethod
    def _fuse(widths, j, i):
        """Branch j brought to branch i's resolution and width (None: the branch itself)."""
        if j == i:
            return None
        if j > i:
            return _conv_bn(widths[j], widths[i], 1, relu=False)
        # Down by 2^(i-j): stride-2 convs keeping branch j's width, the last one to branch i's width without ReLU.
        steps = [_conv_bn(widths[j], widths[j], 3, 2) for _ in range(i - j - 1)]
        return nn.Sequential(*steps, _conv_bn(widths[j], widths[i], 3, 2, relu=False))

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if len(xs) == 1:
            return xs
        outs = []
        for i in range(self.num_outputs):
            # Summed in branch order, as mmseg, so that the rounding matches too.
            terms = [x if j == i else fuse(x) if j < i else fuse_upsample(fuse(x), 2 ** (j - i), xs[i].shape[2:])
                     for j, (fuse, x) in enumerate(zip(self.fuse_layers[i], xs))]
            outs.append(sum(terms).relu())
        return outs


def _stage_configs(extra):
    """mmseg's `extra` (stage1..stage4, each with STAGE_KEYS) checked, as a list of four dicts."""
    stages = []
    for k in range(1, 5):
        cfg = (extra or {}).get(f"stage{k}")
        if not isinstance(cfg, dict) or set(cfg) != set(STAGE_KEYS):
            raise ConfigError(f"model.backbone.extra.stage{k} needs exactly the keys {list(STAGE_KEYS)}, got "
                              f"{sorted(cfg) if isinstance(cfg, dict) else cfg!r}")
        if cfg["block"] not in BLOCKS:
            raise ConfigError(f"model.backbone.extra.stage{k}.block must be one of {sorted(BLOCKS)}, "
                              f"got {cfg['block']!r}")
        n = cfg["num_branches"]
        if len(cfg["num_blocks"]) != n or len(cfg["num_channels"]) != n or n < 1 or (k == 1 and n != 1):
            raise ConfigError(f"model.backbone.extra.stage{k}: num_blocks {list(cfg['num_blocks'])} and num_channels "
                              f"{list(cfg['num_channels'])} need one entry per branch ({n}; stage1 has one)")
        stages.append(cfg)
    return stages


class HRNet(nn.Module):
    """HRNetV2 backbone (mmseg HRNet): stem of two stride-2 3×3 convs (conv1/bn1, conv2/bn2, 64 channels),
    `layer1` (stage 1, one branch), then stages 2-4 of HRModules, each entered through a `transition` that adapts
    the existing branches' widths and adds a branch at half the resolution of the last. Returns the branches of
    the last stage, finest first (strides 4, 8, 16, 32).

    Args:
        extra: mmseg's stage configs, `stage1`..`stage4`, each with num_modules, num_branches, block ("BASIC" or
            "BOTTLENECK"), num_blocks and num_channels (one entry per branch); W18 / W18-Small / W48 are in
            hlbench/conf/model/ocrnet_hr*.yaml.
        multiscale_output: False returns branch 0 only, its last module fusing to that branch alone (mmseg).
    """

    def __init__(self, extra, multiscale_output=True):
        super().__init__()
        stages = _stage_configs(extra)
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.conv2 = nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        first = stages[0]
        self.layer1, width = make_stage(BLOCKS[first["block"]], STEM_CHANNELS, first["num_channels"][0], 1,
                                        [1] * first["num_blocks"][0])
        widths = [width]
        for k, cfg in enumerate(stages[1:], start=1):
            block = BLOCKS[cfg["block"]]
            new_widths = [c * block.expansion for c in cfg["num_channels"]]
            self.add_module(f"transition{k}", self._transition(widths, new_widths))
            last_stage = k == len(stages) - 1
            modules = [HRModule(block, cfg["num_blocks"], cfg["num_channels"],
                                multiscale_output or not (last_stage and m == cfg["num_modules"] - 1))
                       for m in range(cfg["num_modules"])]
            self.add_module(f"stage{k + 1}", nn.Sequential(*modules))
            widths = new_widths
        self.out_channels = widths if multiscale_output else widths[:1]
        # mmseg HRNet's init: Kaiming (fan_out) convs, unit BN.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _transition(widths, new_widths):
        """Per new branch: None (kept), a 3×3 conv to its new width, or (a branch the stage adds) stride-2 3×3 convs
        from the last branch, keeping its width until the last one."""
        layers = []
        for i, w in enumerate(new_widths):
            if i < len(widths):
                layers.append(None if widths[i] == w else _conv_bn(widths[i], w, 3))
            else:
                steps = i + 1 - len(widths)
                layers.append(nn.Sequential(*(_conv_bn(widths[-1], w if s == steps - 1 else widths[-1], 3, 2)
                                              for s in range(steps))))
        return nn.ModuleList(layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        xs = [self.layer1(self.relu(self.bn2(self.conv2(x))))]
        for k in range(1, 4):
            transition = getattr(self, f"transition{k}")
            xs = [xs[i] if t is None else t(xs[min(i, len(xs) - 1)]) for i, t in enumerate(transition)]
            xs = getattr(self, f"stage{k + 1}")(xs)
        return tuple(xs)
