"""Dataset preparation and validation behind `python -m hlbench.data prepare|check`."""
from __future__ import annotations

from multiprocessing import Pool
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hlbench.data import ade20k, cityscapes, gta5, isaid, totaltext
from hlbench.data.bad_samples import BadSampleError
from hlbench.data.files import IGNORE_INDEX, image_size, read_image, read_label, read_palette_indices, require_dir, \
    write_png_atomic
from hlbench.errors import ConfigError

# Raw Cityscapes label ids run 0..33; a "trainIds" file holding 19..33 is almost surely a copied labelIds file.
MAX_CITYSCAPES_ID = 33


def _label_jobs(name: str, root: Path) -> list[tuple[Path, Path, bool]]:
    """[(raw label, trainId output, is a palette PNG)] for every raw label under root."""
    if name == "cityscapes":
        raws = sorted(require_dir(root / "gtFine").glob(f"*/*/*{cityscapes.LABEL_ID_SUFFIX}"))
        return [(raw, raw.with_name(raw.name.replace(cityscapes.LABEL_ID_SUFFIX, cityscapes.TRAIN_ID_SUFFIX)),
                 False) for raw in raws]
    if name == "gta5":
        raws = sorted(p for p in require_dir(root / "labels").glob("*.png") if gta5.RAW_LABEL.match(p.name))
        return [(raw, raw.with_name(f"{raw.stem}{gta5.TRAIN_ID_SUFFIX}"), True) for raw in raws]
    raise ConfigError(f"prepare supports cityscapes and gta5, got {name!r}")


def _convert(job: tuple[Path, Path, bool]) -> None:
    raw, out, palette = job
    ids = read_palette_indices(raw) if palette else read_label(raw)
    write_png_atomic(out, cityscapes.ID_TO_TRAIN_ID[ids])


# Data sets whose prepare step lives in their own module: name -> the jobs of a root (each job's run() returns
# (written, skipped)), and what the counts count.
PREPARE_JOBS = {"isaid": isaid.prepare_jobs, "totaltext": totaltext.prepare_jobs}
PREPARED = {"cityscapes": "trainId labels", "gta5": "trainId labels", "isaid": "patches and test scenes",
            "totaltext": "labels"}


def _run_job(job) -> tuple[int, int]:
    return job.run()


def prepare_labels(name: str, root, workers: int = 1) -> tuple[int, int]:
    """Writes what data set `name` lacks: the *_labelTrainIds.png of "cityscapes" | "gta5", the patches of
    "isaid", the {0, 1} labels of "totaltext"; returns (written, skipped) in PREPARED[name] units."""
    if name in PREPARE_JOBS:
        jobs = PREPARE_JOBS[name](Path(root))
        written = skipped = 0
        with Pool(max(1, int(workers))) as pool:
            for done, present in tqdm(pool.imap_unordered(_run_job, jobs), total=len(jobs), desc=f"prepare {name}",
                                      unit="image"):
                written, skipped = written + done, skipped + present
        return written, skipped
    jobs = _label_jobs(name, Path(root))
    todo = [job for job in jobs if not job[1].is_file()]
    with Pool(max(1, int(workers))) as pool:
        for _ in tqdm(pool.imap_unordered(_convert, todo, chunksize=8), total=len(todo), desc=f"prepare {name}",
                      unit="label"):
            pass
    return len(todo), len(jobs) - len(todo)


def _pair_errors(job: tuple) -> list[str]:
    """One-line errors of one (image, label, lut) pair against `num_classes` train ids, one per bad file.

    With `decode` the image is decoded as training reads it: a truncated or corrupt image has a readable header."""
    (image, label_path, lut), num_classes, (raw_max, screen_label_ids, palette), decode = job
    errors, size = [], None
    try:
        size = read_image(image).shape[:2] if decode else image_size(image)
    except BadSampleError as err:
        errors.append(str(err))
    except OSError as err:  # Pillow's, for a header it cannot read
        errors.append(f"{image}: unreadable ({err})")
    try:
        raw = read_palette_indices(label_path) if palette and lut is not None else read_label(label_path)
    except BadSampleError as err:
        return errors + [str(err)]
    if size is not None and raw.shape != size:
        errors.append(f"{image}: image is {size[0]}x{size[1]} but its label {label_path} is "
                      f"{raw.shape[0]}x{raw.shape[1]}")
    values = np.unique(raw)
    if lut is None:
        bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
        if screen_label_ids and len(bad) and bad.max() <= MAX_CITYSCAPES_ID:
            errors.append(f"{label_path}: values {bad.tolist()} look like raw labelIds, expected trainIds "
                          f"0..{num_classes - 1} (run `python -m hlbench.data prepare`)")
        elif len(bad):
            errors.append(f"{label_path}: values {bad.tolist()} are outside the classes 0..{num_classes - 1} and 255")
    elif raw_max is not None:
        bad = values[(values > raw_max) & (values != IGNORE_INDEX)]
        if len(bad):
            errors.append(f"{label_path}: raw values {bad.tolist()} are outside 0..{raw_max} and 255")
    return errors


def _split_pairs(name: str, root: Path, errors: list[str], warnings: list[str]) -> dict:
    """{split: pairs} of a data set; missing folders and images without labels go to errors / warnings."""
    if name == "gta5":
        try:
            pairs, unlabelled = gta5.gta5_pairs(root)
        except FileNotFoundError as err:
            errors.append(str(err))
            return {}
        # Incomplete redistributions of GTA5 exist: usable, so only warn.
        warnings += [f"{image}: image without label" for image in unlabelled]
        return {"all": pairs}
    lister = {"cityscapes": cityscapes.cityscapes_pairs, "ade20k": ade20k.ade20k_pairs,
              "isaid": isaid.isaid_pairs, "totaltext": totaltext.totaltext_pairs}[name]
    splits = {}
    for split in ("train", "val"):
        try:
            splits[split] = lister(root, split)
        except FileNotFoundError as err:
            errors.append(str(err))
    return splits


# Per data set: (max raw value of a LUT-mapped label or None, screen trainId files for raw Cityscapes ids,
# raw labels are palette PNGs). Raw ADE annotations hold 0..150 before reduce-zero.
LABEL_RULES = {"cityscapes": (MAX_CITYSCAPES_ID, True, False), "gta5": (None, True, True),
               "ade20k": (len(ade20k.CLASSES), False, False), "isaid": (None, False, False),
               "totaltext": (None, False, False)}
KNOWN_COUNTS = {"cityscapes": cityscapes.KNOWN_COUNTS, "gta5": {"all": gta5.KNOWN_COUNT},
                "ade20k": ade20k.KNOWN_COUNTS, "isaid": isaid.KNOWN_COUNTS, "totaltext": totaltext.KNOWN_COUNTS}
CLASSES = {"cityscapes": cityscapes.CLASSES, "gta5": cityscapes.CLASSES, "ade20k": ade20k.CLASSES,
           "isaid": isaid.CLASSES, "totaltext": totaltext.CLASSES}


def check_dataset(name: str, root, workers: int = 1, decode: bool = True) -> tuple[dict, list[str], list[str]]:
    """({split: number of labelled images}, errors, warnings) of data set `name` under `root`; one line each.

    decode=False reads only the images' headers (sizes), not their pixels: quicker, but blind to a truncated or
    corrupt image."""
    if name not in KNOWN_COUNTS:
        raise ConfigError(f"check supports {sorted(KNOWN_COUNTS)}, got {name!r}")
    root, errors, warnings = Path(root), [], []
    splits = _split_pairs(name, root, errors, warnings)
    num_classes = len(CLASSES[name])
    jobs = [(pair, num_classes, LABEL_RULES[name], decode) for pairs in splits.values() for pair in pairs]
    with Pool(max(1, int(workers))) as pool:
        for found in tqdm(pool.imap(_pair_errors, jobs, chunksize=8), total=len(jobs), desc=f"check {name}",
                          unit="pair"):
            errors += found
    counts = {split: len(pairs) for split, pairs in splits.items()}
    # Each pair holds a LUT when its raw labels are mapped on the fly, None when a trainIds file is used.
    mapping = {split: sorted({"raw ids mapped on load" if lut is not None else "trainId files"
                              for _, _, lut in pairs}) for split, pairs in splits.items() if pairs}
    if name != "ade20k" and len({tuple(m) for m in mapping.values()}) > 1:
        warnings.append(f"{root}: splits are mapped differently ("
                        + "; ".join(f"{split}: {', '.join(m)}" for split, m in mapping.items())
                        + f"): run `python -m hlbench.data prepare {name} --root {root}` so all use trainId files")
    for split, count in counts.items():
        known = KNOWN_COUNTS[name].get(split)
        if known is not None and count != known:
            warnings.append(f"{root}: {split} has {count} labelled images, the official release has {known}")
    return counts, errors, warnings
