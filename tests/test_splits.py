"""Semi-supervised data: the shipped split lists, list formats, user folders, seeded splits, the missing-file check,
the labeled / unlabeled data sets of both semi-supervised data configs, and the U2PL / UniMatch weak pipelines."""
import hashlib
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.data import build_datasets, split_record
from hlbench.data.semisup import (SPLITS_DIR, derived_label, load_split, read_split_list, resolve_split,
                                  seeded_split, shipped_splits, unlabeled_sample)
from hlbench.data.transforms import PadToCrop, RandomLongSide, RandomScaleFactor, build_train_pipeline
from hlbench.errors import ConfigError
from hlbench.suites import run_overrides
from tests.test_datasets import make_cityscapes

COUNTS = {"1_30": 100, "1_16": 186, "1_8": 372, "1_4": 744, "1_2": 1488}
U2PL_LINE = "leftImg8bit/train/ulm/ulm_000079_000019_leftImg8bit.png"
U2PL_LABEL = "gtFine/train/ulm/ulm_000079_000019_gtFine_labelTrainIds.png"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded_sums() -> dict:
    lines = (SPLITS_DIR / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ") for line in lines)}


def test_shipped_files_match_their_recorded_sha256():
    sums = _recorded_sums()
    assert sorted(sums) == sorted(str(p.relative_to(SPLITS_DIR)) for p in SPLITS_DIR.rglob("*.txt"))
    for name, digest in sums.items():
        assert _sha256(SPLITS_DIR / name) == digest, name
    # Byte-exact copies keep the upstream files' missing trailing newlines.
    assert not (SPLITS_DIR / "u2pl" / "1_8" / "labeled.txt").read_bytes().endswith(b"\n")


def test_shipped_fractions_partition_the_same_train_set():
    assert shipped_splits() == sorted([f"u2pl/{f}" for f in ("1_16", "1_8", "1_4", "1_2")] + ["u2pl_ael/1_8"]
                                      + [f"unimatch/{f}" for f in COUNTS])
    train = None
    for name in shipped_splits():
        split = load_split(name)
        labeled = {image for image, _ in split.labeled}
        assert len(labeled) == len(split.labeled) == COUNTS[name.split("/")[1]], name
        assert not labeled & set(split.unlabeled) and len(set(split.unlabeled)) == len(split.unlabeled), name
        union = labeled | set(split.unlabeled)
        assert len(union) == 2975 and all(p.startswith("leftImg8bit/train/") for p in union), name
        assert train is None or union == train, name
        train = union
        # UniMatch's listed labels are exactly the ones U2PL's format derives.
        assert all(label == derived_label(image) for image, label in split.labeled), name
    val = [{image for image, _ in read_split_list(SPLITS_DIR / source / "val.txt")} for source in ("u2pl", "unimatch")]
    assert val[0] == val[1] and len(val[0]) == 500 and all(p.startswith("leftImg8bit/val/") for p in val[0])


def test_reader_reads_both_formats_blank_lines_and_a_missing_trailing_newline(tmp_path):
    u2pl, unimatch = tmp_path / "u2pl.txt", tmp_path / "unimatch.txt"
    u2pl.write_text(f"{U2PL_LINE}\n\n{U2PL_LINE.replace('ulm_000079', 'ulm_000080')}")
    unimatch.write_text(f"{U2PL_LINE} gtFine/x.png\r\n")
    assert read_split_list(u2pl) == [(U2PL_LINE, U2PL_LABEL),
                                     (U2PL_LINE.replace("ulm_000079", "ulm_000080"),
                                      U2PL_LABEL.replace("ulm_000079", "ulm_000080"))]
    assert read_split_list(unimatch) == [(U2PL_LINE, "gtFine/x.png")]


@pytest.mark.parametrize("text,match", [
    (f"{U2PL_LINE}\na b c\n", r"bad\.txt:2: expected '<image>' \(U2PL\) or '<image> <label>' \(UniMatch\), got 3"),
    (f"{U2PL_LINE}\n\nimages/0001.png\n", r"bad\.txt:3: cannot derive the label of 'images/0001\.png'"),
    ("\n \n", r"bad\.txt: the list is empty"),
])
def test_reader_names_file_and_line_of_a_bad_entry(tmp_path, text, match):
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        read_split_list(tmp_path / "bad.txt")
    assert "\n" not in str(err.value)


def _write_folder(folder, labeled, unlabeled, labels=False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labeled.txt").write_text("\n".join(f"{i} {derived_label(i)}" if labels else i for i in labeled))
    (folder / "unlabeled.txt").write_text("\n".join(unlabeled) + "\n")
    return folder


def test_user_folder_in_either_format(tmp_path):
    images = [U2PL_LINE.replace("079", f"{i:03d}") for i in range(5)]
    for labels in (False, True):
        folder = _write_folder(tmp_path / str(labels), images[:2], images[2:], labels)
        split = load_split(str(folder))
        assert split.source == str(folder.resolve()) and split.unlabeled == tuple(images[2:])
        assert split.labeled == tuple((i, derived_label(i)) for i in images[:2])
        assert split.record() == {"source": str(folder.resolve()), "labeled_sha256": _sha256(folder / "labeled.txt"),
                                  "unlabeled_sha256": _sha256(folder / "unlabeled.txt"), "num_labeled": 2,
                                  "num_unlabeled": 3}
    _write_folder(tmp_path / "overlap", images[:2], images[1:])
    with pytest.raises(ConfigError, match="1 images are in both labeled.txt and unlabeled.txt"):
        load_split(str(tmp_path / "overlap"))
    with pytest.raises(ConfigError, match=r"data.split='u2pl/1_3' is neither a shipped split \(u2pl/1_16, .*\) nor"):
        load_split("u2pl/1_3")


def _train_list():
    split = load_split("u2pl/1_8")
    return sorted(split.labeled + tuple((image, derived_label(image)) for image in split.unlabeled))


def test_seeded_split_is_deterministic_disjoint_nested_and_order_free():
    train = _train_list()
    a, b = seeded_split(train, 0.125, 3), seeded_split(list(reversed(train)), 0.125, 3)
    assert {i for i, _ in a.labeled} == {i for i, _ in b.labeled} and a == seeded_split(train, 0.125, 3)
    assert a.source == "seeded(0.125, 3)" and a.labeled == tuple(e for e in train if e in set(a.labeled))
    assert not {i for i, _ in a.labeled} & set(a.unlabeled) and len(a.labeled) + len(a.unlabeled) == 2975
    # The published counts follow from ceil(fraction x 2975).
    for name, count in COUNTS.items():
        numerator, denominator = map(int, name.split("_"))
        assert len(seeded_split(train, numerator / denominator, 0).labeled) == count
    small, large = seeded_split(train, 1 / 16, 3), seeded_split(train, 1 / 4, 3)
    assert set(small.labeled) < set(large.labeled)
    assert set(seeded_split(train, 0.125, 4).labeled) != set(a.labeled)
    # The identity is the sha256 of the lists written in U2PL's format.
    text = "".join(f"{image}\n" for image, _ in a.labeled).encode()
    assert a.record()["labeled_sha256"] == hashlib.sha256(text).hexdigest()
    assert a.record()["num_labeled"] == math.ceil(0.125 * 2975)


@pytest.mark.parametrize("cfg,match", [
    ({"split": None, "split_fraction": 1.0, "split_seed": 0}, r"data.split_fraction=1.0 is not valid"),
    ({"split": None, "split_fraction": None, "split_seed": 0}, r"data.split_fraction=None is not valid"),
    ({"split": None, "split_fraction": 0.5, "split_seed": "x"}, r"data.split_seed='x' is not valid"),
    ({"split": None, "split_fraction": 0.9, "split_seed": 0}, r"labels 2 of 2 train images; expected at least 1"),
    ({"split": "u2pl/1_8", "split_fraction": 0.5, "split_seed": 0}, r"applies to a seeded split"),
])
def test_split_config_errors_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        resolve_split(OmegaConf.create(cfg), lambda: [("a", None), ("b", None)])


def _cityscapes_cfg(root, *overrides):
    return compose(["data=cityscapes_semisup_769", f"data.root={root}",
                                        "data.train_pipeline.crop=[24,24]", *overrides]).data


def test_listed_files_must_exist_under_the_root(hydra_ctx, tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    train = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit" / "train").rglob("*.png"))
    ghost = "leftImg8bit/train/bonn/bonn_000009_000019_leftImg8bit.png"
    folder = _write_folder(tmp_path / "split", train[:1] + [ghost], train[1:])
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(_cityscapes_cfg(root, f"data.split={folder}"), seed=0)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"split {folder.resolve()}: 2 of the 7 listed files")
    assert message.endswith(f"the first is {root / ghost}")
    # The shipped lists name 2975 train images; the fixture has 4.
    with pytest.raises(FileNotFoundError, match=r"split u2pl/1_16: \d+ of the 3161 listed files are missing"):
        build_datasets(_cityscapes_cfg(root), seed=0)


@pytest.mark.parametrize("overrides", [[], ["data.train_pipeline.resize={mode:long_side,ratio_range:[0.5,2.0]}",
                                            "data.train_pipeline.pad={mode:bottom_right,image_fill:[0,0,0],"
                                            "label_fill:255}"]])
def test_cityscapes_semisup_returns_labeled_unlabeled_and_val(hydra_ctx, tmp_path, overrides):
    root = make_cityscapes(tmp_path / "cs")  # labelIds only: the listed trainIds files fall back to them
    train = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit" / "train").rglob("*.png"))
    folder = _write_folder(tmp_path / "split", train[:1], train[1:], labels=True)
    cfg = _cityscapes_cfg(root, f"data.split={folder}", *overrides)
    sets = build_datasets(cfg, seed=0)
    assert {k: len(v) for k, v in sets.items()} == {"train": 1, "unlabeled": 3, "val": 4}
    assert sets["train"].classes == sets["val"].classes and len(sets["train"].classes) == 19
    labeled, unlabeled = sets["train"][0], sets["unlabeled"][0]
    assert set(labeled) == {"img", "label", "hard", "img_hw", "index"} and labeled["label"].shape == (24, 24)
    assert set(unlabeled) == {"img", "pad", "img_hw", "index"} and unlabeled["pad"].dtype == torch.uint8
    assert unlabeled["img"].shape == (3, 24, 24) and unlabeled["img_hw"].tolist() == [24, 24]
    assert split_record(cfg)["num_labeled"] == 1
    seeded = _cityscapes_cfg(root, "data.split=null", "data.split_fraction=0.5", "data.split_seed=1", *overrides)
    assert {k: len(v) for k, v in build_datasets(seeded, seed=0).items()} == {"train": 2, "unlabeled": 2, "val": 4}
    assert split_record(seeded)["source"] == "seeded(0.5, 1)"


def test_split_record_of_a_shipped_list_needs_no_data_on_disk(hydra_ctx, tmp_path):
    cfg = _cityscapes_cfg(tmp_path / "nothing", "data.split=u2pl/1_8")
    sums = _recorded_sums()
    assert split_record(cfg) == {"source": "u2pl/1_8", "labeled_sha256": sums["u2pl/1_8/labeled.txt"],
                                 "unlabeled_sha256": sums["u2pl/1_8/unlabeled.txt"], "num_labeled": 372,
                                 "num_unlabeled": 2603}
    assert split_record(compose(["data=cityscapes_769"]).data) is None


def test_synthetic_semisup_returns_labeled_unlabeled_and_val(hydra_ctx):
    cfg = compose(["data=synthetic_semisup", "data.train.num_images=16", "data.val.num_images=2",
                                       "data.split_fraction=0.25"]).data
    sets = build_datasets(cfg, seed=0)
    assert {k: len(v) for k, v in sets.items()} == {"train": 4, "unlabeled": 12, "val": 2}
    record = split_record(cfg)
    assert record["source"] == "seeded(0.25, 0)" and (record["num_labeled"], record["num_unlabeled"]) == (4, 12)
    labeled_scenes, unlabeled_scenes = sets["train"].scenes, sets["unlabeled"].scenes
    assert sorted(labeled_scenes + unlabeled_scenes) == list(range(16))
    item = sets["unlabeled"][0]
    assert set(item) == {"img", "pad", "img_hw", "index"} and item["img"].shape == (3, *cfg.train_pipeline.crop)
    assert set(sets["train"][0]) == {"img", "label", "hard", "img_hw", "index"}
    cfg.split = "u2pl/1_8"
    cfg.split_fraction = None
    with pytest.raises(ConfigError, match="synthetic scenes have no split lists"):
        build_datasets(cfg, seed=0)


def test_a_smoke_dry_run_of_a_semisup_experiment_keeps_its_labelled_fraction(hydra_ctx):
    """profile=smoke swaps the data for the synthetic scenes; the experiment's split still decides what is labeled."""
    for experiment, fraction in (("semisup/u2pl_1_8", 1 / 8), ("semisup/unimatch_1_4+hl", 1 / 4)):
        cfg = compose([*run_overrides(experiment), "profile=smoke", "data.train.num_images=16",
                                           "data.val.num_images=2"]).data
        sets = build_datasets(cfg, seed=0)
        labeled = math.ceil(fraction * 16)
        assert (len(sets["train"]), len(sets["unlabeled"])) == (labeled, 16 - labeled)
        record = split_record(cfg)
        assert record["source"] == f"seeded({fraction}, 0) for {cfg.split}"
        assert (record["num_labeled"], record["num_unlabeled"]) == (labeled, 16 - labeled)
        assert set(sets["unlabeled"][0]) == {"img", "pad", "img_hw", "index"}  # no label reaches the method
    plain = compose(["profile=smoke", "data.train.num_images=16"]).data
    assert split_record(plain) is None and len(build_datasets(plain, seed=0)["train"]) == 16
    plain.split = "/my/own/lists"
    with pytest.raises(ConfigError, match="stand in only for a shipped split"):
        build_datasets(plain, seed=0)


def _flat_sample(h, w, label=3):
    img = np.full((h, w, 3), 200, np.uint8)
    return {"img": img, "label": np.full((h, w), label, np.uint8), "hard": np.full((h, w), 1, np.uint8), "index": 0}


def test_centre_and_bottom_right_pads_fill_image_label_and_the_pad_mask():
    out = PadToCrop((16, 24), "centre", [123.675, 116.28, 103.53], 0)(_flat_sample(10, 19))
    assert out["img"].shape == (16, 24, 3)
    inside = np.zeros((16, 24), bool)
    inside[3:13, 2:21] = True  # U2PL: top int(6 / 2) = 3 rows, left int(5 / 2) = 2 columns
    assert (out["img"][~inside] == [124, 116, 104]).all() and (out["img"][inside] == 200).all()
    assert (out["label"][~inside] == 0).all() and (out["hard"][~inside] == 0).all()
    unlabeled = PadToCrop((16, 24), "bottom_right", [0, 0, 0], 255)(unlabeled_sample(_flat_sample(10, 19)["img"], 0))
    assert set(unlabeled) == {"img", "pad", "index"}
    assert np.array_equal(unlabeled["pad"] == 1, unlabeled["img"].max(-1) == 0)
    assert unlabeled["pad"][:10, :19].sum() == 0 and unlabeled["pad"].sum() == 16 * 24 - 10 * 19
    large = _flat_sample(10, 19)
    assert PadToCrop((8, 8), "centre", [0, 0, 0], 255)(large) is large


def test_unimatch_pipeline_pad_mask_follows_crop_and_flip():
    pipeline = build_train_pipeline({"resize": {"mode": "long_side", "ratio_range": [0.5, 2.0]}, "crop": [40, 40],
                                     "pad": {"mode": "bottom_right", "image_fill": [0, 0, 0], "label_fill": 255},
                                     "flip": 0.5})
    padded_left = 0
    for seed in range(12):
        # Long side 48 -> 24..96, so the width (8..32) is always padded, on the right before the flip.
        out = pipeline(unlabeled_sample(np.full((48, 16, 3), 200, np.uint8), 0), np.random.default_rng(seed))
        pad = out["pad"].bool()
        assert out["img"].shape == (3, 40, 40) and torch.equal(pad, out["img"].amax(0) == 0)
        assert out["img_hw"].tolist() == [40, 40]  # nothing for the device to zero: the padding is UniMatch's black
        assert bool(pad[:, 0].all()) != bool(pad[:, -1].all())
        padded_left += bool(pad[:, 0].all())
    assert 0 < padded_left < 12  # the flip after the crop moves the padding to the left


def test_weak_resizes_follow_the_references():
    sample = _flat_sample(40, 60)
    sizes = [RandomScaleFactor([0.5, 2.0])(sample, np.random.default_rng(s))["img"].shape[:2] for s in range(40)]
    factors = [w / 60 for _, w in sizes]
    assert all(0.5 <= f <= 2.0 for f in factors) and min(factors) < 1 < max(factors)
    assert all(abs(h - w * 40 / 60) < 1 for h, w in sizes)  # one s for both sides, each truncated
    for seed in range(10):
        out = RandomLongSide([0.5, 2.0])(sample, np.random.default_rng(seed))
        h, w = out["img"].shape[:2]
        assert 30 <= w <= 120 and h == int(40 * w / 60 + 0.5) and out["label"].shape == (h, w)
    with pytest.raises(ConfigError, match="contain 1"):
        RandomScaleFactor([1.2, 2.0])


@pytest.mark.parametrize("cfg,match", [
    ({"resize": {"mode": "fit"}}, r"resize.mode='fit' is not valid"),
    ({"resize": {"mode": "factor", "scale": [8, 8], "ratio_range": [0.5, 2]}}, r"unknown keys \['scale'\]"),
    ({"pad": {"mode": "center", "image_fill": [0, 0, 0], "label_fill": 255}}, r"pad.mode='center'"),
    ({"pad": {"mode": "centre", "image_fill": [0, 0], "label_fill": 255}}, r"pad.image_fill"),
    ({"pad": {"mode": "centre", "image_fill": [0, 0, 0]}}, r"pad.label_fill is missing"),
])
def test_weak_pipeline_options_reject_bad_values(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_train_pipeline({"crop": [8, 8], **cfg})
