"""Real-data-set loaders, label conversion, layout checks and data configs on tiny on-disk fixtures."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from hlbench.compose import compose
from hlbench.data import ADE20K, GTA5, Cityscapes, build_datasets
from hlbench.data.__main__ import main
from hlbench.data.cityscapes import CLASSES, ID_TO_TRAIN_ID
from hlbench.data.mock import LABEL_ID_LUT
from hlbench.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from hlbench.data.prepare import check_dataset, prepare_labels
from hlbench.data.protocol import ITEM_KEYS, SegmentationData

H, W = 32, 64
# Cityscapes ids covering mapped classes and ignored ids (0 unlabeled, 9 parking, 34 is outside the table).
IDS = np.array([0, 7, 8, 9, 11, 17, 19, 20, 24, 26, 33], np.uint8)


def _scene(seed: int, values=IDS):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    ids = np.repeat(rng.choice(values, (H // 8, W // 8)), 8, 0).repeat(8, 1).astype(np.uint8)
    return img, ids


def make_cityscapes(root, train_ids: bool = False):
    """2 cities x 2 images per split, labelIds PNGs (and trainIds when asked)."""
    for s, (split, cities) in enumerate((("train", ("aachen", "bonn")), ("val", ("lindau", "munster")))):
        for c, city in enumerate(cities):
            for i in range(2):
                stem = f"{city}_{i:06d}_000019"
                img, ids = _scene(10 * s + 2 * c + i)
                (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
                (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"), img[..., ::-1])
                cv2.imwrite(str(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"), ids)
                if train_ids:
                    cv2.imwrite(str(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"),
                                ID_TO_TRAIN_ID[ids])
    return root


def make_gta(root, n: int = 3):
    """GTA5 images with palette ("P") labels whose indices are Cityscapes ids."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(1, n + 1):
        img, ids = _scene(100 + i)
        cv2.imwrite(str(root / "images" / f"{i:05d}.png"), img[..., ::-1])
        label = Image.fromarray(ids, "P")
        label.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
        label.save(root / "labels" / f"{i:05d}.png")
    return root


def make_ade(root):
    for split, prefix in (("training", "train"), ("validation", "val")):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            img, ann = _scene(200 + i, np.array([0, 1, 2, 150], np.uint8))
            cv2.imwrite(str(root / "images" / split / f"ADE_{prefix}_{i:08d}.jpg"), img)
            cv2.imwrite(str(root / "annotations" / split / f"ADE_{prefix}_{i:08d}.png"), ann)
    return root


def test_cityscapes_items_and_label_ids_match_train_ids(tmp_path):
    raw = Cityscapes(make_cityscapes(tmp_path / "raw"), "train")
    conv = Cityscapes(make_cityscapes(tmp_path / "conv", train_ids=True), "val")
    assert len(raw) == 4 and len(raw.classes) == 19 and raw.palette[0] == (128, 64, 128)
    item = raw[0]
    assert item["img"].dtype == torch.uint8 and item["img"].shape == (3, H, W)
    assert item["label"].dtype == torch.int64 and item["hard"].shape == (H, W) and not item["hard"].any()
    assert set(item["label"].unique().tolist()) <= set(range(19)) | {255}
    assert conv.pairs[0][1].name.endswith("_labelTrainIds.png") and raw.pairs[0][1].name.endswith("_labelIds.png")
    # The same scene read through labelIds + LUT and through the trainIds file gives the same labels.
    ids_val = Cityscapes(tmp_path / "raw", "val")
    for i in range(len(conv)):
        assert torch.equal(conv[i]["label"], ids_val[i]["label"])
        assert torch.equal(conv[i]["img"], ids_val[i]["img"])
    # Spot values of the official table: road 7 -> 0, bicycle 33 -> 18, parking 9 -> 255.
    assert ID_TO_TRAIN_ID[[7, 33, 9, 0]].tolist() == [0, 18, 255, 255]


def test_gta5_palette_indices_are_cityscapes_ids(tmp_path):
    root = make_gta(tmp_path / "gta")
    data = GTA5(root)
    _, ids = _scene(101)
    assert torch.equal(data[0]["label"], torch.from_numpy(ID_TO_TRAIN_ID[ids].astype(np.int64)))
    (root / "images" / "00009.png").write_bytes((root / "images" / "00001.png").read_bytes())
    assert len(GTA5(root)) == 3 and [p.name for p in GTA5(root).unlabelled] == ["00009.png"]


def test_ade20k_reduce_zero_label(tmp_path):
    data = ADE20K(make_ade(tmp_path / "ade"), "val")
    assert len(data.classes) == 150 and data.classes[7] == "bed " and len(set(data.palette)) == 150
    _, ann = _scene(200, np.array([0, 1, 2, 150], np.uint8))
    label = data[0]["label"].numpy()
    assert (label[ann == 0] == 255).all() and (label[ann == 1] == 0).all() and (label[ann == 150] == 149).all()
    assert data[0]["img"].shape == (3, H, W)


def test_missing_label_and_folder_errors_name_the_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    victim = next((root / "gtFine" / "train" / "aachen").glob("*_labelIds.png"))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="aachen_000000_000019_leftImg8bit.png has no label"):
        Cityscapes(root, "train")
    (root / "gtFine" / "val").rename(root / "gtFine" / "moved")
    with pytest.raises(FileNotFoundError, match="missing folder .*gtFine/val"):
        Cityscapes(root, "val")


@pytest.mark.parametrize("name,make", [("cityscapes", make_cityscapes), ("gta5", make_gta)])
def test_prepare_writes_train_ids_and_is_resumable(tmp_path, name, make):
    root = make(tmp_path / name)
    assert prepare_labels(name, root, workers=2) == ((8, 0) if name == "cityscapes" else (3, 0))
    outputs = sorted(root.rglob("*_labelTrainIds.png"))
    first = outputs[0].read_bytes()
    outputs[0].unlink()
    assert prepare_labels(name, root, workers=1) == ((1, 7) if name == "cityscapes" else (1, 2))
    assert outputs[0].read_bytes() == first and not list(root.rglob(".*tmp*"))
    assert prepare_labels(name, root)[0] == 0
    # The prepared trainIds files now take precedence and give the same labels as the raw LUT path.
    data = Cityscapes(root, "train") if name == "cityscapes" else GTA5(root)
    assert data.pairs[0][2] is None
    _, ids = _scene(0) if name == "cityscapes" else _scene(101)
    assert np.array_equal(data.load_label(0), ID_TO_TRAIN_ID[ids])


def test_check_reports_counts_and_errors_naming_files(tmp_path, capsys):
    root = make_cityscapes(tmp_path / "cs", train_ids=True)
    counts, errors, warnings = check_dataset("cityscapes", root)
    assert counts == {"train": 4, "val": 4} and errors == []
    assert any("2975" in w for w in warnings) and any("500" in w for w in warnings)
    labels = sorted((root / "gtFine" / "train").rglob("*_labelTrainIds.png"))
    cv2.imwrite(str(labels[0]), np.full((H, W), 26, np.uint8))       # raw labelIds copied as trainIds
    cv2.imwrite(str(labels[1]), np.full((H, W), 40, np.uint8))       # outside the classes
    cv2.imwrite(str(labels[2]), np.zeros((H + 1, W), np.uint8))       # size mismatch
    _, errors, _ = check_dataset("cityscapes", root, workers=2)
    assert len(errors) == 3
    assert f"{labels[0]}: values [26] look like raw labelIds" in errors[0]
    assert f"{labels[1]}: values [40] are outside" in errors[1]
    assert "is 32x64 but its label" in errors[2] and str(labels[2]) in errors[2]
    assert main(["check", "cityscapes", "--root", str(root)]) == 2
    out = capsys.readouterr().out
    assert out.count("error: ") == 3 and "train: 4 image/label pairs" in out


def test_check_decodes_every_image_and_names_each_bad_one_quick_mode_reads_headers(tmp_path, capsys):
    root = make_cityscapes(tmp_path / "cs", train_ids=True)
    images = sorted((root / "leftImg8bit").rglob("*.png"))
    truncated, corrupt = images[0], images[-1]
    truncated.write_bytes(truncated.read_bytes()[:-40])  # a copy that stopped before the end: the header reads
    data = bytearray(corrupt.read_bytes())
    data[-200:-20] = bytes(180)  # pixel data overwritten, markers intact
    corrupt.write_bytes(bytes(data))
    _, errors, _ = check_dataset("cityscapes", root, workers=2)
    assert len(errors) == 2 and errors[0].startswith(f"{truncated}: truncated") and str(corrupt) in errors[1]
    assert check_dataset("cityscapes", root, decode=False)[1] == []  # explicitly skipped
    assert main(["check", "cityscapes", "--root", str(root), "--quick"]) == 0
    assert main(["check", "cityscapes", "--root", str(root)]) == 2
    assert capsys.readouterr().out.count("error: ") == 2


def test_check_gta_and_ade(tmp_path):
    gta = make_gta(tmp_path / "gta")
    (gta / "images" / "00009.png").write_bytes((gta / "images" / "00001.png").read_bytes())
    counts, errors, warnings = check_dataset("gta5", gta)
    assert counts == {"all": 3} and errors == []
    assert any("00009.png: image without label" in w for w in warnings) and any("24966" in w for w in warnings)
    ade = make_ade(tmp_path / "ade")
    bad = ade / "annotations" / "validation" / "ADE_val_00000001.png"
    cv2.imwrite(str(bad), np.full((H, W), 151, np.uint8))
    counts, errors, _ = check_dataset("ade20k", ade)
    assert counts == {"train": 2, "val": 2} and errors == [f"{bad}: raw values [151] are outside 0..150 and 255"]
    _, errors, _ = check_dataset("ade20k", tmp_path / "none")
    assert errors and all("missing folder" in e for e in errors)


@pytest.mark.parametrize("config,name", [("cityscapes_769", "cityscapes"), ("cityscapes_512x1024", "cityscapes"),
                                         ("gta5_to_cityscapes", "gta5_to_cityscapes"), ("ade20k_512", "ade20k")])
def test_data_configs_build_datasets(hydra_ctx, tmp_path, config, name):
    cs = make_cityscapes(tmp_path / "cs", train_ids=True)
    roots = {"cityscapes": [f"data.root={cs}"], "ade20k": [f"data.root={make_ade(tmp_path / 'ade')}"],
             "gta5_to_cityscapes": [f"data.root={make_gta(tmp_path / 'gta')}", f"data.cityscapes_root={cs}"]}
    cfg = compose([f"data={config}"] + roots[name])
    assert cfg.data.name == name
    sets = build_datasets(cfg.data, seed=0)
    train, val = sets["train"][0], sets["val"][0]
    crop = list(cfg.data.train_pipeline.crop)
    assert list(train["img"].shape) == [3] + crop and list(train["label"].shape) == crop
    assert all(v <= c for v, c in zip(train["img_hw"].tolist(), crop)) and val["label"].shape == (H, W)
    assert len(sets["train"].classes) == cfg.data.num_classes
    for split in ("train", "val"):  # the contract the loop, evaluator and tracker rely on
        assert isinstance(sets[split], SegmentationData) and sets[split].hard_bits == {}
        assert len(sets[split].palette) == len(sets[split].classes)
        assert set(ITEM_KEYS) <= set(sets[split][0])


def test_synthetic_data_meets_the_data_set_contract_with_its_hardness_bits(hydra_ctx):
    cfg = compose(["data=synthetic", "data.train.num_images=2", "data.val.num_images=2",
                                       "data.pregenerate=false"])
    sets = build_datasets(cfg.data, seed=0)
    for split in ("train", "val"):
        assert isinstance(sets[split], SegmentationData) and set(ITEM_KEYS) <= set(sets[split][0])
        assert sets[split].hard_bits and len(sets[split].palette) == len(sets[split].classes)


def test_bench_runs_on_fixture(tmp_path, capsys):
    root = make_cityscapes(tmp_path / "cs")
    assert main(["bench", "cityscapes", "--root", str(root), "--n", "3", "--config", "cityscapes_512x1024"]) == 0
    assert "train items/s per core" in capsys.readouterr().out


def test_check_warns_when_train_and_val_are_mapped_differently(tmp_path):
    root = make_cityscapes(tmp_path / "cs", train_ids=True)
    _, _, warnings = check_dataset("cityscapes", root)
    assert not any("mapped differently" in w for w in warnings)
    for path in (root / "gtFine" / "val").rglob("*_labelTrainIds.png"):  # only train was prepared
        path.unlink()
    _, errors, warnings = check_dataset("cityscapes", root)
    (line,) = [w for w in warnings if "mapped differently" in w]
    assert "train: trainId files" in line and "val: raw ids mapped on load" in line and errors == []


@pytest.mark.parametrize("name,load", [("cityscapes", lambda root: Cityscapes(root, "val")),
                                       ("gta5", lambda root: GTA5(root))])
def test_mock_layouts_pass_check_and_load_as_train_ids(tmp_path, name, load):
    root = tmp_path / name
    assert main(["mock", name, "--root", str(root), "--n", "2", "--size", "48", "96"]) == 0
    counts, errors, _ = check_dataset(name, root)
    assert errors == [] and all(c == 2 for c in counts.values())
    label = load(root)[0]["label"]
    assert label.shape == (48, 96)
    # Raw ids were mapped: only train ids of classes the scenes draw, plus ignore (wires are "unlabeled").
    drawn = set(ID_TO_TRAIN_ID[LABEL_ID_LUT[: len(SYNTHETIC_CLASSES)]].tolist())
    values = set(label.unique().tolist())
    assert 255 in drawn and values <= drawn and {CLASSES.index("road"), CLASSES.index("sky")} <= values
    prepare_labels(name, root)
    assert check_dataset(name, root)[1] == []


def test_mock_refuses_a_folder_with_files(tmp_path, capsys):
    (tmp_path / "cs").mkdir()
    (tmp_path / "cs" / "keep.txt").write_text("real data")
    assert main(["mock", "cityscapes", "--root", str(tmp_path / "cs"), "--n", "1"]) == 2
    assert "is not empty" in capsys.readouterr().err and (tmp_path / "cs" / "keep.txt").read_text() == "real data"
