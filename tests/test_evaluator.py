"""Evaluation does only what the data can score: the HL branch runs for the AUROC only where the data set has a
hardness mask, and otherwise for the HL-map panel's images alone."""
import pytest
import torch
from omegaconf import OmegaConf

from hlbench.engine.evaluator import evaluate
from hlbench.models import build_model

EVAL = OmegaConf.create({"mode": "whole", "crop": None, "stride": None, "window_batch": 4, "batch_size": 4,
                         "hl_auroc": True})
DATA = OmegaConf.create({"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "hard_kinds": None})


class Images(torch.utils.data.Dataset):
    """Eight random labelled images; `hard_bits` (a hardness mask's kinds) only when `with_mask`."""

    classes = ["a", "b", "c"]
    palette = [(0, 0, 0), (128, 0, 0), (0, 128, 0)]

    def __init__(self, with_mask: bool):
        self.hard_bits = {"thin": 1} if with_mask else {}
        g = torch.Generator().manual_seed(0)
        self.items = [{"img": torch.rand(3, 32, 32, generator=g), "label": torch.randint(0, 3, (32, 32), generator=g),
                       "hard": torch.randint(0, 2, (32, 32), generator=g, dtype=torch.uint8), "index": i}
                      for i in range(8)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _counted_model():
    torch.manual_seed(0)
    cfg = {"backbone": {"type": "resnet_v1c", "depth": 18, "width_mult": 0.25, "stem_channels": [8, 8, 16],
                        "pretrained": "none"},
           "head": {"type": "fcn", "in_index": 3, "channels": 8, "num_convs": 1}, "aux": {"enabled": False}}
    model = build_model(cfg, num_classes=3, hl={"enabled": True})
    seen = []
    predict_hl = model.predict_hl
    model.predict_hl = lambda img: seen.append(img.shape[0]) or predict_hl(img)
    return model, seen


def test_hl_branch_runs_for_the_auroc_only_where_a_hardness_mask_exists():
    model, seen = _counted_model()
    scored = evaluate(model, Images(with_mask=True), EVAL, DATA, torch.device("cpu"), Images.classes, num_panel=2)
    assert sum(seen) == 8 and scored["hl_auroc"] is not None
    model, seen = _counted_model()
    plain = evaluate(model, Images(with_mask=False), EVAL, DATA, torch.device("cpu"), Images.classes, num_panel=2)
    assert seen == [2] and plain["hl_auroc"] is None and plain["hl_auroc_kinds"] == {}
    assert plain["panel"]["hl"].shape == (2, 32, 32)
    assert plain["metrics"]["mIoU"] == scored["metrics"]["mIoU"]  # the HL branch never changes predictions


def test_no_panel_means_no_hl_forward_on_unscorable_data():
    model, seen = _counted_model()
    evaluate(model, Images(with_mask=False), EVAL, DATA, torch.device("cpu"), Images.classes, num_panel=0)
    assert seen == []


class _WindowModel(torch.nn.Module):
    """A segmentor whose logits tell full windows (p = 0.6 for class 0) from cut ones (p = 1 for class 1)."""

    num_classes, align_corners = 2, False

    def _decode(self, img):
        full = img.shape[-1] == 3
        p0 = 0.6 if full else 1e-6
        logits = torch.tensor([p0, 1 - p0]).log().view(1, 2, 1, 1)
        return logits.expand(img.shape[0], 2, *img.shape[-2:])


def test_both_sliding_windows_on_a_hand_made_case():
    from hlbench.models.segmentor import Segmentor

    model = _WindowModel()
    img = torch.zeros(1, 3, 1, 5)
    # UniMatch: windows [0:3], [2:5] and the cut [4:5]; pixel 4 sums (0.6, 0.4) + (0, 1) -> class 1.
    truncated = Segmentor._slide_truncated(model, img, (1, 3), (1, 2)).argmax(1)
    assert truncated[0, 0].tolist() == [0, 0, 0, 0, 1]
    # mmseg / U2PL: windows shifted inside ([0:3], [2:5], [2:5]), so every window is full.
    shifted = Segmentor._slide(model, img, (1, 3), (1, 2), window_batch=4).argmax(1)
    assert shifted[0, 0].tolist() == [0, 0, 0, 0, 0]


class _ConstantModel(torch.nn.Module):
    """Predicts class 1 everywhere."""

    num_classes, align_corners, hl_head = 3, False, None

    def predict(self, img, **kw):
        out = torch.zeros(img.shape[0], 3, *img.shape[-2:])
        out[:, 1] = 1
        return out


def test_center_protocol_scores_the_central_crop_only():
    data = Images(with_mask=False)
    for item in data.items:
        item["label"][:] = 2
        item["label"][14:18, 13:19] = 1  # the central 4 x 6 of 32 x 32
    center = OmegaConf.merge(EVAL, {"mode": "center", "crop": [4, 6]})
    scored = evaluate(_ConstantModel(), data, center, DATA, torch.device("cpu"), Images.classes)
    assert scored["metrics"]["IoU.b"] == 1.0 and scored["metrics"]["aAcc"] == 1.0
    whole = evaluate(_ConstantModel(), data, EVAL, DATA, torch.device("cpu"), Images.classes)
    assert whole["metrics"]["aAcc"] == pytest.approx(24 / 1024)


class _PaddingSeer(torch.nn.Module):
    """Predicts class 2 where the input is exactly 0 (the padding), class 1 elsewhere; records the input sizes."""

    num_classes, align_corners, hl_head = 3, False, None

    def __init__(self):
        super().__init__()
        self.sizes = []

    def predict(self, img, **kw):
        self.sizes.append(tuple(img.shape[-2:]))
        pad = (img == 0).all(1)
        return torch.stack([torch.zeros_like(pad), ~pad, pad], 1).float()


def test_size_divisor_pads_the_input_and_scores_the_image_only():
    # mmseg 1.x's data preprocessor with test_cfg size_divisor: pad bottom/right to a multiple, crop the logits back
    data = Images(with_mask=False)
    for item in data.items:
        item["img"] = item["img"][:, :29, :27] + 0.1  # no pixel is 0: only the padding is
        item["label"] = torch.ones(29, 27, dtype=torch.long)
    model = _PaddingSeer()
    scored = evaluate(model, data, OmegaConf.merge(EVAL, {"size_divisor": 16}), DATA, torch.device("cpu"),
                      Images.classes)
    assert set(model.sizes) == {(32, 32)} and scored["metrics"]["aAcc"] == 1.0  # the padding's class 2 never counts
    assert evaluate(model, data, EVAL, DATA, torch.device("cpu"), Images.classes)["metrics"]["aAcc"] == 1.0
    assert model.sizes[-1] == (29, 27)
