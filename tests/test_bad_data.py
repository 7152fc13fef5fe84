"""Bad input files: each kind made on a Cityscapes fixture in its real layout, read through the real data sets.

data.on_bad_sample=error (the default) gives one line naming the file; =skip leaves the sample out of training and
evaluation and counts it in summary.json. Images that are usable after a documented conversion (grayscale, an
alpha channel) are read with a warning.
"""
import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from hlbench.data import Cityscapes, build_datasets
from hlbench.data.bad_samples import BadSampleError, bad_sample_log
from hlbench.data.files import read_image
from hlbench.data.sampling import stream_loader
from hlbench.run import run
from tests.conftest import compose_run
from tests.test_datasets import H, W, make_cityscapes
from tests.test_real_layout_runs import SHRINK
from tests.test_splits import _cityscapes_cfg, _write_folder

REPO = Path(__file__).resolve().parents[1]


def _first(root, split="train"):
    """(image, labelIds) of the split's first sample (aachen_000000 for train)."""
    image = sorted((root / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))[0]
    label = root / "gtFine" / split / image.parent.name / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
    return image, label


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write(path, array):
    assert cv2.imwrite(str(path), array)


rng = np.random.default_rng(0)
COLOUR = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)

# name: (which file, how it is broken, the reason the one-line error gives; None: read with a warning)
BAD_FILES = {
    "corrupt image": ("image", lambda p: p.write_bytes(b"\x00garbage" * 50), "not a readable image"),
    "empty image": ("image", lambda p: p.write_bytes(b""), "not a readable image"),
    "truncated image": ("image", _truncate, "truncated: the file ends before its end marker"),
    "16-bit colour image": ("image", lambda p: _write(p, COLOUR.astype(np.uint16) * 257), "16-bit image"),
    "16-bit grayscale image": ("image", lambda p: _write(p, COLOUR[..., 0].astype(np.uint16) * 257),
                               r"16-bit image \(mode I;16"),
    "grayscale image": ("image", lambda p: _write(p, COLOUR[..., 0]), None),
    "RGBA image": ("image", lambda p: _write(p, np.dstack([COLOUR, COLOUR[..., :1]])), None),
    "image deleted after listing": ("image", lambda p: p.unlink(), "file not found"),
    "label id outside the table": ("label", lambda p: _write(p, np.full((H, W), 40, np.uint8)),
                                   r"raw values \[40\] are outside the label table 0..33 and 255"),
    "3-channel label": ("label", lambda p: _write(p, COLOUR), "a label must be a single-channel 8-bit PNG"),
    "16-bit label": ("label", lambda p: _write(p, np.full((H, W), 7, np.uint16)),
                     "a label must be a single-channel 8-bit PNG, got shape .* uint16"),
    "truncated label": ("label", _truncate, "truncated"),
    "label of another size": ("label", lambda p: _write(p, np.full((H // 2, W // 2), 7, np.uint8)),
                              rf"image is {H}x{W} but its label .* is {H // 2}x{W // 2}"),
    "label deleted after listing": ("label", lambda p: p.unlink(), "file not found"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_each_bad_file_is_named_in_one_line_or_read_with_a_warning(tmp_path, caplog, case):
    which, damage, reason = BAD_FILES[case]
    root = make_cityscapes(tmp_path / "cs")
    dataset = Cityscapes(root, "train")
    image, label = _first(root)
    damage(image if which == "image" else label)
    if reason is None:
        with caplog.at_level(logging.WARNING, logger="hlbench"):
            item = dataset[0]
        assert item["img"].shape == (3, H, W)
        assert ("R=G=B" if case == "grayscale image" else "alpha channel") in caplog.text
        return
    with pytest.raises(BadSampleError, match=reason) as err:
        dataset[0]
    message = str(err.value)
    named = label if which == "label" and case != "label of another size" else image
    assert "\n" not in message and message.startswith(f"{named}: ")


def test_a_truncated_jpeg_is_refused_though_opencv_would_decode_it(tmp_path):
    path = tmp_path / "ADE_val_00000001.jpg"
    _write(path, COLOUR)
    _truncate(path)
    with pytest.raises(BadSampleError, match="truncated"):
        read_image(path)


BROKEN = {"train": ["corrupt image", "label id outside the table", "label of another size"],
          "val": ["truncated image"]}


def _break(root):
    """Break the first sample of the train split in three ways (three files) and one val image."""
    damaged = []
    for split, cases in BROKEN.items():
        images = sorted((root / "leftImg8bit" / split).rglob("*_leftImg8bit.png"))
        for image, case in zip(images, cases):
            which, damage, _ = BAD_FILES[case]
            label = root / "gtFine" / split / image.parent.name / image.name.replace("_leftImg8bit",
                                                                                      "_gtFine_labelIds")
            target = image if which == "image" else label
            damage(target)
            damaged.append(str(image if "another size" in case else target))
    return damaged


@pytest.mark.slow
def test_skip_mode_trains_evaluates_and_counts_the_bad_files(hydra_ctx, tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    damaged = _break(root)
    over = ["experiment=fullsup/pspnet_r101", f"data.root={root}", *SHRINK, "model.aux.channels=16",
            "data.protocol.crop=[32,32]", "data.protocol.stride=[24,24]", "train.iters=4", "data.on_bad_sample=skip"]
    (summary,) = run(*compose_run(over, tmp_path / "out"))
    report = summary["bad_samples"]
    assert report["mode"] == "skip" and report["skipped"] == 4
    assert report["per_split"] == {"train": 3, "val": 1}
    assert sorted(f["file"] for f in report["files"]) == sorted(damaged)
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["bad_samples"] == report
    # Three of the four val images are scored.
    assert summary["final"]["mIoU"] >= 0


@pytest.mark.slow
def test_error_mode_stops_through_the_cli_in_one_line_naming_the_file(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    image, _ = _first(root)
    BAD_FILES["corrupt image"][1](image)
    over = ["experiment=fullsup/pspnet_r101", f"data.root={root}", f"out_dir={tmp_path / 'out'}", *SHRINK,
            "model.aux.channels=16", "train.num_workers=1"]
    done = subprocess.run([sys.executable, "-m", "hlbench.run", *over], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled"})
    assert done.returncode == 2, done.stderr[-2000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line == f"error: {image}: not a readable image (corrupt file or unknown format)"
    assert "Traceback" not in done.stderr


def test_missing_split_entries_stop_at_start_or_are_skipped_and_counted(hydra_ctx, tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    train = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit" / "train").rglob("*.png"))
    ghost = "leftImg8bit/train/bonn/bonn_000009_000019_leftImg8bit.png"
    folder = _write_folder(tmp_path / "split", train[:1] + [ghost], train[1:])
    with pytest.raises(FileNotFoundError, match="2 of the 7 listed files are missing"):
        build_datasets(_cityscapes_cfg(root, f"data.split={folder}"), seed=0)
    sets = build_datasets(_cityscapes_cfg(root, f"data.split={folder}", "data.on_bad_sample=skip"), seed=0)
    assert len(sets["train"]) == 2  # still listed: drawing it draws the other sample instead, and counts it
    stream = iter(stream_loader(sets["train"], 1, seed=0, rank=0, world=1))
    drawn = [next(stream)["index"].item() for _ in range(4)]
    assert drawn == [0] * 4
    assert bad_sample_log(sets["train"]).files == {str(root / ghost): "file not found"}
