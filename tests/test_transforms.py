"""mmseg-0.x-equivalent pipeline steps, pipeline builders, sample_rng and normalize_batch."""
import cv2
import numpy as np
import pytest
import torch

from hlbench.data import normalize_batch, transforms
from hlbench.data.transforms import (Pad, PhotoMetricDistortion, RandomCrop, RandomFlip, RandomResize, ToTensor,
                                     build_test_pipeline, build_train_pipeline, rescale_size, sample_rng)
from hlbench.errors import ConfigError

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def make_sample(h=40, w=60, seed=0):
    """Image whose channel 0 equals the label, and a hard mask equal to label + 1."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 5, (h, w)).astype(np.uint8)
    img = np.stack([label, rng.integers(0, 256, (h, w)), rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    return {"img": img, "label": label, "hard": label + 1, "index": 7}


class ScriptedRng:
    """Stands in for a Generator: returns scripted integers()/uniform() draws in order."""

    def __init__(self, integers, uniforms):
        self._integers, self._uniforms = list(integers), list(uniforms)

    def integers(self, *args, **kwargs):
        return self._integers.pop(0)

    def uniform(self, *args, **kwargs):
        return self._uniforms.pop(0)


@pytest.mark.parametrize("w, h, scale, expected", [
    (2048, 1024, (2049, 1025), (2049, 1025)),  # Cityscapes 769 test resize (mmseg's cityscapes_769x769.py)
    (1914, 1052, (1280, 720), (1280, 704)),    # GTA fixed-scale train resize (gta_to_cityscapes_512x512.py)
    (2048, 1024, (2048, 1024), (2048, 1024)),
    (683, 512, (2048, 512), (683, 512)),       # ADE20K: short side 512
])
def test_rescale_size_follows_the_mmcv_keep_ratio_law(w, h, scale, expected):
    assert rescale_size(w, h, scale) == expected


def test_random_resize_resizes_image_label_and_masks_with_the_scale_law():
    sample = make_sample(1052, 1914)
    out = RandomResize((1280, 720))(sample, np.random.default_rng(0))
    assert out["img"].shape == (704, 1280, 3) and out["label"].shape == out["hard"].shape == (704, 1280)
    # Nearest interpolation: no new label values, and the mask still equals label + 1.
    assert set(np.unique(out["label"])) <= set(range(5))
    assert np.array_equal(out["hard"], out["label"] + 1)
    assert out["index"] == 7


def test_random_resize_ratio_range_floors_the_scaled_target():
    sample = make_sample(1024 // 8, 2048 // 8)
    out = RandomResize((256, 128), (0.5, 2.0))(sample, np.random.default_rng(3))
    r = np.random.default_rng(3).uniform(0.5, 2.0)
    expected = rescale_size(256, 128, (int(256 * r), int(128 * r)))
    assert out["img"].shape[1::-1] == expected


@pytest.mark.parametrize("h, w, short, expected", [
    (512, 683, 256, (342, 256)),     # ADE20K landscape: short side 256, long side 683 * 0.5 = 341.5 rounded up
    (683, 512, 1024, (1024, 1366)),  # portrait: the short side is the width
    (512, 2000, 1024, (2048, 524)),  # long side past max_size 2048: both scaled down, then rounded
])
def test_shortest_edge_resize_draws_a_short_side_and_caps_the_long_side(h, w, short, expected):
    resize = transforms.RandomShortestEdge([256, 512, 1024], max_size=2048)
    assert resize.target(h, w, short) == expected
    # The drawn scale is scales[rng.integers(3)]; image, label and float map follow it.
    sample = {**make_sample(h // 8, w // 8), "hl_map": np.ones((h // 8, w // 8), np.float32)}
    out = resize(sample, ScriptedRng([[256, 512, 1024].index(short)], []))
    size = rescale_size(w // 8, h // 8, resize.target(h // 8, w // 8, short))
    assert out["img"].shape[1::-1] == out["label"].shape[::-1] == out["hl_map"].shape[::-1] == size
    assert set(np.unique(out["label"])) <= set(range(5)) and np.allclose(out["hl_map"], 1)
    pipeline = build_train_pipeline({"resize": {"mode": "shortest_edge", "scales": [16, 24], "max_size": 64},
                                     "crop": [8, 8]})
    assert pipeline(make_sample(), np.random.default_rng(0))["img"].shape == (3, 8, 8)
    with pytest.raises(ConfigError, match="resize.max_size"):
        build_train_pipeline({"crop": [8, 8], "resize": {"mode": "shortest_edge", "scales": [16], "max_size": 8}})


def test_test_resize_keeps_label_and_masks_at_original_size():
    sample = make_sample(20, 40)
    out = transforms.TestResize((80, 40))(sample)
    assert out["img"].shape == (40, 80, 3)
    assert out["label"] is sample["label"] and out["hard"] is sample["hard"]


def test_resize_to_multiple_rounds_each_side_up_and_keeps_label_and_masks():
    sample = make_sample(37, 70)
    out = transforms.ResizeToMultiple(32)(sample)
    # mmcv.imresize_to_multiple(scale_factor=1): ceil(side / 32) * 32, one bilinear cv2 resize (a stretch, no pad)
    np.testing.assert_array_equal(out["img"], cv2.resize(sample["img"], (96, 64), interpolation=cv2.INTER_LINEAR))
    assert out["label"] is sample["label"] and out["hard"] is sample["hard"]
    exact = make_sample(64, 96)
    np.testing.assert_array_equal(transforms.ResizeToMultiple(32)(exact)["img"], exact["img"])


def test_test_pipeline_resizes_to_the_scale_then_to_a_multiple_of_32():
    # The HL authors' SegFormer test pipeline: Resize((2048, 512), keep_ratio) + ResizeToMultiple(32); an ADE20K
    # image of 683x512 [W x H] goes to 683x512 and then 704x512, its label stays 683x512 for the evaluator.
    sample = make_sample(512, 683)
    out = build_test_pipeline({"resize": {"scale": [2048, 512]}, "resize_to_multiple": 32})(sample, None)
    assert tuple(out["img"].shape) == (3, 512, 704) and tuple(out["label"].shape) == (512, 683)
    with pytest.raises(ConfigError, match="resize_to_multiple"):
        build_test_pipeline({"resize_to_multiple": 0})


def test_random_crop_respects_cat_max_ratio_when_possible():
    label = np.zeros((100, 70), np.uint8)
    label[:, 35:] = 1  # a 40-wide crop at x in [0, 30] is balanced (both classes < 75 %) only for 5 < x < 25
    sample = {"img": np.zeros((100, 70, 3), np.uint8), "label": label, "hard": label.copy()}

    def balanced(crop):
        counts = np.bincount(crop.ravel(), minlength=2)
        return counts.min() > 0 and counts.max() / counts.sum() < 0.75

    checked = [RandomCrop((40, 40), 0.75)(sample, np.random.default_rng(s)) for s in range(40)]
    unchecked = [RandomCrop((40, 40))(sample, np.random.default_rng(s)) for s in range(40)]
    assert all(balanced(out["label"]) for out in checked)
    assert not all(balanced(out["label"]) for out in unchecked)
    assert all(np.array_equal(out["label"], out["hard"]) and out["img"].shape == (40, 40, 3) for out in checked)


def test_random_crop_of_a_smaller_image_keeps_its_own_size_and_aligns_masks():
    sample = make_sample(30, 50)
    out = RandomCrop((40, 40))(sample, np.random.default_rng(1))
    assert out["img"].shape == (30, 40, 3)
    assert np.array_equal(out["img"][..., 0], out["label"]) and np.array_equal(out["hard"], out["label"] + 1)


def test_random_flip_flips_image_label_and_masks_together():
    sample = make_sample()
    flipped = RandomFlip(1.0)(sample, np.random.default_rng(0))
    assert np.array_equal(flipped["img"], sample["img"][:, ::-1])
    assert np.array_equal(flipped["label"], sample["label"][:, ::-1])
    assert np.array_equal(flipped["hard"], sample["hard"][:, ::-1])
    assert RandomFlip(0.0)(sample, np.random.default_rng(0)) is sample


def test_photometric_distortion_changes_only_colours():
    sample = make_sample()
    changed = 0
    for seed in range(8):
        out = PhotoMetricDistortion()(sample, np.random.default_rng(seed))
        assert out["img"].dtype == np.uint8 and out["img"].shape == sample["img"].shape
        assert out["label"] is sample["label"] and out["hard"] is sample["hard"]
        # A per-pixel colour map: equal input colours stay equal, up to OpenCV's SIMD-vs-scalar HSV rounding.
        flat_in, flat_out = sample["img"].reshape(-1, 3), out["img"].reshape(-1, 3).astype(int)
        _, first, inverse = np.unique(flat_in, axis=0, return_index=True, return_inverse=True)
        assert np.abs(flat_out - flat_out[first][inverse.ravel()]).max() <= 3
        changed += not np.array_equal(out["img"], sample["img"])
    assert changed >= 4


def test_photometric_distortion_follows_mmseg_op_order_and_truncation():
    img = np.full((2, 2, 3), 100, np.uint8)
    # brightness fires (+10.7), contrast at the end (mode 0), saturation/hue skipped, contrast fires (x2).
    out = PhotoMetricDistortion()({"img": img}, ScriptedRng([1, 0, 0, 0, 1], [10.7, 2.0]))
    assert (out["img"] == 220).all()  # float 110.7 truncated to 110, then doubled
    # Hue: pure red (H=0) shifted by -18 wraps to H=162 in OpenCV's 8-bit [0, 180) range.
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    out = PhotoMetricDistortion()({"img": red}, ScriptedRng([0, 1, 0, 0, 1, -18], []))
    expected = cv2.cvtColor(np.array([[[162, 255, 255]]], np.uint8), cv2.COLOR_HSV2RGB)
    assert np.array_equal(out["img"], expected)


def test_pad_fills_image_zero_label_ignore_masks_zero_and_records_img_hw():
    sample = make_sample(30, 20)
    out = Pad((32, 24))(sample)
    assert out["img"].shape == (32, 24, 3) and out["img_hw"] == (30, 20)
    assert not out["img"][30:].any() and not out["img"][:, 20:].any()
    assert (out["label"][30:] == 255).all() and (out["label"][:, 20:] == 255).all()
    assert not out["hard"][30:].any() and not out["hard"][:, 20:].any()
    assert np.array_equal(out["label"][:30, :20], sample["label"])
    with pytest.raises(ConfigError, match="larger than the pad size"):
        Pad((16, 24))(sample)


def test_to_tensor_dtypes_and_layout():
    out = ToTensor()(Pad((40, 64))(make_sample()))
    assert out["img"].dtype == torch.uint8 and out["img"].shape == (3, 40, 64)
    assert out["label"].dtype == torch.int64 and out["hard"].dtype == torch.uint8
    assert out["img_hw"].tolist() == [40, 60] and out["index"] == 7
    assert torch.equal(out["img"][0, :, :60].long(), out["label"][:, :60])


def test_train_pipeline_outputs_crop_sized_tensors():
    cfg = {"resize": {"scale": [60, 40], "ratio_range": [0.5, 1.5]}, "crop": [32, 48], "cat_max_ratio": 0.75,
           "flip": 0.5, "photometric": True}
    pipeline = build_train_pipeline(cfg)
    for seed in range(5):
        out = pipeline(make_sample(), np.random.default_rng(seed))
        assert out["img"].shape == (3, 32, 48) and out["label"].shape == out["hard"].shape == (32, 48)
        h, w = out["img_hw"].tolist()
        assert 0 < h <= 32 and 0 < w <= 48


def test_pipeline_builders_reject_bad_configs():
    with pytest.raises(ConfigError, match="crop"):
        build_train_pipeline({"flip": 0.5})
    with pytest.raises(ConfigError, match="flipp"):
        build_train_pipeline({"crop": [8, 8], "flipp": 0.5})
    with pytest.raises(ConfigError, match="ratio_range"):
        build_train_pipeline({"crop": [8, 8], "resize": {"scale": [8, 8], "ratio_range": [2, 1]}})
    out = build_test_pipeline({"resize": None})(make_sample(), None)
    assert out["img"].shape == (3, 40, 60)


def test_sample_rng_is_reproducible_given_torch_seed_and_seed():
    torch.manual_seed(3)
    a = sample_rng(0).random()
    torch.manual_seed(3)
    assert sample_rng(0).random() == a
    torch.manual_seed(3)
    assert sample_rng(1).random() != a


def test_normalize_batch_zeros_the_padding_and_normalises_the_rest():
    img = torch.randint(0, 256, (2, 3, 6, 8), dtype=torch.uint8)
    img_hw = torch.tensor([[6, 8], [4, 5]])
    out = normalize_batch(img, MEAN, STD, img_hw)
    expected = (img.float() - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.device == img.device
    assert torch.allclose(out[0], expected[0])
    assert torch.allclose(out[1, :, :4, :5], expected[1, :, :4, :5])
    assert (out[1, :, 4:] == 0).all() and (out[1, :, :, 5:] == 0).all()
    assert torch.allclose(normalize_batch(img, MEAN, STD), expected)
    with pytest.raises(ValueError, match="N×C×H×W"):
        normalize_batch(img[0], MEAN, STD)
