"""Logit parity of hlbench's U2PL and UniMatch DeepLabV3+ R101 with the references' own model code, same weights.

The references' model files are imported from a scratch folder outside the repo; hlbench never ships them. They
are plain PyTorch, so the project's venv runs them:
    git clone https://github.com/Haochen-Wang409/U2PL /tmp/refs/u2pl          # main (ab3d2be)
    git clone https://github.com/LiheYoung/UniMatch /tmp/refs/unimatch
    git -C /tmp/refs/unimatch checkout 7292bac                                 # the original (arXiv v1) model
    .venv/bin/python analysis/semisup_parity.py --u2pl /tmp/refs/u2pl --unimatch /tmp/refs/unimatch
Only u2pl/models/{model_helper,resnet,decoder,base}.py and UniMatch's model/backbone/resnet.py and
model/semseg/deeplabv3plus.py are used. The script stubs what they import but do not need (UniMatch's Xception and
its ImageNet file; U2PL's SyncBN is off through its own `sync_bn: False`).

Each reference model is built with its Cityscapes config, given random BN affine parameters and BN statistics
measured on random images, and saved in its release format: U2PL's {"model_state", "teacher_state"} with DDP
"module." prefixes, UniMatch's bare state dict (original unimatch.py). hlbench.models.load_checkpoint loads it
into the hlbench model of the same config, and both run on the same images at every --sizes:
- eval mode: the logits (U2PL "pred" at stride 4, and both at input size as their evaluators upsample them);
- train mode with Dropout off: U2PL's "pred", "aux" and "rep" (BN on batch statistics);
- UniMatch's feature perturbation, in eval and in train mode, with the same RNG seed for the Dropout2d masks.
Finally one weight of the hlbench model is nudged, and the logits must then differ (the check can fail).
Exit status 0 when every difference is below --tol and every nudge shows.
"""
import argparse
import copy
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

NUM_CLASSES = 19
MODEL_DIR = Path(__file__).resolve().parents[1] / "hlbench" / "conf" / "model"

# u2pl/experiments/cityscapes/744/ours/config.yaml `net`, with the ImageNet file off.
U2PL_NET = {"num_classes": NUM_CLASSES, "sync_bn": False, "ema_decay": 0.99,
            "aux_loss": {"aux_plane": 1024, "loss_weight": 0.4},
            "encoder": {"type": "u2pl.models.resnet.resnet101",
                        "kwargs": {"multi_grid": True, "zero_init_residual": True, "fpn": True,
                                   "replace_stride_with_dilation": [False, True, True], "pretrained": False}},
            "decoder": {"type": "u2pl.models.decoder.dec_deeplabv3_plus",
                        "kwargs": {"inner_planes": 256, "dilations": [12, 24, 36]}}}
# UniMatch 7292bac configs/cityscapes.yaml, with the R101 backbone the HL paper uses.
UNIMATCH_CFG = {"backbone": "resnet101", "multi_grid": True, "replace_stride_with_dilation": [False, True, True],
                "dilations": [12, 24, 36], "nclass": NUM_CLASSES}


def build_u2pl(root):
    sys.path.insert(0, str(root))
    from u2pl.models.model_helper import ModelBuilder

    return ModelBuilder(copy.deepcopy(U2PL_NET))


def build_unimatch(root):
    sys.path.insert(0, str(root))
    import model.backbone  # noqa: F401  (the package the stub below goes into)

    sys.modules["model.backbone.xception"] = types.SimpleNamespace(xception=None)  # its COCO backbone
    import model.backbone.resnet as resnet

    # DeepLabV3Plus always asks for the ImageNet file pretrained/resnet101.pth; random weights replace it here.
    resnet._resnet = lambda arch, block, layers, pretrained, **kwargs: resnet.ResNet(block, layers, **kwargs)
    from model.semseg.deeplabv3plus import DeepLabV3Plus

    return DeepLabV3Plus(UNIMATCH_CFG)


@torch.no_grad()
def randomise(model, forward, size):
    """Random BN affine parameters; BN statistics as a cumulative average over train-mode passes on random images,
    so that eval-mode activations keep a sane scale through 101 layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for _ in range(2):
        forward(model, torch.randn(2, 3, size, size))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def ours(name, ckpt):
    from hlbench.models import build_model, load_checkpoint

    cfg = OmegaConf.load(MODEL_DIR / f"{name}.yaml")
    cfg.backbone.pretrained = "none"  # every tensor comes from the reference checkpoint
    model = build_model(cfg, NUM_CLASSES)
    report = load_checkpoint(model, ckpt)
    print(f"{name}: loaded {len(report['loaded'])} tensors, missing {len(report['missing'])} "
          f"{report['missing'][:3]}, unexpected {len(report['unexpected'])} {report['unexpected'][:3]}")
    return model.eval(), not report["missing"] and not report["unexpected"]


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def no_dropout_train(*models):
    for m in models:
        m.train()
        for mod in m.modules():
            if isinstance(mod, nn.Dropout2d):
                mod.eval()


class Diffs:
    """max |a - b| per named comparison, printed as they come."""

    def __init__(self, tol):
        self.tol, self.values = tol, {}

    def __call__(self, label, theirs, mine):
        if theirs.shape != mine.shape:
            print(f"  {label:36s} SHAPE {tuple(theirs.shape)} vs ours {tuple(mine.shape)}")
            self.values[label] = float("inf")
            return
        diff = (theirs - mine).abs().max().item()
        self.values[label] = diff
        print(f"  {label:36s} max|diff| {diff:.2e}  (|logit| up to {theirs.abs().max():.2f}, shape "
              f"{tuple(theirs.shape)})")

    def ok(self):
        return all(v < self.tol for v in self.values.values())


@torch.no_grad()
def compare_u2pl(root, sizes, tmp, diffs):
    torch.manual_seed(0)
    theirs = randomise(build_u2pl(root), lambda m, x: m(x), max(sizes))
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}  # DDP-wrapped when train_semi.py saves
    path = Path(tmp) / "u2pl_ckpt_best.pth"
    torch.save({"epoch": 200, "model_state": state, "teacher_state": state, "best_miou": 0.0}, path)
    mine, complete = ours("deeplabv3plus_r101_u2pl", path)
    for size in sizes:
        img = torch.randn(2, 3, size, size)
        ref = theirs.eval()(img)
        diffs(f"u2pl {size} eval pred (stride 4)", ref["pred"], mine.eval()(img)["out"])
        diffs(f"u2pl {size} eval pred at input size", up(ref["pred"], (size, size)), mine.predict(img))
    size = sizes[0]
    img = torch.randn(2, 3, size, size)
    a, b = copy.deepcopy(theirs), copy.deepcopy(mine)  # train-mode passes update BN statistics
    no_dropout_train(a, b)
    ref, out = a(img), b(img)
    for key, our_key in (("pred", "out"), ("aux", "aux"), ("rep", "rep")):
        diffs(f"u2pl {size} train {key}", ref[key], out[our_key])
    return complete and nudged(mine, theirs.eval()(img)["pred"], lambda m: m(img)["out"], diffs.tol)


@torch.no_grad()
def compare_unimatch(root, sizes, tmp, diffs):
    torch.manual_seed(0)
    theirs = randomise(build_unimatch(root), lambda m, x: m(x), max(sizes))
    path = Path(tmp) / "unimatch_resnet101_best.pth"
    torch.save(theirs.state_dict(), path)  # original unimatch.py: torch.save(model.module.state_dict(), ...)
    mine, complete = ours("deeplabv3plus_r101_unimatch", path)
    for size in sizes:
        img = torch.randn(2, 3, size, size)
        diffs(f"unimatch {size} eval", theirs.eval()(img), mine.eval().predict(img))
        torch.manual_seed(1)
        ref, ref_fp = theirs(img, need_fp=True)
        torch.manual_seed(1)
        out = mine(img, feature_perturbation=True)
        diffs(f"unimatch {size} eval FP clean half", ref, up(out["out"], (size, size)))
        diffs(f"unimatch {size} eval FP perturbed half", ref_fp, up(out["out_fp"], (size, size)))
    size = sizes[0]
    img = torch.randn(2, 3, size, size)
    a, b = copy.deepcopy(theirs).train(), copy.deepcopy(mine).train()
    torch.manual_seed(2)
    ref, ref_fp = a(img, need_fp=True)
    torch.manual_seed(2)
    out = b(img, feature_perturbation=True)
    diffs(f"unimatch {size} train FP clean half", ref, up(out["out"], (size, size)))
    diffs(f"unimatch {size} train FP perturbed half", ref_fp, up(out["out_fp"], (size, size)))
    return complete and nudged(mine, theirs.eval()(img), lambda m: up(m(img)["out"], img.shape[2:]), diffs.tol)


def nudged(model, expected, forward, tol):
    """The check can fail: one weight deep in layer3 moved by 1e-2 must change the logits by more than tol."""
    weight = model.backbone.layer3[10].conv2.weight
    weight[0, 0, 0, 0] += 1e-2
    diff = (forward(model.eval()) - expected).abs().max().item()
    weight[0, 0, 0, 0] -= 1e-2
    print(f"  nudged backbone.layer3.10.conv2.weight[0,0,0,0] by 1e-2: max|diff| {diff:.2e} "
          f"({'shows' if diff > tol else 'DOES NOT SHOW'})")
    return diff > tol


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--u2pl", type=Path, help="a checkout of Haochen-Wang409/U2PL")
    parser.add_argument("--unimatch", type=Path, help="a checkout of LiheYoung/UniMatch at 7292bac")
    parser.add_argument("--sizes", type=int, nargs="+", default=[97, 160], help="square input sizes (odd and even)")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    if not (args.u2pl or args.unimatch):
        parser.error("give --u2pl and/or --unimatch")
    diffs, checks = Diffs(args.tol), []
    with tempfile.TemporaryDirectory() as tmp:
        if args.u2pl:
            checks.append(compare_u2pl(args.u2pl, args.sizes, tmp, diffs))
        if args.unimatch:
            checks.append(compare_unimatch(args.unimatch, args.sizes, tmp, diffs))
    worst = max(diffs.values.values())
    print(f"worst max|diff| {worst:.2e} (tolerance {args.tol:g}); key mapping complete and nudges visible: "
          f"{all(checks)}")
    sys.exit(0 if diffs.ok() and all(checks) else 1)


if __name__ == "__main__":
    main()
