"""Parity of hlbench's Mask2Former (hlbench/models/mask2former.py) and its criterion
(hlbench/methods/mask2former_criterion.py) with mmseg 1.2.2's Mask2FormerHead on mmdet 3.3.0, the code the
authors ran.

Needs the scratch environment of analysis/mmseg_parity.py plus mmdet, which imports with mmcv-lite once the
compiled ops are stubbed (below; the deformable attention then runs mmcv's own pure-PyTorch version):
    /tmp/mmseg-venv/bin/pip install mmdet==3.3.0
    PYTHONPATH=. /tmp/mmseg-venv/bin/python analysis/mask2former_parity.py [--size 128 96] [--dtype float64]

What it does: builds the authors' Swin-T Mask2Former (mmseg's mask2former_swin-t config: 150 classes, 100 queries,
6 encoder and 9 decoder layers) in mmseg, perturbs every parameter randomly, saves it as an mmseg checkpoint and
loads it into hlbench's model from the same config with hlbench.models.load_checkpoint (0 missing, 0 unexpected);
then compares in eval mode the class and mask logits of all 10 stages and the semantic scores. Then it runs both
criteria on those predictions and a random label under the same seed (so the same matching and sampled points)
and compares the 30 loss terms and the gradients with respect to the predictions.

float64 is the default: the masked attention thresholds sigmoid(mask) at 0.5, so a float32 rounding difference at
a logit within ~1e-6 of 0 could flip one attention entry and move later layers by far more than the rounding;
--dtype float32 shows the float32 difference too.
"""
import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch

NUM_CLASSES = 150


def stub_mmcv_ops():
    """mmcv-lite has no compiled ops: `mmcv.ops` and its submodules become placeholders, except the two pure-PyTorch
    pieces Mask2Former needs, MultiScaleDeformableAttention (its CPU path is multi_scale_deformable_attn_pytorch)
    and point_sample, loaded from mmcv's own files with the extension loader stubbed."""
    import mmcv
    import mmcv.utils.ext_loader as ext_loader

    def placeholder(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (torch.nn.Module,), {})

    ops = types.ModuleType("mmcv.ops")
    ops.__path__, ops.__getattr__ = [], placeholder
    sys.modules["mmcv.ops"] = ops

    class StubOps(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.startswith("mmcv.ops.") and name not in sys.modules:
                return importlib.machinery.ModuleSpec(name, self)

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__getattr__ = placeholder
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, StubOps())
    ext_loader.load_ext = lambda name, funcs: types.SimpleNamespace(**{f: None for f in funcs})
    for name, attrs in (("multi_scale_deform_attn", ["MultiScaleDeformableAttention"]),
                        ("point_sample", ["point_sample"])):
        spec = importlib.util.spec_from_file_location(f"mmcv.ops.{name}", Path(mmcv.__file__).parent / "ops" /
                                                      f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        for attr in attrs:
            setattr(ops, attr, getattr(module, attr))


def mmseg_config():
    """mmseg 1.x configs/mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py (the authors' log
    20230725_165931), backbone and decode head."""
    backbone = dict(type="SwinTransformer", embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                    window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                    drop_path_rate=0.3, patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False, frozen_stages=-1,
                    pretrain_img_size=224)
    attn = dict(embed_dims=256, num_heads=8, attn_drop=0.0, proj_drop=0.0, dropout_layer=None, batch_first=True)
    head = dict(
        type="Mask2FormerHead", in_channels=[96, 192, 384, 768], strides=[4, 8, 16, 32], feat_channels=256,
        out_channels=256, num_classes=NUM_CLASSES, num_queries=100, num_transformer_feat_level=3,
        align_corners=False,
        pixel_decoder=dict(
            type="mmdet.MSDeformAttnPixelDecoder", num_outs=3, norm_cfg=dict(type="GN", num_groups=32),
            act_cfg=dict(type="ReLU"),
            encoder=dict(num_layers=6, layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=256, num_heads=8, num_levels=3, num_points=4, im2col_step=64,
                                   dropout=0.0, batch_first=True, norm_cfg=None, init_cfg=None),
                ffn_cfg=dict(embed_dims=256, feedforward_channels=1024, num_fcs=2, ffn_drop=0.0,
                             act_cfg=dict(type="ReLU", inplace=True))), init_cfg=None),
            positional_encoding=dict(num_feats=128, normalize=True), init_cfg=None),
        enforce_decoder_input_project=False, positional_encoding=dict(num_feats=128, normalize=True),
        transformer_decoder=dict(return_intermediate=True, num_layers=9, layer_cfg=dict(
            self_attn_cfg=attn, cross_attn_cfg=attn,
            ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, num_fcs=2, act_cfg=dict(type="ReLU", inplace=True),
                         ffn_drop=0.0, dropout_layer=None, add_identity=True)), init_cfg=None),
        loss_cls=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=False, loss_weight=2.0, reduction="mean",
                      class_weight=[1.0] * NUM_CLASSES + [0.1]),
        loss_mask=dict(type="mmdet.CrossEntropyLoss", use_sigmoid=True, reduction="mean", loss_weight=5.0),
        loss_dice=dict(type="mmdet.DiceLoss", use_sigmoid=True, activate=True, reduction="mean", naive_dice=True,
                       eps=1.0, loss_weight=5.0),
        train_cfg=dict(num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75,
                       assigner=dict(type="mmdet.HungarianAssigner", match_costs=[
                           dict(type="mmdet.ClassificationCost", weight=2.0),
                           dict(type="mmdet.CrossEntropyLossCost", weight=5.0, use_sigmoid=True),
                           dict(type="mmdet.DiceCost", weight=5.0, pred_act=True, eps=1.0)]),
                       sampler=dict(type="mmdet.MaskPseudoSampler")))
    return backbone, head


# The same model in hlbench's config (hlbench/conf/model/mask2former_swin_t.yaml).
HLBENCH_MODEL = {
    "backbone": {"type": "swin", "embed_dims": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24],
                 "window_size": 7, "mlp_ratio": 4, "patch_size": 4, "drop_path_rate": 0.3, "pretrained": "none"},
    "head": {"type": "mask2former", "in_index": [0, 1, 2, 3], "feat_channels": 256, "out_channels": 256,
             "num_queries": 100, "num_levels": 3, "encoder_layers": 6, "encoder_heads": 8, "encoder_points": 4,
             "encoder_ffn": 1024, "decoder_layers": 9, "decoder_heads": 8, "decoder_ffn": 2048},
    "align_corners": False,
}


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=[128, 96], help="input H W")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    stub_mmcv_ops()
    import mmdet.models  # noqa: F401  registers the mmdet.* types
    from mmengine.config import ConfigDict
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules

    from hlbench.methods.mask2former_criterion import Mask2FormerCriterion
    from hlbench.models.build import build_model
    from hlbench.models.checkpoints import load_checkpoint

    register_all_modules()
    torch.manual_seed(args.seed)
    backbone_cfg, head_cfg = mmseg_config()
    theirs = torch.nn.Module()
    theirs.backbone, theirs.decode_head = MODELS.build(ConfigDict(backbone_cfg)), MODELS.build(ConfigDict(head_cfg))
    theirs.decode_head.init_weights()
    with torch.no_grad():  # every parameter away from its init, so norms, biases and embeddings are all exercised
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = build_model(HLBENCH_MODEL, NUM_CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mask2former_swin_t.pth"
        torch.save({"state_dict": theirs.state_dict(), "meta": {}}, path)
        report = load_checkpoint(ours, path, require_all=True)
    print(f"checkpoint: {len(report['loaded'])} tensors loaded, {len(report['missing'])} missing, "
          f"{len(report['unexpected'])} unexpected {report['unexpected'][:5]}")
    theirs.to(dtype).eval()
    ours.to(dtype).eval()

    h, w = args.size
    img = torch.randn(args.batch, 3, h, w, dtype=dtype)
    metas = [dict(img_shape=(h, w), pad_shape=(h, w), ori_shape=(h, w)) for _ in range(args.batch)]
    samples = [SegDataSample(metainfo=m) for m in metas]
    with torch.no_grad():
        feats = theirs.backbone(img)
        their_cls, their_masks = theirs.decode_head(feats, samples)
        their_sem = theirs.decode_head.predict(feats, metas, ConfigDict(mode="whole"))
        our_cls, our_masks = ours.decode_head(ours.backbone(img))
        our_sem = ours.predict(img)
    print(f"forward ({args.dtype}, {args.batch}x3x{h}x{w}), max |ours - mmseg| over the 10 stages:")
    print(f"  class logits {max(_max_diff(a, b) for a, b in zip(our_cls, their_cls)):.3e}  "
          f"mask logits {max(_max_diff(a, b) for a, b in zip(our_masks, their_masks)):.3e}  "
          f"semantic scores {_max_diff(our_sem, their_sem):.3e}  (mask logits' scale "
          f"{their_masks[-1].abs().max().item():.2f})")

    # Criterion: the same predictions as leaves, a label with a few classes and an ignored band.
    gen = torch.Generator().manual_seed(args.seed + 1)
    label = torch.randint(0, 6, (args.batch, h // 8, w // 8), generator=gen) * 17
    label = torch.nn.functional.interpolate(label[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    label[:, : h // 10] = 255
    label[-1, :, : w // 3] = 3

    def leaves(tensors):  # float32: mmdet draws its points in the default dtype
        return [t.detach().float().clone().requires_grad_(True) for t in tensors]

    def grads(tensors):
        return torch.cat([t.grad.flatten() for t in tensors])

    their_in = leaves(their_cls), leaves(their_masks)
    data_samples = [SegDataSample(metainfo=m, gt_sem_seg=PixelData(data=label[i][None])) for i, m in
                    enumerate(metas)]
    gt_instances, _ = theirs.decode_head._seg_data_to_instance_data(data_samples)
    torch.manual_seed(args.seed + 2)
    their_losses = theirs.decode_head.loss_by_feat(*their_in, gt_instances, metas)
    sum(their_losses.values()).backward()

    our_in = leaves(their_cls), leaves(their_masks)  # the same inputs: the criterion alone is compared
    torch.manual_seed(args.seed + 2)
    our_losses = Mask2FormerCriterion(NUM_CLASSES)(*our_in, label)
    sum(our_losses.values()).backward()
    assert set(our_losses) == set(their_losses), set(our_losses) ^ set(their_losses)
    worst = max(our_losses, key=lambda k: abs(our_losses[k].item() - their_losses[k].item()))
    print(f"criterion (float32, {len(our_losses)} terms): max |ours - mmdet| {abs(our_losses[worst] - their_losses[worst]).item():.3e}"
          f" ({worst}: {our_losses[worst].item():.6f} vs {their_losses[worst].item():.6f}); total "
          f"{sum(our_losses.values()).item():.6f} vs {sum(their_losses.values()).item():.6f}")
    print(f"  gradients: class logits {_max_diff(grads(our_in[0]), grads(their_in[0])):.3e}, mask logits "
          f"{_max_diff(grads(our_in[1]), grads(their_in[1])):.3e}")


if __name__ == "__main__":
    main()
