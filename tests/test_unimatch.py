"""UniMatch's pieces that are easy to get wrong: the CutMix boxes and strong views, the label / confidence mixing
inside the box, the confidence mask and its denominator, which prediction each loss pairs with which target, the
loss weights, the uniform-H invariant of every HL-weighted stream, and a tiny run through the real loop that
resumes exactly."""
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import hlbench.methods.unimatch as um
from hlbench.compose import compose
from hlbench.errors import ConfigError, RunStopped
from hlbench.methods import METHODS, LabelledLoss
from hlbench.methods.strong_aug import strong_view, unimatch_box
from hlbench.methods.unimatch import UniMatch, mixed_targets, paste_in_box, resolve_flags, unsup_loss
from hlbench.run import run_experiment
from tests.conftest import compose_run, sigterm_during_step

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


# --- strong views and CutMix boxes ------------------------------------------------------------------------------

def test_unimatch_box_area_ratio_and_fit():
    torch.manual_seed(0)
    h, w = 48, 64
    fractions = []
    for _ in range(1000):
        box = unimatch_box(h, w, p=1.0)
        ys, xs = box.nonzero(as_tuple=True)
        bh, bw = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert box.sum() == bh * bw  # one filled rectangle, inside the crop by construction
        # w = floor(sqrt(A / r)), h = floor(sqrt(A r)) with A in [0.02, 0.4] of the crop and r in [0.3, 1/0.3].
        assert bh * bw <= 0.4 * h * w and (bh + 1) * (bw + 1) > 0.02 * h * w
        assert 0.3 <= (bh + 1) / bw and bh / (bw + 1) <= 1 / 0.3
        fractions.append(bh * bw / (h * w))
    assert min(fractions) < 0.04 and max(fractions) > 0.36  # the whole area range is drawn


def test_unimatch_box_probability():
    torch.manual_seed(0)
    assert not unimatch_box(16, 16, p=0.0).any()
    empty = sum(not unimatch_box(16, 16, p=0.5).any() for _ in range(400))
    assert 160 < empty < 240


def test_strong_view_keeps_shapes_and_changes_pixels():
    torch.manual_seed(0)
    img = torch.randn(4, 3, 16, 16)
    a, b = strong_view(img, MEAN, STD), strong_view(img, MEAN, STD)
    assert a.shape == img.shape and a.dtype == img.dtype
    assert not torch.allclose(a, img) and not torch.allclose(a, b)  # each view (and image) draws its own ops
    # With every op off, the view is the image: the normalisation round trip is exact up to float error.
    rgb = torch.rand(2, 3, 8, 8)
    normalised = (rgb * 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    same = strong_view(normalised, MEAN, STD, jitter_p=0, gray_p=0, blur_p=0)
    assert torch.allclose(same, normalised, atol=1e-5)


# --- CutMix targets and the unsupervised loss -------------------------------------------------------------------

def test_labels_confidences_and_ignore_are_mixed_inside_the_box():
    box = torch.zeros(1, 2, 3, dtype=torch.bool)
    box[0, 0, 1:] = True
    weak = (torch.zeros(1, 2, 3, dtype=torch.long), torch.full((1, 2, 3), 0.9), torch.ones(1, 2, 3, dtype=torch.bool))
    mix = (torch.full((1, 2, 3), 7), torch.full((1, 2, 3), 0.2), torch.zeros(1, 2, 3, dtype=torch.bool))
    label, conf, valid = mixed_targets(box, weak, mix)
    assert label.tolist() == [[[0, 7, 7], [0, 0, 0]]]
    assert torch.allclose(conf, torch.tensor([[[0.9, 0.2, 0.2], [0.9, 0.9, 0.9]]]))
    assert valid.tolist() == [[[True, False, False], [True, True, True]]]
    img, img_m = torch.zeros(1, 3, 2, 3), torch.ones(1, 3, 2, 3)
    assert (paste_in_box(box, img_m, img) == box[:, None].float()).all()  # every channel of the box pasted


def test_confidence_mask_and_denominator():
    # One image, 4 pixels: confident, at the threshold (kept: >=), below it, and ignored (padding).
    pred = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [4.0, 0.0]]).T.reshape(1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [1, 0]]])
    conf = torch.tensor([[[0.99, 0.95], [0.5, 0.99]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    ce = F.cross_entropy(pred, target, reduction="none")[0]
    loss = unsup_loss(pred, target, conf, valid, conf_thresh=0.95, group=1)
    # Only the two confident valid pixels contribute; the denominator counts the three valid pixels.
    assert loss.item() == pytest.approx((ce[0, 0] + ce[0, 1]).item() / 3, rel=1e-6)
    # Changing what is below the threshold or ignored changes nothing.
    other = pred.clone()
    other[..., 1, :] = torch.randn(2, 2)
    assert unsup_loss(other, target, conf, valid, 0.95, 1).item() == pytest.approx(loss.item(), rel=1e-6)


def test_denominators_are_per_reference_gpu_batch():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4, 5, 5))
    conf, valid = torch.rand(4, 5, 5), torch.rand(4, 5, 5) > 0.3
    ce = F.cross_entropy(pred, target, reduction="none") * ((conf >= 0.5) & valid)
    per_pair = [ce[i:i + 2].sum() / valid[i:i + 2].sum() for i in (0, 2)]
    assert unsup_loss(pred, target, conf, valid, 0.5, group=2).item() == pytest.approx(
        torch.stack(per_pair).mean().item(), rel=1e-6)
    assert unsup_loss(pred, target, conf, valid, 0.5, group=4).item() == pytest.approx(
        (ce.sum() / valid.sum()).item(), rel=1e-6)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_uniform_hardness_gives_the_unsupervised_loss(group):
    torch.manual_seed(0)
    pred, target = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4, 5, 5))
    conf, valid = torch.rand(4, 5, 5), torch.rand(4, 5, 5) > 0.3
    plain = unsup_loss(pred, target, conf, valid, 0.5, group)
    for d in (0.0, -3.0):
        hl = torch.full((4, 5, 5), d)
        assert unsup_loss(pred, target, conf, valid, 0.5, group, hl, hl_offset=0.1).item() == pytest.approx(
            plain.item(), rel=1e-5)
    assert unsup_loss(pred, target, conf, valid, 0.5, group, torch.randn(4, 5, 5)).item() != pytest.approx(
        plain.item(), rel=1e-3)


def test_behaviour_sets_flags_and_each_flag_overrides():
    cfg = OmegaConf.create({"behaviour": "reference", "flags": {"eval_selection": None}})
    assert resolve_flags(cfg) == {"eval_selection": "reference"}
    assert resolve_flags(OmegaConf.merge(cfg, {"behaviour": "paper"})) == {"eval_selection": "sliding_only"}
    assert resolve_flags(OmegaConf.merge(cfg, {"flags": {"eval_selection": "sliding_only"}}))["eval_selection"] == \
        "sliding_only"
    with pytest.raises(ConfigError, match="method.flags.eval_selection"):
        resolve_flags(OmegaConf.merge(cfg, {"flags": {"eval_selection": "best"}}))


# --- one step on a hand-made model ------------------------------------------------------------------------------

class _Pixels(torch.nn.Module):
    """A segmentor whose logits are its input's three channels (3 classes), so that every loss is computable by
    hand: "out_fp" is the channels reversed, "hl" (when asked) the first channel."""

    align_corners = False

    def __init__(self, hl=False):
        super().__init__()
        self.hl = hl

    def forward(self, img, feature_perturbation=False):
        out = {"out": img.clone()}
        if feature_perturbation:
            out["out_fp"] = img.flip(1)
        if self.training and self.hl:
            out["hl"] = img[:, :1]
        return out


def _cfg(*overrides):
    return compose(["method=unimatch", "loss.name=ce", "hl.enabled=false", "train.batch_size=2",
                                        "method.unlabeled_batch=2", "train.reference.gpus=2",
                                        "train.reference.per_gpu=1", "method.conf_thresh=0.6", *overrides])


def _batches():
    g = torch.Generator().manual_seed(0)
    x, u, m = (2 * torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    pad_u, pad_m = torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(2, 4, 4, dtype=torch.uint8)
    pad_u[0, 3], pad_m[1, :, 0] = 1, 1  # a padded row and a padded column
    return {"labeled": {"img": x, "label": torch.randint(0, 3, (2, 4, 4), generator=g)},
            "unlabeled": {"img": u, "pad": pad_u}, "mix": {"img": m, "pad": pad_m}}


# Boxes in the order the step draws them: view 1 of images 0 and 1, then view 2 of images 0 and 1.
_BOXES = [torch.zeros(4, 4, dtype=torch.bool) for _ in range(4)]
_BOXES[0][:2, :2] = _BOXES[1][1:, 1:] = _BOXES[3][:, 2:] = True  # view 2 of image 0: no box


def _step(monkeypatch, cfg, hl=False):
    """(loss, logs) of one step with the strong view x1.5 and the boxes above."""
    boxes = iter(_BOXES)
    monkeypatch.setattr(um, "strong_view", lambda img, mean, std: 1.5 * img)
    monkeypatch.setattr(um, "unimatch_box", lambda h, w, p, device: next(boxes).to(device))
    method = UniMatch(cfg)
    model = _Pixels(hl)
    method.setup(model, SimpleNamespace(per_device={"labeled": 2, "unlabeled": 2, "mix": 2}))
    return method.step(model, _batches(), 0)


def _masked_mean(logits, label, conf, valid, tau, hl=None):
    """The expected unsupervised loss by hand: per image (reference GPU batch of 1), averaged over images."""
    ce = F.cross_entropy(logits, label, reduction="none") * ((conf >= tau) & valid)
    if hl is None:
        return torch.stack([ce[i].sum() / valid[i].sum() for i in range(len(ce))]).mean()
    h = (torch.sigmoid(hl[:, 0]) + 0.1) * valid
    return torch.stack([(h[i] / h[i].sum() * ce[i]).sum() for i in range(len(ce))]).mean()


def _expected(batches, tau, hl_streams=()):
    u, m = batches["unlabeled"]["img"], batches["mix"]["img"]
    valid_u, valid_m = batches["unlabeled"]["pad"] == 0, batches["mix"]["pad"] == 0
    conf_u, label_u = u.softmax(1).max(1)
    conf_m, label_m = m.softmax(1).max(1)
    expected = {"fp": _masked_mean(u.flip(1), label_u, conf_u, valid_u, tau, u[:, :1] if "fp" in hl_streams else None)}
    for k, boxes in (("s1", _BOXES[:2]), ("s2", _BOXES[2:])):
        box = torch.stack(boxes)
        view = 1.5 * torch.where(box[:, None], m, u)  # the mix image's strong view pasted in the box
        targets = [torch.where(box, a, b) for a, b in ((label_m, label_u), (conf_m, conf_u), (valid_m, valid_u))]
        expected[k] = _masked_mean(view, *targets, tau, view[:, :1] if k in hl_streams else None)
    return expected


def test_dual_view_and_fp_losses_on_a_hand_made_case(hydra_ctx, monkeypatch):
    loss, logs = _step(monkeypatch, _cfg())
    batches = _batches()
    expected = _expected(batches, 0.6)
    for k in ("s1", "s2", "fp"):
        assert logs[f"unsup.loss_{k}"].item() == pytest.approx(expected[k].item(), rel=1e-5), k
    loss_x = F.cross_entropy(batches["labeled"]["img"], batches["labeled"]["label"])
    assert logs["decode.loss_ce"].item() == pytest.approx(loss_x.item(), rel=1e-5)
    total = (loss_x + 0.25 * expected["s1"] + 0.25 * expected["s2"] + 0.5 * expected["fp"]) / 2
    assert loss.item() == pytest.approx(total.item(), rel=1e-5) and logs["loss"].item() == pytest.approx(loss.item())
    valid = batches["unlabeled"]["pad"] == 0
    confident = (batches["unlabeled"]["img"].softmax(1).max(1).values >= 0.6) & valid
    assert logs["unsup.mask_ratio"].item() == pytest.approx((confident.sum() / valid.sum()).item())
    assert 0 < logs["unsup.mask_ratio"] < 1  # the threshold is exercised


def test_the_total_weights_each_loss(hydra_ctx, monkeypatch):
    cfg = _cfg("method.loss_weights={x: 2, s1: 3, s2: 5, fp: 7}", "method.total_scale=0.1")
    loss, logs = _step(monkeypatch, cfg)
    total = 0.1 * (2 * logs["decode.loss_ce"] + 3 * logs["unsup.loss_s1"] + 5 * logs["unsup.loss_s2"]
                   + 7 * logs["unsup.loss_fp"])
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    default = _cfg().method
    assert (dict(default.loss_weights), default.total_scale) == ({"x": 1.0, "s1": 0.25, "s2": 0.25, "fp": 0.5}, 0.5)


@pytest.mark.parametrize("stream", ["s1", "s2", "fp"])
def test_hardness_weights_only_its_stream_from_that_streams_images(hydra_ctx, monkeypatch, stream):
    cfg = _cfg("hl.enabled=true", f"hl.semisup.apply_to=[unimatch.{stream}]")
    _, logs = _step(monkeypatch, cfg, hl=True)
    plain = _expected(_batches(), 0.6)
    weighted = _expected(_batches(), 0.6, hl_streams=(stream,))
    for k in ("s1", "s2", "fp"):
        assert logs[f"unsup.loss_{k}"].item() == pytest.approx((weighted if k == stream else plain)[k].item(),
                                                               rel=1e-5), k
    assert weighted[stream].item() != pytest.approx(plain[stream].item(), rel=1e-3)  # H is not uniform here


@pytest.mark.parametrize("stream", ["s1", "s2", "fp"])
def test_uniform_hardness_gives_the_original_loss_for_every_stream(hydra_ctx, monkeypatch, stream):
    _, plain = _step(monkeypatch, _cfg("hl.enabled=true", "hl.semisup.apply_to=[sup]"), hl=True)
    monkeypatch.setattr(_Pixels, "forward", _uniform_hl_forward)
    _, weighted = _step(monkeypatch, _cfg("hl.enabled=true", f"hl.semisup.apply_to=[sup,unimatch.{stream}]"),
                        hl=True)
    assert weighted[f"unsup.loss_{stream}"].item() == pytest.approx(plain[f"unsup.loss_{stream}"].item(), rel=1e-5)


def _uniform_hl_forward(self, img, feature_perturbation=False):
    out = {"out": img.clone(), "hl": torch.full_like(img[:, :1], 2.0)}
    if feature_perturbation:
        out["out_fp"] = img.flip(1)
    return out


def test_hl_loss_comes_from_the_labelled_loss_only(hydra_ctx, monkeypatch):
    batches = _batches()
    x, y = batches["labeled"]["img"], batches["labeled"]["label"]
    reference = LabelledLoss(_cfg("hl.enabled=true"), 2)({"out": x, "hl": x[:, :1]}, y, False).logs
    # apply_to without sup: the labelled CE is unweighted, L_h is still the labelled pixels' one.
    loss, logs = _step(monkeypatch, _cfg("hl.enabled=true", "hl.semisup.apply_to=[unimatch.fp]"), hl=True)
    assert logs["weight_loss"].item() == pytest.approx(reference["weight_loss"].item(), rel=1e-6)
    assert logs["decode.loss_ce"].item() == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-5)
    total = 0.5 * (logs["decode.loss_ce"] + 0.25 * logs["unsup.loss_s1"] + 0.25 * logs["unsup.loss_s2"]
                   + 0.5 * logs["unsup.loss_fp"]) + logs["weight_loss"]
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    # With sup: the labelled CE is HL-weighted as LabelledLoss does it.
    _, logs = _step(monkeypatch, _cfg("hl.enabled=true", "hl.semisup.apply_to=[sup]"), hl=True)
    assert logs["decode.loss_ce"].item() == pytest.approx(reference["decode.loss_ce"].item(), rel=1e-6)


# --- through the real loop --------------------------------------------------------------------------------------

def _run_overrides(*extra):
    return ["profile=smoke", "data=synthetic_semisup", "logger=none", "data.train.num_images=16",
            "data.split_fraction=0.25", "data.val.num_images=2", "data.val.size=[32,32]", "data.train.size=[32,32]",
            "data.train_pipeline.crop=[32,32]", "data.train_pipeline.resize={mode:long_side,ratio_range:[0.5,2.0]}",
            "data.train_pipeline.pad={mode:bottom_right,image_fill:[0,0,0],label_fill:255}",  # UniMatch's pipeline
            "model=deeplabv3plus_r101_unimatch", "model.head.channels=8",
            "model.head.c1_channels=8", "method=unimatch", "method.unlabeled_batch=4", "train.batch_size=2",
            "train.reference.gpus=2", "train.reference.per_gpu=1", "loss.name=prob_ohem", "loss.ohem_min_kept=500",
            "hl.semisup.apply_to=[sup,unimatch.s1,unimatch.s2,unimatch.fp]", "train.iters=4",
            "train.ckpt_interval=2", "train.log_interval=2", "train.hl_map_interval=0", *extra]


@pytest.fixture
def seen(monkeypatch):
    """The unlabeled and mix images of every step, by data-set index."""
    record = []
    step = UniMatch.step

    def recording(self, model, batches, it):
        record.append((it, batches["unlabeled"]["index"].tolist(), batches["mix"]["index"].tolist()))
        return step(self, model, batches, it)

    monkeypatch.setattr(UniMatch, "step", recording)
    return record


@pytest.mark.slow
def test_tiny_run_resumes_exactly(hydra_ctx, tmp_path, seen, monkeypatch):
    assert METHODS["unimatch"] is UniMatch
    full = run_experiment(compose_run(_run_overrides(), tmp_path / "a")[0], "unimatch", None, "smoke")
    assert full["batch"]["per_device"] == {"labeled": 2, "unlabeled": 4, "mix": 4}
    assert full["flags"] == {"eval_selection": "reference"} and "denominators over 2 image(s)" in full["grouping"]
    assert math.isfinite(full["final"]["mIoU"])
    uninterrupted = list(seen)
    seen.clear()
    sigterm_during_step(monkeypatch, 2)
    with pytest.raises(RunStopped):
        run_experiment(compose_run(_run_overrides(), tmp_path / "b")[0], "unimatch", None, "smoke")
    resumed = run_experiment(compose_run(_run_overrides("resume=true"), tmp_path / "b")[0], "unimatch", None,
                             "smoke")
    assert resumed["resumed_from"] == 2
    # Both unlabeled streams continue where they stopped, and they are two different shuffles.
    assert seen == uninterrupted and [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] != [s[2] for s in seen]
    a = torch.load(Path(full["run_dir"]) / "checkpoints/iter_000004.pth", weights_only=False)
    b = torch.load(Path(resumed["run_dir"]) / "checkpoints/iter_000004.pth", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["final"]["IoU"] == full["final"]["IoU"]


def test_eval_selection_flag_decides_which_evaluations_select_unless_eval_select_from_is_set():
    from hlbench.methods.unimatch import UniMatch

    method = UniMatch.__new__(UniMatch)
    method.flags = resolve_flags(OmegaConf.create({"behaviour": "reference", "flags": {"eval_selection": None}}))
    assert method.select_from() == "all"  # the original code's best across centre crop and sliding window
    method.flags = resolve_flags(OmegaConf.create({"behaviour": "paper", "flags": {"eval_selection": None}}))
    assert method.select_from() == "final_protocol"
