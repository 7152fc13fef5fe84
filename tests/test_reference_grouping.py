"""One device with 8 images reproduces the authors' 4 GPUs x 2 (DDP, per-GPU HL normaliser and OHEM threshold).

The reference computes the HL normaliser and mmseg's OHEM k-th probability over each GPU's own 2 images and DDP
averages the 4 GPUs' gradients; LabelledLoss emulates that by grouping a device batch into reference GPU batches.
Here 4 gloo processes are the reference and one process with 8 images must give the same gradients and logs.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.engine.distributed import all_reduce_mean
from hlbench.losses import ohem_keep_mask
from hlbench.methods.labelled_loss import LabelledLoss, reference_group
from tests.conftest import free_port, gloo_group, launch_gloo

GPUS, PER_GPU = 4, 2
CLASSES, SIZE = 5, 32
REFERENCE = ["train.reference.gpus=4", "train.reference.per_gpu=2", "train.batch_size=8"]
# OHEM: with thresh 0.7 a small min_kept only matters where fewer than k pixels are hard, which the class-0-heavy
# pairs below are; min_kept x 2 images = 600 of ~1900 valid pixels per reference GPU.
OHEM = ["loss.name=ohem", "loss.ohem_thresh=0.7", "loss.ohem_min_kept=300"]
CASES = {
    "hl": ["hl.enabled=true", "hl.scope=reference", "loss.name=ce"],
    "ohem": ["hl.enabled=false", *OHEM],
    "hl+ohem": ["hl.enabled=true", "hl.scope=reference", *OHEM],
    # PyTorch's mean over valid pixels: each reference GPU divided by its own count.
    "ce_valid_pixels": ["hl.enabled=false", "loss.name=ce", "loss.ce_denominator=valid_pixels"],
}
# Without grouping (one reference GPU holding all 8 images) the numbers must differ, or the test proves nothing.
UNGROUPED = ["train.reference.gpus=1", "train.reference.per_gpu=8"]


def _compose(overrides):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
            return compose(list(overrides))
    finally:
        GlobalHydra.instance().clear()


def _plain(overrides):
    """A resolved plain dict, picklable into the DDP processes (they rebuild it with OmegaConf.create)."""
    return OmegaConf.to_container(_compose(overrides), resolve=True)


class TinySeg(nn.Module):
    """BN- and dropout-free stand-in for the Segmentor: the same output dict, HL branch on detached features."""

    def __init__(self, with_hl):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.decode = nn.Conv2d(8, CLASSES, 1)
        self.aux = nn.Conv2d(8, CLASSES, 1)
        self.hl_head = nn.Conv2d(8, 1, 3, padding=1) if with_hl else None

    def forward(self, x):
        low = F.relu(self.stem(x))
        feats = F.relu(self.down(low))  # half resolution: the loss's resize to the label size is exercised
        out = {"out": self.decode(feats), "aux": self.aux(F.avg_pool2d(low, 4))}
        if self.hl_head is not None:
            out["hl"] = self.hl_head(feats.detach())
        return out


def _model(with_hl):
    torch.manual_seed(0)
    model = TinySeg(with_hl)
    with torch.no_grad():
        # Confident in class 0 (p ~ 0.8 > ohem_thresh), so the class-0-heavy pairs' k-th probability decides.
        model.decode.bias[0] = 3.0
        if with_hl:
            # A default-initialised HL conv gives an almost uniform H, for which every normaliser scope agrees.
            model.hl_head.weight.mul_(6.0)
    return model


def _data():
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(GPUS * PER_GPU, 3, SIZE, SIZE, generator=gen)
    # Pairs of different brightness give each reference GPU a different HL sum.
    imgs += torch.tensor([-1.0, -1.0, 0.0, 0.5, 1.0, 1.0, 2.0, 1.5]).view(-1, 1, 1, 1)
    # Per-image share of class-0 (easy) pixels: some reference GPUs have fewer hard pixels than OHEM's k.
    easy = torch.tensor([0.95, 0.9, 0.4, 0.5, 0.85, 0.95, 0.3, 0.6]).view(-1, 1, 1)
    hard = torch.randint(1, CLASSES, (GPUS * PER_GPU, SIZE, SIZE), generator=gen)
    labels = torch.where(torch.rand(hard.shape, generator=gen) < easy, 0, hard)
    for i in range(labels.shape[0]):
        labels[i, : 2 + 3 * i, :5] = 255
    return imgs, labels


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _labelled_total(terms):
    """(total, logs with mmseg's "loss") as the supervised method adds the labelled terms."""
    total = terms.seg + terms.hl + terms.aux
    return total, {**terms.logs, "loss": total.detach()}


def _single(cfg, per_device=GPUS * PER_GPU):
    model = _model(cfg.hl.enabled)
    imgs, labels = _data()
    total, logs = _labelled_total(LabelledLoss(cfg, per_device)(model(imgs), labels, False))
    total.backward()
    return {"grads": _grads(model), "logs": {k: v.detach() for k, v in logs.items()}}


def _ddp_worker(rank, port, cases, out_file):
    with gloo_group(rank, GPUS, port):
        imgs, labels = _data()
        mine = slice(PER_GPU * rank, PER_GPU * (rank + 1))
        results = {}
        for name, plain in cases.items():
            cfg = OmegaConf.create(plain)
            model = nn.parallel.DistributedDataParallel(_model(cfg.hl.enabled))
            total, logs = _labelled_total(LabelledLoss(cfg, PER_GPU)(model(imgs[mine]), labels[mine], False))
            total.backward()
            results[name] = {"grads": _grads(model.module), "logs": all_reduce_mean(logs)}
        if rank == 0:
            torch.save(results, out_file)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The 4 x 2 DDP reference for every case, from one launch of 4 processes (their start dominates the cost)."""
    out_file = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    cases = {name: _plain(REFERENCE + over) for name, over in CASES.items()}
    launch_gloo(_ddp_worker, GPUS, (free_port(), cases, str(out_file)), [LabelledLoss.__module__])
    return torch.load(out_file)


def _assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item()
        # float32 sums over thousands of pixels in another order (one batch of 8 vs an all-reduce of 4 means)
        # differ by a few 1e-6 of the largest entry; the grouping's own effect is above 1e-2 (negative control).
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _relative_gap(a, b, name):
    return ((a[name] - b[name]).norm() / b[name].norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_device_with_8_images_matches_4_gloo_processes_with_2(reference_run, case):
    ddp = reference_run[case]
    single = _single(_compose(REFERENCE + CASES[case]))
    _assert_grads_close(single["grads"], ddp["grads"])
    # mmseg logs each loss as the mean over GPUs; acc_seg is a mean of per-GPU accuracies, no loss, and is
    # only equal to the pooled accuracy when every GPU has as many valid pixels, so it is not compared.
    loss_keys = {k for k in ddp["logs"] if "loss" in k}
    assert loss_keys == {k for k in single["logs"] if "loss" in k}
    assert {"decode.loss_ce", "aux.loss_ce", "loss"} <= loss_keys
    assert ("weight_loss" in loss_keys) == case.startswith("hl")
    for key in loss_keys:
        torch.testing.assert_close(single["logs"][key].float(), ddp["logs"][key].float(), rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_without_grouping_the_gradients_differ(reference_run, case):
    ungrouped = _single(_compose(REFERENCE + CASES[case] + UNGROUPED))
    # The decode head is what both the HL normaliser and the OHEM mask scale (the aux CE is never grouped).
    assert _relative_gap(ungrouped["grads"], reference_run[case]["grads"], "decode.weight") > 1e-2


def test_ohem_k_th_probability_decides_for_some_reference_gpus_only():
    """The OHEM data is built so that both of mmseg's rules are in play, else grouping could not show."""
    model = _model(with_hl=False)
    imgs, labels = _data()
    with torch.no_grad():
        logits = F.interpolate(model(imgs)["out"], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    cfg = _compose(REFERENCE + CASES["ohem"])
    thresh = float(cfg.loss.ohem_thresh)
    keep = ohem_keep_mask(logits, labels, thresh=thresh, min_kept=int(cfg.loss.ohem_min_kept), group=PER_GPU)
    valid = labels != 255
    prob = logits.softmax(1).gather(1, labels.where(valid, 0).unsqueeze(1)).squeeze(1)
    by_threshold = [torch.equal(keep[g], valid[g] & (prob[g] < thresh))
                    for g in (slice(i, i + PER_GPU) for i in range(0, GPUS * PER_GPU, PER_GPU))]
    assert any(by_threshold) and not all(by_threshold)


def test_reference_group():
    assert reference_group(8, 2) == 2   # one device holds 4 reference GPU batches
    assert reference_group(2, 2) == 2
    assert reference_group(1, 2) is None  # the other image of a reference GPU is on another device
    assert reference_group(6, 4) is None


def test_variant_and_grouping_facts():
    paper = _compose(REFERENCE + ["hl.enabled=true", "hl.scope=reference", *OHEM])
    loss = LabelledLoss(paper, 8)
    assert loss.variant() == "reference"
    text = loss.grouping()
    assert text.startswith("reference 4 GPU(s) x 2, device batch 8")
    assert "HL normaliser over 2 image(s)" in text and "OHEM threshold over 2 image(s)" in text
    # One normaliser over the device's 8 images is not the authors' per-GPU 2.
    assert LabelledLoss(_compose(REFERENCE + ["hl.enabled=true", "hl.scope=batch"]), 8).variant() == "custom"
    lone = LabelledLoss(paper, 1)
    assert lone.variant() == "custom" and "cannot be reproduced" in lone.grouping()
