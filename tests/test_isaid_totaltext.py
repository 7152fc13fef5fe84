"""iSAID and Total-Text: `prepare` from the raw downloads' layouts (hand-made and mocked), `check`, and the data sets
their configs build."""
import io
import os
import zipfile

import cv2
import numpy as np
import pytest
from PIL import Image

from hlbench.compose import compose
from hlbench.data import build_datasets
from hlbench.data.__main__ import main
from hlbench.data.isaid import PALETTE, window_starts
from hlbench.data.prepare import check_dataset, prepare_labels
from hlbench.data.totaltext import binarise
from hlbench.errors import BadFileError, MissingInputError

rng = np.random.default_rng(0)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path, members: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in members.items():
            archive.writestr(name, _png(array))


def _scene(h: int, w: int) -> np.ndarray:
    """RGB whose pixels name their position, so a patch cut at the wrong offset cannot match."""
    y, x = np.indices((h, w))
    return np.stack([y % 256, x % 256, 16 * (y // 256) + x // 256], axis=-1).astype(np.uint8)


def _ids(h: int, w: int) -> np.ndarray:
    return np.repeat(np.repeat(rng.integers(0, 16, (h // 50 + 1, w // 50 + 1)), 50, 0), 50, 1)[:h, :w].astype(np.uint8)


def _isaid_raw(root, scenes: dict, masks: dict, tests: dict):
    """The raw download: {split}/images/part1.zip of DOTA scenes, {split}/Semantic_masks/images.zip of colour masks."""
    for split in ("train", "val"):
        _zip(root / split / "images" / "part1.zip", {f"images/{k}.png": v for k, v in scenes[split].items()})
        _zip(root / split / "Semantic_masks" / "images.zip",
             {f"images/{k}_instance_color_RGB.png": np.asarray(PALETTE, np.uint8)[v] for k, v in masks[split].items()})
    _zip(root / "test" / "images" / "part1.zip", {f"images/{k}.png": v for k, v in tests.items()})
    return root


def _read_rgb(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]


def test_windows_are_the_converters_every_512_px_with_the_last_shifted_back_to_the_edge():
    assert window_starts(896) == [0]
    assert window_starts(1000) == [0, 104]
    assert window_starts(1400) == [0, 504]  # the windows at 512 and 1024 both shift to 504: one patch
    assert window_starts(1408) == [0, 512]
    assert window_starts(2048) == [0, 512, 1024, 1152]


def test_prepare_isaid_cuts_pads_maps_colours_and_moves_test_scenes(tmp_path):
    big, ids_big = _scene(1000, 1500), _ids(1000, 1500)
    mask_big = np.asarray(PALETTE, np.uint8)[ids_big]
    mask_big[:60, :90] = (1, 2, 3)  # a colour of no class: background
    ids_big[:60, :90] = 0
    small, ids_small = _scene(500, 700)[..., 0], _ids(500, 700)  # a grayscale scene smaller than a patch
    ids_small[0, 0] = 15
    test = _scene(600, 640)
    root = _isaid_raw(tmp_path / "iSAID", {"train": {"P0001": big, "P0002": small}, "val": {"P0003": big}},
                      {"train": {"P0002": ids_small}, "val": {"P0003": ids_big}}, {"P0004": test})
    with zipfile.ZipFile(root / "train" / "Semantic_masks" / "images.zip", "a") as archive:
        archive.writestr("images/P0001_instance_color_RGB.png", _png(mask_big))
    assert prepare_labels("isaid", root, workers=2) == (6 + 1 + 6 + 1, 0)

    img_dir, ann_dir = root / "img_dir", root / "ann_dir"
    assert sorted(p.name for p in (img_dir / "train").iterdir()) == sorted(
        [f"P0001_{y}_{y + 896}_{x}_{x + 896}.png" for y in (0, 104) for x in (0, 512, 604)] + ["P0002_0_896_0_896.png"])
    assert np.array_equal(_read_rgb(img_dir / "train" / "P0001_104_1000_604_1500.png"), big[104:, 604:])
    label = ann_dir / "train" / "P0001_104_1000_604_1500_instance_color_RGB.png"
    assert np.array_equal(cv2.imread(str(label), cv2.IMREAD_UNCHANGED), ids_big[104:, 604:])
    assert np.array_equal(cv2.imread(str(ann_dir / "train" / "P0001_0_896_0_896_instance_color_RGB.png"),
                                     cv2.IMREAD_UNCHANGED)[:60, :90], np.zeros((60, 90), np.uint8))
    # Short sides padded at the bottom/right: image 0, label 255; grayscale read as R=G=B; 8-bit ids kept.
    padded = _read_rgb(img_dir / "train" / "P0002_0_896_0_896.png")
    assert np.array_equal(padded[:500, :700], np.repeat(small[..., None], 3, 2))
    assert not padded[500:].any() and not padded[:, 700:].any()
    with Image.open(ann_dir / "train" / "P0002_0_896_0_896_instance_color_RGB.png") as im:
        assert im.mode == "L"
        ids = np.asarray(im)
    assert np.array_equal(ids[:500, :700], ids_small) and ids[0, 0] == 15
    assert (ids[500:] == 255).all() and (ids[:, 700:] == 255).all()
    with zipfile.ZipFile(root / "test" / "images" / "part1.zip") as archive:
        assert (img_dir / "test" / "P0004.png").read_bytes() == archive.read("images/P0004.png")
    assert not (ann_dir / "test").exists()

    # Resumable: only the missing patch is written again, the others are left as they are.
    kept = img_dir / "train" / "P0001_0_896_0_896.png"
    before = kept.stat().st_mtime_ns
    (ann_dir / "val" / "P0003_0_896_512_1408_instance_color_RGB.png").unlink()
    assert prepare_labels("isaid", root, workers=1) == (1, 13)
    assert kept.stat().st_mtime_ns == before
    assert check_dataset("isaid", root)[:2] == ({"train": 7, "val": 6}, [])


def test_prepare_isaid_refuses_a_scene_without_mask_before_writing(tmp_path):
    root = _isaid_raw(tmp_path / "iSAID", {"train": {"P0001": _scene(900, 900)}, "val": {"P0002": _scene(900, 900)}},
                      {"train": {}, "val": {"P0002": _ids(900, 900)}}, {})
    with pytest.raises(MissingInputError, match="scene P0001 has no mask"):
        prepare_labels("isaid", root)
    assert not (root / "img_dir").exists()
    with pytest.raises(MissingInputError, match=r"no \*\.zip in .*elsewhere/train/images: expected the DOTA"):
        prepare_labels("isaid", tmp_path / "elsewhere")


def test_check_names_a_one_bit_label_from_mmsegs_converter(tmp_path):
    root = tmp_path / "iSAID"
    for folder in ("img_dir/val", "ann_dir/val", "img_dir/train", "ann_dir/train"):
        (root / folder).mkdir(parents=True)
    cv2.imwrite(str(root / "img_dir/val/P0001_0_896_0_896.png"), np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(np.full((8, 8), 9, np.uint8)).convert("1").save(root / "ann_dir/val/P0001_0_896_0_896"
                                                                         "_instance_color_RGB.png")
    _, errors, _ = check_dataset("isaid", root)
    assert len(errors) == 1 and "1-bit PNG" in errors[0] and "P0001_0_896_0_896_instance_color_RGB.png" in errors[0]


def test_mock_isaid_prepares_checks_and_loads_as_the_config_says(hydra_ctx, tmp_path):
    root = tmp_path / "iSAID"
    assert main(["mock", "isaid", "--root", str(root), "--n", "2", "--size", "300", "1000"]) == 0
    assert main(["prepare", "isaid", "--root", str(root), "--workers", "2"]) == 0
    counts, errors, warnings = check_dataset("isaid", root)
    assert counts == {"train": 4, "val": 4} and errors == [] and "33978" in warnings[0]
    assert len(list((root / "img_dir" / "test").glob("*.png"))) == 2
    cfg = compose(["data=isaid", f"data.root={root}"])
    sets = build_datasets(cfg.data, seed=0)
    assert len(sets["train"].classes) == 16 and sets["train"].classes[0] == "background"
    train, val = sets["train"][0], sets["val"][0]
    assert tuple(train["img"].shape) == (3, 896, 896) and tuple(val["label"].shape) == (896, 896)
    assert set(val["label"].unique().tolist()) <= set(range(16)) | {255} and (val["label"][300:] == 255).all()


def test_binarise_survives_jpeg_noise_colour_and_zero_one_masks():
    strokes = np.zeros((64, 96), np.uint8)
    cv2.line(strokes, (5, 5), (90, 50), 255, 3, cv2.LINE_8)
    cv2.circle(strokes, (30, 40), 15, 255, 2, cv2.LINE_8)
    buf = io.BytesIO()
    Image.fromarray(strokes).save(buf, format="JPEG", quality=50)
    noisy = Image.open(buf)
    values = np.asarray(noisy)
    # The noise is there: "any non-zero" or "exactly 255" would get strokes wrong.
    assert (values > 0).sum() > 1.1 * (strokes > 0).sum() and (values == 255).sum() < 0.9 * (strokes > 0).sum()
    assert np.array_equal(binarise(noisy), (strokes > 0).astype(np.uint8))
    red = np.zeros((64, 96, 3), np.uint8)
    red[strokes > 0] = (255, 0, 0)
    assert np.array_equal(binarise(Image.fromarray(red)), (strokes > 0).astype(np.uint8))
    assert np.array_equal(binarise(Image.fromarray((strokes > 0).astype(np.uint8))), (strokes > 0).astype(np.uint8))


def test_mock_totaltext_prepares_checks_and_loads_as_the_config_says(hydra_ctx, tmp_path):
    root = tmp_path / "totaltext_char"
    assert main(["mock", "totaltext", "--root", str(root), "--n", "2", "--size", "96", "128"]) == 0
    assert (root / "groundtruth_pixel" / "Train" / "img2.JPG").is_file()  # the release's img61.JPG case
    assert prepare_labels("totaltext", root) == (4, 0)
    assert prepare_labels("totaltext", root) == (0, 4)
    assert sorted(p.name for p in (root / "annotations" / "Train").iterdir()) == ["img1.png", "img2.png"]
    image, raw = root / "images" / "Train" / "img2.jpg", root / "Images" / "Train" / "img2.jpg"
    assert image.read_bytes() == raw.read_bytes() and os.stat(image).st_ino == os.stat(raw).st_ino
    counts, errors, _ = check_dataset("totaltext", root)
    assert counts == {"train": 2, "val": 2} and errors == []
    cfg = compose(["data=totaltext", f"data.root={root}"])
    sets = build_datasets(cfg.data, seed=0)
    assert sets["val"].classes == ["Backgroud", "Character"] and cfg.data.metric == "fgIoU"
    train, val = sets["train"][0], sets["val"][0]
    assert tuple(train["img"].shape) == (3, 512, 512) and tuple(val["label"].shape) == (96, 128)
    assert set(val["label"].unique().tolist()) == {0, 1}
    # Whole-image test at the keep-ratio (2048, 512) scale: short side 512.
    assert tuple(val["img"].shape) == (3, 512, 683)


def test_prepare_totaltext_refuses_a_missing_mask_and_a_mask_of_another_size(tmp_path):
    root = tmp_path / "tt"
    assert main(["mock", "totaltext", "--root", str(root), "--n", "1", "--size", "64", "64"]) == 0
    mask = root / "groundtruth_pixel" / "Test" / "img2001.jpg"
    mask.unlink()
    with pytest.raises(MissingInputError, match="1 images in .*Test have no mask.*img2001.jpg"):
        prepare_labels("totaltext", root)
    assert not (root / "annotations").exists()
    cv2.imwrite(str(mask), np.zeros((32, 64), np.uint8))
    with pytest.raises(BadFileError, match="is 64x64 but its mask .*img2001.jpg is 32x64"):
        prepare_labels("totaltext", root, workers=1)
    assert not (root / "annotations" / "Test" / "img2001.png").exists()
