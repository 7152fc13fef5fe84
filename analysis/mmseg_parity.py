"""Logit parity of hlbench models with mmsegmentation 1.2.2 given the same (random) weights.

Needs a scratch environment outside the repo with mmseg installed, and hlbench on the path; not imported by
the tests:
    python3 -m venv /tmp/mmseg-venv
    /tmp/mmseg-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 mmcv-lite==2.1.0 mmengine \
        mmsegmentation==1.2.2 ftfy regex omegaconf
    /tmp/mmseg-venv/bin/pip install mmpretrain==1.2.0   # for upernet_convnext_b's ConvNeXt
    PYTHONPATH=. /tmp/mmseg-venv/bin/python analysis/mmseg_parity.py [--size 97] [--width W] [--models ...]
Each mmseg model is randomly initialised (BN statistics too), saved as an mmseg 1.x checkpoint, loaded into the
hlbench model of the same config with hlbench.models.load_checkpoint, and both are run in eval mode on one image.
Then both run one training forward (BN batch statistics, dropout off) on two images: the decode logits, the
gradients of their sum and EMANet's updated bases are compared too.
"""
import argparse
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch
from omegaconf import OmegaConf

NUM_CLASSES = 19
MODEL_DIR = Path(__file__).resolve().parents[1] / "hlbench" / "conf" / "model"


def _stub_mmcv_ops():
    """mmcv-lite ships no compiled ops, and `mmcv.ops` fails on import; mmseg imports some at module level for heads
    we do not compare. Two heads we do compare need one: CCHead gets mmcv's own pure-torch CrissCrossAttention
    (mmcv/ops/cc_attention.py, loaded by path past the package's compiled imports), PSAHead hlbench's psa_mask
    (tested against a transcription of mmcv's kernel in tests/test_attention_heads.py)."""
    import mmcv

    from hlbench.models.attention_heads import psa_mask

    ops = types.ModuleType("mmcv.ops")

    def placeholder(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (torch.nn.Module,), {})

    class PSAMask(torch.nn.Module):
        def __init__(self, psa_type, mask_size):
            super().__init__()
            self.psa_type, self.mask_size = psa_type, mask_size

        def forward(self, x):
            return psa_mask(x, self.mask_size, self.psa_type)

    spec = importlib.util.spec_from_file_location("mmcv_cc_attention",
                                                  Path(mmcv.__file__).parent / "ops" / "cc_attention.py")
    cc_attention = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cc_attention)
    ops.CrissCrossAttention, ops.PSAMask = cc_attention.CrissCrossAttention, PSAMask
    ops.__getattr__ = placeholder
    sys.modules["mmcv.ops"] = ops


def _resnet(depth, dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1)):
    return dict(type="ResNetV1c", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3), dilations=dilations,
                strides=strides, norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False,
                style="pytorch", contract_dilation=True)


def _head(type, **options):
    """An mmseg decode head, by default on stage 4 of a ResNet-101 (2048 channels), as mmseg's _base_/models files."""
    return dict(dict(type=type, in_channels=2048, in_index=3, dropout_ratio=0.1, num_classes=NUM_CLASSES,
                     norm_cfg=dict(type="BN"), align_corners=False), **options)


def _aux(in_channels=1024, **options):
    return dict(dict(type="FCNHead", in_channels=in_channels, in_index=2, channels=256, num_convs=1,
                     concat_input=False, dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=dict(type="BN"),
                     align_corners=False), **options)


# hlbench model config name -> mmseg 1.x model dict (the numbers of mmseg's _base_/models/*_r50-d8.py files).
MMSEG_MODELS = {
    "pspnet_r101": dict(backbone=_resnet(101), decode_head=dict(
        type="PSPHead", in_channels=2048, in_index=3, channels=512, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
        num_classes=NUM_CLASSES, norm_cfg=dict(type="BN"), align_corners=False)),
    "deeplabv3plus_r101": dict(backbone=_resnet(101), decode_head=dict(
        type="DepthwiseSeparableASPPHead", in_channels=2048, in_index=3, channels=512, dilations=(1, 12, 24, 36),
        c1_in_channels=256, c1_channels=48, dropout_ratio=0.1, num_classes=NUM_CLASSES,
        norm_cfg=dict(type="BN"), align_corners=False)),
    "deeplabv3_r101": dict(backbone=_resnet(101), decode_head=dict(
        type="ASPPHead", in_channels=2048, in_index=3, channels=512, dilations=(1, 12, 24, 36), dropout_ratio=0.1,
        num_classes=NUM_CLASSES, norm_cfg=dict(type="BN"), align_corners=False)),
    "fcn_r101": dict(backbone=_resnet(101), decode_head=dict(
        type="FCNHead", in_channels=2048, in_index=3, channels=512, num_convs=2, concat_input=True,
        dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=dict(type="BN"), align_corners=False)),
    # mmseg upernet_r50: output stride 32, UPerHead on all four stages.
    "upernet_r50": dict(backbone=_resnet(50, dilations=(1, 1, 1, 1), strides=(1, 2, 2, 2)), decode_head=dict(
        type="UPerHead", in_channels=[256, 512, 1024, 2048], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
        channels=512, dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=dict(type="BN"), align_corners=False)),
    # The Cityscapes architecture table's attention heads (from the authors' log.json headers).
    "ann_r101": dict(backbone=_resnet(101), decode_head=_head(
        "ANNHead", in_channels=[1024, 2048], in_index=[2, 3], channels=512, project_channels=256, query_scales=(1,),
        key_pool_scales=(1, 3, 6, 8))),
    "ccnet_r101": dict(backbone=_resnet(101), decode_head=_head("CCHead", channels=512, recurrence=2)),
    "emanet_r101": dict(backbone=_resnet(101), decode_head=_head(
        "EMAHead", channels=256, ema_channels=512, num_bases=64, num_stages=3, momentum=0.1)),
    "gcnet_r101": dict(backbone=_resnet(101), decode_head=_head(
        "GCHead", channels=512, ratio=1 / 4., pooling_type="att", fusion_types=("channel_add",))),
    "isanet_r101": dict(backbone=_resnet(101), decode_head=_head(
        "ISAHead", channels=512, isa_channels=256, down_factor=(8, 8))),
    "nonlocal_r101": dict(backbone=_resnet(101), decode_head=_head(
        "NLHead", channels=512, reduction=2, use_scale=True, mode="embedded_gaussian")),
    "psanet_r101": dict(backbone=_resnet(101), decode_head=_head(
        "PSAHead", channels=512, mask_size=(97, 97), psa_type="bi-direction", compact=False, shrink_factor=2,
        normalization_factor=1.0, psa_softmax=True)),
    # The Cityscapes backbone table (the authors' log headers): UPerHead (as upernet_r50) on ResNeXt-101 64x4d d8
    # and on ResNeSt-101 d32 (mmseg's resnest configs: stem_channels 128, radix 2, reduction_factor 4, avg_down_stride).
    "upernet_resnext101": dict(
        backbone=dict(type="ResNeXt", depth=101, groups=64, base_width=4, num_stages=4, out_indices=(0, 1, 2, 3),
                      dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), norm_cfg=dict(type="BN"), norm_eval=False,
                      style="pytorch", contract_dilation=True),
        decode_head=_head("UPerHead", in_channels=[256, 512, 1024, 2048], in_index=[0, 1, 2, 3], channels=512,
                          pool_scales=(1, 2, 3, 6))),
    "upernet_resnest101": dict(
        backbone=dict(type="ResNeSt", depth=101, stem_channels=128, radix=2, reduction_factor=4,
                      avg_down_stride=True, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 1, 1),
                      strides=(1, 2, 2, 2), norm_cfg=dict(type="BN"), norm_eval=False, style="pytorch",
                      contract_dilation=True),
        decode_head=_head("UPerHead", in_channels=[256, 512, 1024, 2048], in_index=[0, 1, 2, 3], channels=512,
                          pool_scales=(1, 2, 3, 6))),
    # The Cityscapes backbone table (log.json headers): mmseg mobilenet-v2-d8_pspnet, plain BN as the authors' config.
    "pspnet_mobilenetv2": dict(
        backbone=dict(type="MobileNetV2", widen_factor=1.0, strides=(1, 2, 2, 1, 1, 1, 1),
                      dilations=(1, 1, 1, 2, 2, 4, 4), out_indices=(1, 2, 4, 6), norm_cfg=dict(type="BN")),
        decode_head=_head("PSPHead", in_channels=320, channels=512, pool_scales=(1, 2, 3, 6)),
        auxiliary_head=_aux(96)),
    # mmseg mobilenet-v3-d8_lraspp: BN eps 1e-3 throughout, no auxiliary head.
    "lraspp_mobilenetv3": dict(
        backbone=dict(type="MobileNetV3", arch="large", out_indices=(1, 3, 16), norm_cfg=dict(type="BN", eps=1e-3)),
        decode_head=_head("LRASPPHead", in_channels=(16, 24, 960), in_index=(0, 1, 2), channels=128,
                          input_transform="multiple_select", norm_cfg=dict(type="BN", eps=1e-3),
                          act_cfg=dict(type="ReLU")),
        auxiliary_head=None),
    # mmseg bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024: an FCN head on the aggregated features and mmseg's list of
    # four FCN aux heads on the semantic stages (checkpoint keys auxiliary_head.<i>.*).
    "bisenetv2": dict(
        backbone=dict(type="BiSeNetV2", detail_channels=(64, 64, 128), semantic_channels=(16, 32, 64, 128),
                      semantic_expansion_ratio=6, bga_channels=128, out_indices=(0, 1, 2, 3, 4), init_cfg=None,
                      align_corners=False),
        decode_head=_head("FCNHead", in_channels=128, in_index=0, channels=1024, num_convs=1, concat_input=False),
        auxiliary_head=[_aux(16, in_index=1, channels=16, num_convs=2), _aux(32, in_index=2, channels=64, num_convs=2),
                        _aux(64, in_index=3, channels=256, num_convs=2),
                        _aux(128, in_index=4, channels=1024, num_convs=2)]),
}


def _hrnet(num_blocks, num_modules, channels):
    """mmseg HRNet `extra`: stage 1 one Bottleneck branch of 64, stages 2-4 BasicBlock branches (the W18/W48 rows:
    num_blocks 4, num_modules (1, 1, 4, 3); W18-Small: num_blocks (2, 2, 2, 2), num_modules (1, 1, 3, 2))."""
    stages = {"stage1": dict(num_modules=1, num_branches=1, block="BOTTLENECK", num_blocks=(num_blocks[0],),
                             num_channels=(64,))}
    for k in (2, 3, 4):
        stages[f"stage{k}"] = dict(num_modules=num_modules[k - 1], num_branches=k, block="BASIC",
                                   num_blocks=(num_blocks[k - 1],) * k, num_channels=tuple(channels[:k]))
    return dict(type="HRNet", norm_cfg=dict(type="BN", requires_grad=True), norm_eval=False, extra=stages)


def _hrnet_heads(channels, ocr):
    """mmseg's fcn_hr18 head, or ocrnet_hr18's cascade of it (as stage 0) and an OCRHead: resize_concat of the four
    branches, no dropout."""
    concat = dict(in_channels=list(channels), in_index=(0, 1, 2, 3), input_transform="resize_concat",
                  dropout_ratio=-1)
    fcn = _head("FCNHead", channels=sum(channels), kernel_size=1, num_convs=1, concat_input=False, **concat)
    if not ocr:
        return dict(decode_head=fcn, auxiliary_head=None)
    return dict(type="CascadeEncoderDecoder", num_stages=2, auxiliary_head=None,
                decode_head=[fcn, _head("OCRHead", channels=512, ocr_channels=256, **concat)])


W18, W48 = (18, 36, 72, 144), (48, 96, 192, 384)
W18_SMALL = dict(num_blocks=(2, 2, 2, 2), num_modules=(1, 1, 3, 2))
W18_W48 = dict(num_blocks=(4, 4, 4, 4), num_modules=(1, 1, 4, 3))
# The Cityscapes backbone table's OCR-HRNet rows and the iSAID / TotalText FCN-HRNet rows (the authors' log headers).
MMSEG_MODELS.update({
    "ocrnet_hr18s": dict(backbone=_hrnet(channels=W18, **W18_SMALL), **_hrnet_heads(W18, ocr=True)),
    "ocrnet_hr18": dict(backbone=_hrnet(channels=W18, **W18_W48), **_hrnet_heads(W18, ocr=True)),
    "ocrnet_hr48": dict(backbone=_hrnet(channels=W48, **W18_W48), **_hrnet_heads(W48, ocr=True)),
    "fcn_hr18s": dict(backbone=_hrnet(channels=W18, **W18_SMALL), **_hrnet_heads(W18, ocr=False)),
    "fcn_hr18": dict(backbone=_hrnet(channels=W18, **W18_W48), **_hrnet_heads(W18, ocr=False)),
})


def _segformer(embed_dims, num_layers):
    """mmseg's segformer_mit-b* models: MixVisionTransformer (heads 1, 2, 5, 8) + SegformerHead, no auxiliary head."""
    backbone = dict(type="MixVisionTransformer", embed_dims=embed_dims, num_stages=4, num_layers=num_layers,
                    num_heads=[1, 2, 5, 8], patch_sizes=[7, 3, 3, 3], sr_ratios=[8, 4, 2, 1], out_indices=(0, 1, 2, 3),
                    mlp_ratio=4, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1)
    head = _head("SegformerHead", in_channels=[embed_dims * n for n in (1, 2, 5, 8)], in_index=[0, 1, 2, 3],
                 channels=256)
    return dict(backbone=backbone, decode_head=head, auxiliary_head=None)


UPER_BASE = dict(in_channels=[128, 256, 512, 1024], in_index=[0, 1, 2, 3], channels=512, pool_scales=(1, 2, 3, 6))
# The transformer-era rows (the authors' log headers): UPerNet on mmpretrain's ConvNeXt-B (mmseg's upernet_convnext)
# and on mmseg's Swin-B window 12 (swin-base-patch4-window12-in22k-384x384-pre_upernet), aux FCN on stage 3
# (512 channels); SegFormer MiT-B0/B3/B5.
MMSEG_MODELS.update({
    "upernet_convnext_b": dict(
        backbone=dict(type="mmpretrain.ConvNeXt", arch="base", out_indices=[0, 1, 2, 3], drop_path_rate=0.4,
                      layer_scale_init_value=1.0, gap_before_final_norm=False),
        decode_head=_head("UPerHead", **UPER_BASE), auxiliary_head=_aux(512)),
    "upernet_swin_b": dict(
        backbone=dict(type="SwinTransformer", pretrain_img_size=384, embed_dims=128, patch_size=4, window_size=12,
                      mlp_ratio=4, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], strides=(4, 2, 2, 2),
                      out_indices=(0, 1, 2, 3), qkv_bias=True, qk_scale=None, patch_norm=True, drop_rate=0.0,
                      attn_drop_rate=0.0, drop_path_rate=0.3, use_abs_pos_embed=False, act_cfg=dict(type="GELU"),
                      norm_cfg=dict(type="LN")),
        decode_head=_head("UPerHead", **UPER_BASE), auxiliary_head=_aux(512)),
    "segformer_mit_b0": _segformer(32, [2, 2, 2, 2]),
    "segformer_mit_b3": _segformer(64, [3, 4, 18, 3]),
    "segformer_mit_b5": _segformer(64, [3, 6, 40, 3]),
})
# Models that need a larger input than --size: LR-ASPP's fixed 49×49 image pool needs a 1/8 map of 49×49 or more.
MIN_SIZES = {"lraspp_mobilenetv3": 401}


def build_mmseg(body):
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    if body["backbone"]["type"].startswith("mmpretrain."):
        import mmpretrain.models  # noqa: F401  (registers ConvNeXt in mmpretrain's scope; needs mmpretrain 1.2.0)
    cfg = {"type": "EncoderDecoder", "data_preprocessor": dict(type="SegDataPreProcessor"), "pretrained": None,
           "train_cfg": dict(), "test_cfg": dict(mode="whole"), "auxiliary_head": _aux(), **body}
    model = MODELS.build(cfg)
    # PyTorch's default init instead of mmseg's (whose conv_seg std 0.01 would make every logit ~0), and
    # non-trivial BN affine parameters and statistics, so that a wrong layer shows in the logits.
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("bn.weight", "running_var")) or ".bn" in name and name.endswith("weight"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith(("bn.bias", "running_mean")) or ".bn" in name and name.endswith("bias"):
                tensor.normal_(0, 0.1)
        # Zero-initialised parameters (CCNet's gamma, GCNet's last conv, ANN's out projection, zero biases) would
        # hide their block from the logits.
        for tensor in model.parameters():
            if not tensor.any():
                tensor.normal_(0, 0.2)
            # Parameters initialised to ones (LayerNorm weights, ConvNeXt's layer scale 1.0) would hide a swap.
            elif bool((tensor == 1).all()):
                tensor.uniform_(0.5, 1.5)
    return model.eval()


def compare(name, size, tmp):
    from mmengine.structures import PixelData  # noqa: F401  (mmseg's data samples need it importable)

    from hlbench.models import build_model, load_checkpoint

    torch.manual_seed(0)
    theirs = build_mmseg(MMSEG_MODELS[name])
    path = Path(tmp) / f"{name}.pth"
    torch.save({"state_dict": theirs.state_dict(), "meta": {"mmseg_version": "1.2.2"}}, path)
    model_cfg = OmegaConf.load(MODEL_DIR / f"{name}.yaml")
    model_cfg.backbone.pretrained = "none"  # every tensor comes from the mmseg checkpoint below
    ours = build_model(model_cfg, NUM_CLASSES).eval()
    report = load_checkpoint(ours, path, require_all=True)
    img = torch.randn(1, 3, *size)
    metas = [dict(img_shape=size, ori_shape=size, pad_shape=size, padding_size=[0] * 4)]
    with torch.no_grad():
        ref = theirs.encode_decode(img, metas)
        out = ours.predict(img, mode="whole")
    diff = (ref - out).abs().max().item()
    print(f"{name:20s} {size[0]}×{size[1]} loaded {len(report['loaded'])} missing {len(report['missing'])} "
          f"unexpected {len(report['unexpected'])}  max|logit diff| {diff:.3e}  (logit scale {ref.abs().max():.2f})")
    return max(diff, compare_training(name, theirs, ours, size))


def _train_without_dropout(model):
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.eval()


def compare_training(name, theirs, ours, size):
    """One training forward (batch statistics, dropout off) and backward of the decode logits' sum on both models:
    max |Δ| of the logits, of the decode head's gradients (relative to the head's largest), and of EMANet's updated
    bases. It runs in float64: in fp32, training-mode BN over ISANet's small attention groups amplifies rounding
    to 1e-4 in some gradients, which float64 shows to be rounding (1e-15). The backbone's gradients are left out
    (through a randomly initialised ResNet-101 they reach 1e5), and so are per-tensor ratios (a bias feeding a
    training-mode BN has a zero gradient up to rounding)."""
    theirs, ours = theirs.double(), ours.double()
    _train_without_dropout(theirs)
    _train_without_dropout(ours)
    img = torch.randn(2, 3, *size, dtype=torch.float64)
    # One seed before each forward: stochastic depth (one draw per sample and block, in block order in both) then
    # drops the same paths in both models.
    torch.manual_seed(1)
    ref = _mmseg_decode(theirs, theirs.extract_feat(img))
    torch.manual_seed(1)
    out = ours(img)["out"]
    ref.sum().backward()
    out.sum().backward()
    diffs = {"train logits": (ref - out).abs().max().item()}
    grads = {n: p.grad for n, p in ours.decode_head.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in theirs.decode_head.named_parameters() if n in grads}
    scale = max(g.abs().max().item() for g in ref_grads.values())
    diffs["head grads (relative)"] = max((ref_grads[n] - grads[n]).abs().max().item() for n in ref_grads) / scale
    if hasattr(ours.decode_head, "ema_module"):
        bases = theirs.decode_head.ema_module.bases, ours.decode_head.ema_module.bases
        diffs["EMA bases"] = (bases[0] - bases[1]).abs().max().item()
    print(f"{'':20s} " + "  ".join(f"{k} {v:.3e}" for k, v in diffs.items())
          + f"  ({len(ref_grads)} of {len(grads)} gradients matched by name)")
    return max(diffs.values())


def _mmseg_decode(model, feats):
    """The decode head's logits; a CascadeEncoderDecoder's heads each also read the previous stage's."""
    if not isinstance(model.decode_head, torch.nn.ModuleList):
        return model.decode_head(feats)
    out = model.decode_head[0](feats)
    for head in model.decode_head[1:]:
        out = head(feats, out)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=97, help="input side; odd sides test the odd-size paths")
    parser.add_argument("--width", type=int, help="input width, if not --size (a non-square input)")
    parser.add_argument("--models", nargs="*", default=list(MMSEG_MODELS))
    args = parser.parse_args()
    _stub_mmcv_ops()
    with tempfile.TemporaryDirectory() as tmp:
        sides = (args.size, args.width or args.size)
        diffs = {name: compare(name, tuple(max(s, MIN_SIZES.get(name, 0)) for s in sides), tmp) for name in args.models}
    sys.exit(0 if all(d < 1e-4 for d in diffs.values()) else 1)


if __name__ == "__main__":
    main()
