"""SyntheticStreets: determinism, class coverage, thin/small structures, hardness bits, domains, splits, items."""
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hlbench.data import build_datasets, worker_init_fn
from hlbench.data.synthetic import (CLASSES, CONFUSABLE_PAIRS, HARD_BITS, PALETTE, POLE, SKY, SMALL_CLASSES,
                                    THIN_CLASSES, WIRE, SyntheticStreets, generate_scene)
from hlbench.errors import ConfigError

SIZE = (96, 128)
CONFIG = Path(__file__).resolve().parents[1] / "hlbench" / "conf" / "data" / "synthetic.yaml"


def small_config():
    cfg = OmegaConf.load(CONFIG)
    cfg.train.num_images, cfg.val.num_images = 4, 2
    cfg.val.size = [64, 96]
    return cfg


def test_scene_is_deterministic_per_seed_split_and_index():
    a, b = generate_scene(SIZE, 0, "train", 3), generate_scene(SIZE, 0, "train", 3)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    img, label, hard = a
    assert img.shape == SIZE + (3,) and img.dtype == np.uint8
    assert label.shape == hard.shape == SIZE and label.dtype == hard.dtype == np.uint8
    for other in (generate_scene(SIZE, 0, "train", 4), generate_scene(SIZE, 0, "val", 3),
                  generate_scene(SIZE, 1, "train", 3)):
        assert not np.array_equal(label, other[1])


def test_every_class_appears_within_a_few_scenes():
    seen = set()
    for i in range(6):
        seen |= set(np.unique(generate_scene(SIZE, 0, "train", i)[1]).tolist())
    assert seen == set(range(len(CLASSES)))
    assert len(PALETTE) == len(CLASSES)


def test_poles_are_one_to_three_px_columns_and_wires_one_px_lines():
    import cv2
    found = 0
    for i in range(6):
        label = generate_scene((160, 160), 0, "train", i)[1]
        pole, wire = (label == POLE).astype(np.uint8), (label == WIRE).astype(np.uint8)
        # No horizontal run of 4 pole pixels, but vertical runs (columns) of many rows.
        assert not cv2.erode(pole, np.ones((1, 4), np.uint8)).any()
        found += int(cv2.erode(pole, np.ones((8, 1), np.uint8)).any())
        # A 1 px line never holds a 3x3 block, even where two wires cross.
        assert not cv2.erode(wire, np.ones((3, 3), np.uint8)).any()
    assert found >= 3


def test_hardness_bits_mark_thin_small_confusable_classes_and_boundaries():
    label, hard = generate_scene(SIZE, 0, "train", 1)[1:]
    confusable = [c for pair in CONFUSABLE_PAIRS for c in pair]
    for name, classes in (("thin", THIN_CLASSES), ("small", SMALL_CLASSES), ("confusable", confusable)):
        assert np.array_equal((hard & HARD_BITS[name]) > 0, np.isin(label, classes)), name
    # Brute force: a label change within Chebyshev distance 2 <=> boundary bit.
    h, w = label.shape
    padded = np.pad(label.astype(int), 2, constant_values=-1)
    near_change = np.zeros_like(label, bool)
    for dy in range(5):
        for dx in range(5):
            other = padded[dy:dy + h, dx:dx + w]
            near_change |= (other >= 0) & (other != label)
    assert np.array_equal((hard & HARD_BITS["boundary"]) > 0, near_change)
    assert near_change.any() and not near_change.all()


def test_domains_share_the_layout_but_differ_in_colour():
    src_img, src_label, _ = generate_scene(SIZE, 0, "val", 2, "source")
    tgt_img, tgt_label, _ = generate_scene(SIZE, 0, "val", 2, "target")
    assert np.array_equal(src_label, tgt_label)
    sky = src_label == SKY
    sky_gap = np.abs(src_img[sky].mean(0) - tgt_img[sky].mean(0)).max()
    assert sky_gap > 30
    assert np.abs(src_img.astype(float).mean((0, 1)) - tgt_img.astype(float).mean((0, 1))).max() > 5


def test_unlabeled_split_hides_labels_and_uses_other_scenes():
    img, label, hard = generate_scene(SIZE, 0, "unlabeled", 0)
    assert (label == 255).all() and not hard.any()
    assert not np.array_equal(img, generate_scene(SIZE, 0, "train", 0)[0])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ConfigError, match="split"):
        SyntheticStreets("test", 4)
    with pytest.raises(ConfigError, match="domain"):
        generate_scene(SIZE, 0, "train", 0, domain="night")
    with pytest.raises(IndexError):
        SyntheticStreets("val", 2)[2]


def test_train_and_val_items_follow_the_contract():
    cfg = small_config()
    datasets = build_datasets(cfg, seed=0)
    assert datasets["train"].classes == list(CLASSES) and len(datasets["train"]) == 4
    item = datasets["train"][1]
    assert set(item) == {"img", "label", "hard", "img_hw", "index"}
    assert item["img"].dtype == torch.uint8 and item["img"].shape == (3, 128, 128)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (128, 128)
    assert item["hard"].dtype == torch.uint8 and item["hard"].shape == (128, 128)
    assert item["img_hw"].dtype == torch.int64
    h, w = item["img_hw"].tolist()
    assert 0 < h <= 128 and 0 < w <= 128
    assert (item["label"][h:] == 255).all() and (item["label"][:, w:] == 255).all()
    assert not item["img"][:, h:].any() and not item["hard"][h:].any()
    assert item["index"] == 1
    val = datasets["val"][0]
    assert set(val) == {"img", "label", "hard", "index"}
    assert val["img"].shape == (3, 64, 96) and val["label"].shape == (64, 96) and val["label"].dtype == torch.int64


def test_train_items_are_reproducible_given_the_torch_seed():
    dataset = build_datasets(small_config(), seed=0)["train"]
    torch.manual_seed(5)
    a = dataset[0]
    torch.manual_seed(5)
    b = dataset[0]
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["label"], b["label"])
    # A different run seed gives different augmentations of the same scene.
    other = build_datasets(small_config(), seed=1)["train"]
    torch.manual_seed(5)
    assert not torch.equal(a["img"], other[0]["img"])


@pytest.mark.parametrize("name", ["synthetic", "synthetic_semisup"])
def test_pregenerated_scenes_give_the_items_drawn_on_access(name):
    cfg = OmegaConf.load(CONFIG.with_name(f"{name}.yaml"))
    cfg.train.num_images, cfg.val.num_images, cfg.val.size = 8, 2, [64, 96]
    lazy, drawn = (build_datasets(OmegaConf.merge(cfg, {"pregenerate": flag}), seed=0) for flag in (False, True))
    assert lazy["train"].drawn is None and drawn["train"].drawn is not None
    for split in drawn:
        for i in range(len(drawn[split])):
            torch.manual_seed(i)
            a = lazy[split][i]
            torch.manual_seed(i)
            b = drawn[split][i]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


def test_a_transform_writing_into_a_pregenerated_scene_leaves_the_stored_scene_as_drawn():
    def scribble(sample, rng):
        sample["img"][:] = 0
        return sample

    streets = SyntheticStreets("val", 2, size=(64, 96), transform=scribble, pregenerate=True)
    streets[0]
    assert np.array_equal(streets.drawn[0][0], generate_scene((64, 96), 0, "val", 0)[0])


def test_dataloader_workers_reproduce_batches_given_the_loader_generator():
    dataset = build_datasets(small_config(), seed=0)["train"]

    def first_batch():
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2,
                                             worker_init_fn=worker_init_fn,
                                             generator=torch.Generator().manual_seed(11))
        return next(iter(loader))

    a, b = first_batch(), first_batch()
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["index"], b["index"])


def test_build_datasets_rejects_unknown_names_and_class_counts():
    cfg = small_config()
    cfg.name = "cityscapes-typo"
    with pytest.raises(ConfigError, match="synthetic"):
        build_datasets(cfg, seed=0)
    cfg = small_config()
    cfg.num_classes = 19
    with pytest.raises(ConfigError, match="num_classes"):
        build_datasets(cfg, seed=0)
