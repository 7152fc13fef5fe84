"""`python -m hlbench.predict run=<run folder or checkpoint> images=<folder or glob> out=<folder>`: segment your own
images with a trained run.

The model, normalisation, test pipeline and protocol (whole image or sliding windows) are the run's, from its saved
config.yaml; the weights its best (else newest) checkpoint, or the checkpoint named. For each image <stem> it writes
<stem>_labels.png (train ids, the data set's classes), <stem>_overlay.png (class colours over the image) and, for a
model with an HL branch, <stem>_hl.png (the HL map, brighter = harder). `device=cpu|cuda|auto` picks the device.
"""
from __future__ import annotations

import glob
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import ConfigError, MissingInputError, exit_status

log = logging.getLogger("hlbench")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ARGUMENTS = {"run": None, "images": None, "out": None, "device": "auto"}  # None: required
OVERLAY_ALPHA = 0.5  # weight of the class colours over the image


def image_files(spec: str) -> list[Path]:
    """The images of a folder (sorted), or the files a glob pattern matches; a MissingInputError when none."""
    folder = Path(spec)
    files = (sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir()
             else sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file()))
    if not files:
        raise MissingInputError(f"images={spec}: no image files there (a folder of {', '.join(IMAGE_SUFFIXES)} files, "
                                f"or a glob such as 'photos/*.jpg')")
    return files


def class_table(data_name: str) -> tuple[tuple, tuple]:
    """(class names, palette) of the data set a run was trained on, without opening it."""
    from .data import ade20k, cityscapes, synthetic

    tables = {"synthetic": synthetic, "synthetic_semisup": synthetic, "cityscapes": cityscapes,
              "cityscapes_semisup": cityscapes, "gta5_to_cityscapes": cityscapes, "ade20k": ade20k}
    if data_name not in tables:
        raise ConfigError(f"data.name={data_name!r} in the run's config.yaml is not a known data set; expected one of "
                          f"{', '.join(tables)}")
    return tables[data_name].CLASSES, tables[data_name].PALETTE


@torch.no_grad()
def predict(run, images: str, out, device: str = "auto") -> list[Path]:
    """Write the label, overlay and HL-map PNGs of every image `images` names into `out`; returns the files written."""
    from .data import build_test_pipeline, normalize_batch
    from .data.files import read_image, write_png_atomic
    from .engine.distributed import init_distributed
    from .eval import saved_run
    from .hardness import hardness_map
    from .models import trained_model
    from .models.heads import resize
    from .tracking.hl_maps import colorize_hl, colorize_labels

    cfg, checkpoint, _ = saved_run(run)
    files = image_files(images)
    dev = init_distributed(device).device
    classes, palette = class_table(cfg.data.name)
    model, _ = trained_model(cfg, checkpoint, len(classes))
    model.to(dev).eval()
    pipeline = build_test_pipeline(cfg.data.get("test_pipeline"))
    # The centre crop is a validation shortcut; a whole image is what a user asks about.
    mode = "whole" if cfg.eval.mode == "center" else cfg.eval.mode
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(files, desc="predict", unit="image", delay=5):
        rgb = read_image(path)
        img = normalize_batch(pipeline({"img": rgb}, None)["img"][None].to(dev), cfg.data.mean, cfg.data.std)
        logits = model.predict(img, mode=mode, crop=cfg.eval.crop, stride=cfg.eval.stride,
                               window_batch=cfg.eval.window_batch)
        labels = resize(logits.float(), rgb.shape[:2], model.align_corners).argmax(1)[0].cpu().numpy()
        colours = colorize_labels(labels, palette)
        overlay = (OVERLAY_ALPHA * colours + (1 - OVERLAY_ALPHA) * rgb).round().astype(np.uint8)
        outputs = {"labels": labels.astype(np.uint8), "overlay": overlay[..., ::-1]}  # OpenCV writes BGR
        if getattr(model, "hl_head", None) is not None:
            hl = hardness_map(resize(model.predict_hl(img).float(), rgb.shape[:2], model.align_corners), cfg.hl.offset)
            outputs["hl"] = colorize_hl(hl[0].cpu())[..., ::-1]
        for kind, array in outputs.items():
            written.append(out / f"{path.stem}_{kind}.png")
            write_png_atomic(written[-1], np.ascontiguousarray(array))
    log.info("wrote %d file(s) for %d image(s) to %s (weights: %s)", len(written), len(files), out, checkpoint)
    return written


def parse_arguments(argv: list[str]) -> dict:
    """key=value arguments (ARGUMENTS); a ConfigError naming an unknown, repeated or missing one."""
    given = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ARGUMENTS or key in given:
            raise ConfigError(f"{arg}: expected each of {', '.join(f'{k}=...' for k in ARGUMENTS)} at most once")
        given[key] = value
    if missing := [k for k, default in ARGUMENTS.items() if default is None and k not in given]:
        raise ConfigError(f"{', '.join(f'{k}=' for k in missing)} missing: python -m hlbench.predict run=<run folder "
                          f"or checkpoint> images=<folder or glob> out=<folder>")
    return {**ARGUMENTS, **given}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from .engine.cores import set_intra_op_threads

    set_intra_op_threads()
    return exit_status(lambda: predict(**parse_arguments(args)))


if __name__ == "__main__":
    sys.exit(main())
