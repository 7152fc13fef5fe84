"""Decode-loss variants (balanced CE, OHEM, focal) and the OCRNet cascade's HL loss routing."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from hlbench.errors import ConfigError
from hlbench.losses import (kept_mean, make_pixel_loss, ohem_keep_mask, pixel_cross_entropy, pixel_focal_loss,
                            prob_ohem_keep_mask)
from hlbench.methods import LabelledLoss
from hlbench.models import build_model
from hlbench.models.heads import resize

HL = {"enabled": True, "lam": 0.01, "offset": 0.1, "scope": "batch", "group_size": 2, "image_reduce": "mean",
      "ignore": "keep", "detach_features": True, "weight_aux": False, "lr_mult": 1.0, "head_channels": None,
      "semisup": {"apply_to": ["sup"], "ohem": "mask_then_normalise"}}


def _labelled_loss(per_device=2, hl=None, **loss):
    """The labelled loss for a device batch of `per_device` images (reference 1 x per_device: no grouping)."""
    cfg = OmegaConf.create({
        "hl": {**HL, **(hl or {})}, "train": {"batch_size": per_device, "reference": {"gpus": 1, "per_gpu": per_device}},
        "loss": {"ce_denominator": "all_pixels", "name": "ce", "class_weight": None, "ohem_thresh": 0.7,
                 "ohem_min_kept": 100000, "focal_gamma": 2.0, "focal_reference_bug": False, "aux_weight": 0.4,
                 "aux_name": "ce", "stage0_weight": 0.4, **loss}})
    return LabelledLoss(cfg, per_device)


def _step(loss_fn, model, batch):
    """(total, logs) as the supervised method adds the labelled terms."""
    terms = loss_fn(model(batch["img"]), batch["label"], model.align_corners)
    return terms.seg + terms.hl + terms.aux, terms.logs


def _batch(n=2, c=4, h=5, w=6):
    logits = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))
    label = torch.randint(0, c, (n, h, w), generator=torch.Generator().manual_seed(1))
    label[0, 0, :3] = 255
    return logits, label


def test_balanced_ce_equals_class_weighted_ce():
    logits, label = _batch()
    weights = [0.5, 1.0, 2.0, 3.0]
    pix = make_pixel_loss("balanced_ce", class_weight=weights)(logits, label)
    expected = F.cross_entropy(logits, label, weight=torch.tensor(weights), ignore_index=255, reduction="none")
    assert torch.allclose(pix, expected)
    valid = label != 255
    plain = pixel_cross_entropy(logits, label)
    assert torch.allclose(pix[valid], plain[valid] * torch.tensor(weights)[label[valid]])
    with pytest.raises(ConfigError, match="class_weight"):
        make_pixel_loss("balanced_ce", class_weight=[1.0, 2.0])(logits, label)



def test_balanced_ce_without_weights_warns_and_is_plain_ce(caplog):
    logits, label = _batch()
    with caplog.at_level("WARNING"):
        pix = make_pixel_loss("balanced_ce")(logits, label)
    assert "uniform weights" in caplog.text
    assert torch.allclose(pix, pixel_cross_entropy(logits, label))


def test_focal_gamma_zero_is_ce_and_gamma_downweights_easy_pixels():
    logits, label = _batch()
    ce = pixel_cross_entropy(logits, label)
    assert torch.allclose(pixel_focal_loss(logits, label, gamma=0.0), ce)
    focal = pixel_focal_loss(logits, label, gamma=2.0)
    p = torch.exp(-ce)
    assert torch.allclose(focal, (1 - p) ** 2 * ce) and (focal <= ce).all() and (focal[label == 255] == 0).all()


def _two_class_logits(probs):
    """1×2×1×W logits whose class-0 softmax probability is `probs`."""
    p = torch.tensor(probs)
    return torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, -1)


def test_ohem_keeps_pixels_below_threshold():
    logits = _two_class_logits([0.1, 0.5, 0.65, 0.75, 0.9, 0.95])
    label = torch.zeros(1, 1, 6, dtype=torch.long)
    label[0, 0, 1] = 255  # ignored: never kept
    keep = ohem_keep_mask(logits, label, thresh=0.7, min_kept=2)
    assert keep[0, 0].tolist() == [True, False, True, False, False, False]


def test_ohem_min_kept_raises_the_threshold():
    logits = _two_class_logits([0.9, 0.1, 0.95, 0.8, 0.85, 0.99])
    label = torch.zeros(1, 1, 6, dtype=torch.long)
    # Only 0.1 is below 0.7; min_kept=3 moves the threshold to the 4th smallest (0.9): keeps 0.1, 0.8, 0.85.
    keep = ohem_keep_mask(logits, label, thresh=0.7, min_kept=3)
    assert keep[0, 0].tolist() == [False, True, False, True, True, False]
    # min_kept beyond the valid count: the threshold is the largest probability, which itself is dropped.
    assert ohem_keep_mask(logits, label, thresh=0.7, min_kept=100).sum() == 5
    pix = make_pixel_loss("ohem", ohem_thresh=0.7, ohem_min_kept=3)(logits, label)
    assert torch.allclose(pix, pixel_cross_entropy(logits, label) * keep)


def test_ohem_min_kept_counts_per_image_of_the_batch():
    logits = _two_class_logits([0.9, 0.8, 0.95, 0.99]).view(2, 2, 1, 2)
    label = torch.zeros(2, 1, 2, dtype=torch.long)
    assert ohem_keep_mask(logits, label, thresh=0.0, min_kept=1).sum() == 2  # k = min_kept * N


def test_unknown_loss_name():
    with pytest.raises(ConfigError, match="loss.name"):
        make_pixel_loss("dice")


def _tiny_ocrnet():
    cfg = {"backbone": {"type": "resnet_v1c", "depth": 18, "width_mult": 0.25, "pretrained": "none"},
           "head": {"type": "ocr", "in_index": 3, "channels": 16, "ocr_channels": 8,
                    "stage0": {"type": "fcn", "in_index": 2, "channels": 8, "num_convs": 1, "concat_input": False}},
           "aux": {"enabled": False}}
    return build_model(cfg, num_classes=4, hl={"enabled": True}).train()


def test_cascade_model_outputs_and_hl_copies_both_stages():
    model = _tiny_ocrnet()
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == {"out", "out0", "hl"}
    assert out["out"].shape == out["out0"].shape == (2, 4, 8, 8) and out["hl"].shape == (2, 1, 8, 8)
    assert model.hl_head[0].conv_seg.out_channels == 4 and model.hl_head[1].conv_seg.out_channels == 1
    model.eval()
    assert set(model(torch.randn(1, 3, 64, 64))) == {"out", "out0"}
    assert model.predict(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)
    assert model.predict_hl(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_cascade_hl_loss_reaches_only_the_hl_copies():
    torch.manual_seed(0)
    model = _tiny_ocrnet()
    batch = {"img": torch.randn(2, 3, 64, 64), "label": torch.randint(0, 4, (2, 64, 64))}
    _, logs = _step(_labelled_loss(), model, batch)
    assert {"decode_0.loss_ce", "decode_1.loss_ce", "weight_loss", "decode_0.acc_seg"} <= set(logs)
    assert "decode.loss_ce" not in logs
    # L_h uses decode_1 only: its ratio to the decode_1 loss is -lam.
    assert torch.allclose(-logs["weight_loss"] / logs["decode_1.loss_ce"], torch.tensor(0.01), rtol=1e-4)
    logs["weight_loss"].backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("hl_head.0."))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("hl_head.1."))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if not n.startswith("hl_head."))


def test_cascade_stage_losses_reach_only_the_decode_path():
    torch.manual_seed(0)
    model = _tiny_ocrnet()
    batch = {"img": torch.randn(2, 3, 64, 64), "label": torch.randint(0, 4, (2, 64, 64))}
    _, logs = _step(_labelled_loss(name="focal"), model, batch)
    (logs["decode_0.loss_focal"] + logs["decode_1.loss_focal"]).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith("hl_head."))
    assert grads["decode_head.0.conv_seg.weight"].abs().sum() > 0
    assert grads["backbone.layer4.0.downsample.0.weight"].abs().sum() > 0  # not conv1: zero-init residual BN


def test_cascade_stage0_weight_without_hl():
    torch.manual_seed(0)
    model = _tiny_ocrnet()
    model.hl_head = None
    batch = {"img": torch.randn(2, 3, 64, 64), "label": torch.randint(0, 4, (2, 64, 64))}
    torch.manual_seed(1)
    _, a = _step(_labelled_loss(), model, batch)
    torch.manual_seed(1)
    _, b = _step(_labelled_loss(stage0_weight=1.0), model, batch)
    assert "weight_loss" not in a and torch.allclose(a["decode_0.loss_ce"] / 0.4, b["decode_0.loss_ce"])
    assert torch.allclose(a["decode_1.loss_ce"], b["decode_1.loss_ce"])


def test_ohem_threshold_per_group_of_images():
    # Image 0 is all easy, image 1 all hard: one threshold over both keeps image 1's pixels only, one threshold
    # per image (the reference's per-GPU scope with 1 image per GPU) keeps the hardest min_kept of each.
    probs = torch.tensor([[0.95, 0.97, 0.99, 0.98], [0.1, 0.2, 0.3, 0.4]])
    logits = torch.stack([probs.log(), (1 - probs).log()], dim=1).view(2, 2, 1, 4)
    label = torch.zeros(2, 1, 4, dtype=torch.long)
    together = ohem_keep_mask(logits, label, thresh=0.7, min_kept=1)
    assert together[0].sum() == 0 and together[1].all()
    grouped = ohem_keep_mask(logits, label, thresh=0.7, min_kept=1, group=1)
    assert grouped[0, 0].tolist() == [True, False, False, False] and grouped[1].all()
    with pytest.raises(ConfigError, match="divisible"):
        ohem_keep_mask(logits, label, group=3)


def _indexed_ohem(true_prob, valid, thresh, min_kept, prob_rule):
    """The samplers' definitions written with boolean indexing (which waits on the device), for one group."""
    probs = true_prob[valid]
    if prob_rule:  # the semi-supervised references' rule
        if probs.numel() < min_kept:
            return valid
        return valid & (true_prob <= max(thresh, probs.kthvalue(min_kept).values.item()))
    if probs.numel() == 0:
        return torch.zeros_like(valid)
    kth = probs.sort().values[min(min_kept, probs.numel() - 1)]
    return valid & (true_prob < max(thresh, kth.item()))


@pytest.mark.parametrize("ignored", [0.0, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("min_kept", [1, 10, 40, 500])
@pytest.mark.parametrize("thresh", [0.0, 0.5])  # 0: the k-th probability alone decides
def test_sync_free_ohem_samplers_equal_their_indexed_definitions(ignored, min_kept, thresh):
    g = torch.Generator().manual_seed(min_kept)
    logits = torch.randn(4, 3, 8, 8, generator=g) * 3
    label = torch.randint(0, 3, (4, 8, 8), generator=g)
    label[torch.rand(4, 8, 8, generator=g) < ignored] = 255
    valid = label != 255
    true_prob = logits.softmax(1).gather(1, label.where(valid, 0).unsqueeze(1)).squeeze(1)
    for group in (1, 2, 4):
        mmseg = ohem_keep_mask(logits, label, thresh=thresh, min_kept=min_kept, group=group)
        semisup = prob_ohem_keep_mask(logits, label, thresh=thresh, min_kept=min_kept, group=group)
        for start in range(0, 4, group):
            part = slice(start, start + group)
            args = (true_prob[part], valid[part], thresh)
            assert torch.equal(mmseg[part], _indexed_ohem(*args, min_kept * group, prob_rule=False))
            assert torch.equal(semisup[part], _indexed_ohem(*args, min_kept, prob_rule=True))


def _pspnet_batch():
    torch.manual_seed(0)
    cfg = {"backbone": {"type": "resnet_v1c", "depth": 18, "width_mult": 0.25, "stem_channels": [8, 8, 16],
                        "pretrained": "none"},
           "head": {"type": "psp", "in_index": 3, "channels": 8, "pool_scales": [1, 2]},
           "aux": {"enabled": True, "in_index": 2, "channels": 8}}
    model = build_model(cfg, num_classes=4).train()
    label = torch.randint(0, 4, (2, 64, 64), generator=torch.Generator().manual_seed(2))
    label[:, :, :20] = 255
    return model, {"img": torch.randn(2, 3, 64, 64), "label": label}


def test_loss_keys_carry_the_loss_name():
    model, batch = _pspnet_batch()
    assert "decode.loss_focal" in _step(_labelled_loss(name="focal"), model, batch)[1]
    assert "decode.loss_ce" in _step(_labelled_loss(name="ohem"), model, batch)[1]  # mmseg: a sampler on CE


def test_focal_reference_bug_shows_void_as_class_0_to_aux_and_accuracy():
    model, batch = _pspnet_batch()
    torch.manual_seed(3)
    _, right = _step(_labelled_loss(name="focal"), model, batch)
    torch.manual_seed(3)
    _, bug = _step(_labelled_loss(name="focal", focal_reference_bug=True), model, batch)
    assert torch.equal(right["decode.loss_focal"], bug["decode.loss_focal"])  # the focal loss itself is right
    corrupted = batch["label"].masked_fill(batch["label"] == 255, 0)
    torch.manual_seed(3)  # the same dropout masks as in the steps above
    aux = resize(model(batch["img"])["aux"], (64, 64), False)
    assert torch.allclose(bug["aux.loss_ce"], pixel_cross_entropy(aux, corrupted).mean() * 0.4, rtol=1e-5)
    assert not torch.allclose(bug["aux.loss_ce"], right["aux.loss_ce"])
    assert bug["decode.acc_seg"] != right["decode.acc_seg"]


def test_prob_ohem_keeps_the_min_kept_hardest_or_everything_below_a_lenient_threshold():
    logits = _two_class_logits([0.9, 0.1, 0.95, 0.8, 0.85, 0.99])
    label = torch.zeros(1, 1, 6, dtype=torch.long)
    # 3rd smallest probability (0.85) is above 0.7: the threshold rises to it, and pixels at it are kept.
    keep = prob_ohem_keep_mask(logits, label, thresh=0.7, min_kept=3)
    assert keep[0, 0].tolist() == [False, True, False, True, True, False]
    # Fewer valid pixels than min_kept: every valid pixel is kept.
    assert prob_ohem_keep_mask(logits, label, thresh=0.7, min_kept=7).all()
    pix = pixel_cross_entropy(logits, label)
    assert torch.allclose(kept_mean(pix * keep, keep), pix[keep].mean())


def test_prob_ohem_with_uniform_hl_is_prob_ohem():
    # The invariant of mask_then_normalise: a uniform H reproduces the references' OHEM exactly.
    torch.manual_seed(0)
    out = {"out": torch.randn(2, 4, 16, 16), "hl": torch.zeros(2, 1, 16, 16)}
    label = torch.randint(0, 4, (2, 16, 16))
    label[0, :4] = 255
    plain = _labelled_loss(name="prob_ohem", ohem_min_kept=50, hl={"enabled": False})(
        {"out": out["out"]}, label, False).seg
    with_hl = _labelled_loss(name="prob_ohem", ohem_min_kept=50)(out, label, False)
    assert torch.allclose(with_hl.seg, plain, rtol=1e-6)
    replaced = _labelled_loss(name="prob_ohem", ohem_min_kept=50, hl={"semisup": {"apply_to": ["sup"],
                                                                                "ohem": "replace"}})(out, label, False)
    assert torch.allclose(replaced.seg, pixel_cross_entropy(out["out"], label).mean(), rtol=1e-6)
