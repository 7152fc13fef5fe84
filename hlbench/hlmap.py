"""Stored HL maps: export a trained HL model's maps for a whole training set, and look at them.

`python -m hlbench.hlmap export experiment=<HL experiment> hl.enabled=true checkpoint=<file> [data=<data set>]
out=<folder> [overrides]`, or `... export run=<run folder> [data=<data set>] out=<folder>` (the run's config and best,
else newest, checkpoint, as hlbench.eval reads them): runs the HL branch over every training image, resized as the
data set's test pipeline resizes (no crop, no flip; the training resolution protocol), and writes the raw HL logits
D at the HL head's output size (1/8 for output-stride-8 models) in float16 to <out>/<image key>.npy, with
<out>/manifest.json (model, checkpoint sha256, data set, split, resolution, hlbench commit). Images already done are
skipped, so an interrupted export continues where it stopped; a folder exported from another checkpoint, model,
data set or resolution is refused rather than mixed. Under torchrun each rank exports its share.

`python -m hlbench.hlmap show <folder> [--n 4] [--out <png>]`: the first n maps next to their images and labels, as
one PNG (default <folder>/show.png).

A training run uses the folder with `hl.enabled=true hl.source=fixed data.hl_map_dir=<folder>` (hlbench/data/hl_maps.py).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from tqdm import tqdm

from .errors import ConfigError, MissingInputError, exit_status

log = logging.getLogger("hlbench")

# What the maps are, for the manifest's reader; the test pipeline that sized the input is recorded beside it.
MAPS_ARE = "raw HL logits D at the HL head's output size (1/8 of the input for output-stride-8 models), float16"


def _first(items):
    """DataLoader collate of one item per batch (images differ in size)."""
    return items[0]


class _Items(torch.utils.data.Dataset):
    """The items `indices` of a data set, a bad file's as {"bad": (file, reason)}: the main process then reports it
    in one line or counts it (data.on_bad_sample), rather than a loader worker raising it inside a traceback."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        from .data.bad_samples import BadSampleError

        try:
            return self.dataset[self.indices[i]]
        except BadSampleError as err:
            return {"bad": (err.path, err.reason)}


def export_manifest(cfg, experiment: str, checkpoint: Path, images: int, align_corners: bool) -> dict:
    """The manifest of an export of cfg's training set by `checkpoint`."""
    from .data.files import config_split
    from .data.hl_maps import MANIFEST_FORMAT, data_identity
    from .tracking.environment import git_state
    from .weights import sha256_of

    split = config_split(cfg.data, "train") if "split" in cfg.data.train else "train"
    return {"format": MANIFEST_FORMAT, "experiment": experiment,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha256_of(checkpoint),
            "data": data_identity(cfg.data), "split": split, "images": images,
            "data_config": OmegaConf.to_container(cfg.data, resolve=True),
            "resolution": {"test_pipeline": OmegaConf.to_container(cfg.data.get("test_pipeline") or {}, resolve=True),
                           "maps": MAPS_ARE},
            "align_corners": bool(align_corners), "hl_offset": float(cfg.hl.offset), "hlbench": git_state()}


def claim_folder(out: Path, manifest: dict) -> str | None:
    """Write the manifest into a new or empty `out`, or accept an existing one that matches; else the problem."""
    from .data.hl_maps import MANIFEST, manifest_difference, read_manifest
    from .tracking import atomic_write_json

    path = out / MANIFEST
    if path.is_file():
        differ = manifest_difference(read_manifest(out), manifest)
        if differ:
            return (f"out={out}: its maps come from another export ({', '.join(differ)} differ in {path}); export "
                    f"to a new folder, or delete that one")
        return None
    if out.is_dir() and any(out.iterdir()):
        return f"out={out}: the folder holds files but no {MANIFEST}; export to a new or empty folder"
    atomic_write_json(path, manifest)
    return None


@torch.no_grad()
def export(cfg, experiment: str, out) -> dict:
    """Export the HL maps of cfg.data's training set with cfg.checkpoint into `out`; returns counts."""
    from torch.utils.data import DataLoader

    from .atomic_files import atomic_write
    from .config_checks import check_config
    from .data import build_datasets, build_test_pipeline, normalize_batch, worker_init_fn
    from .data.bad_samples import BadSampleError, bad_sample_log
    from .data.hl_maps import MAP_SUFFIX, map_keys
    from .engine.cores import cpu_plan, loader_workers
    from .engine.distributed import barrier, broadcast_from_main, init_distributed
    from .models import trained_model

    check_config(cfg)
    if not cfg.get("checkpoint"):
        raise ConfigError("checkpoint=<file> (or run=<run folder>) is required: the weights of the HL model")
    checkpoint = Path(cfg.checkpoint)
    if not checkpoint.is_file():
        raise MissingInputError(f"checkpoint={checkpoint}: no such file")
    if not cfg.hl.enabled or cfg.hl.source != "online":
        raise ConfigError(f"{experiment}: the model has no HL branch to export; use the HL row (hl.enabled=true, "
                          f"hl.source=online) and its checkpoint")
    info = init_distributed(cfg.device)
    train = build_datasets(cfg.data, cfg.seed)["train"]
    keys = map_keys(train, cfg.data)
    model, _ = trained_model(cfg, checkpoint, len(train.classes))
    model.to(info.device).eval()
    out = Path(out)
    manifest = export_manifest(cfg, experiment, checkpoint, len(keys), model.align_corners)
    problem = broadcast_from_main(claim_folder(out, manifest) if info.is_main else None)
    if problem:
        raise ConfigError(problem)
    barrier()

    # The training resolution protocol: each image as the test pipeline sizes it (e.g. ADE20K's short side 512),
    # whole, unflipped; the label is read (and checked) but not used.
    train.transform = build_test_pipeline(cfg.data.get("test_pipeline"))
    mine = range(info.rank, len(keys), info.world_size)
    todo = [i for i in mine if not (out / f"{keys[i]}{MAP_SUFFIX}").is_file()]
    workers = min(loader_workers(int(cfg.train.num_workers), 1, cpu_plan().free), len(todo))
    loader = DataLoader(_Items(train, todo), batch_size=1, collate_fn=_first, num_workers=workers,
                        worker_init_fn=worker_init_fn)
    bad_files = bad_sample_log(train)
    written = bad = 0
    for item in tqdm(loader, total=len(todo), desc="hlmap export", unit="image", disable=not info.is_main):
        if "bad" in item:
            if bad_files is None:
                raise BadSampleError(*item["bad"])
            # data.on_bad_sample=skip: the file gets no map, and a run with these maps skips it too.
            bad_files.reject(*item["bad"])
            bad += 1
            continue
        img = normalize_batch(item["img"][None].to(info.device), cfg.data.mean, cfg.data.std)
        # The HL head's own output, before the online branch's resize to the label: 1/8 of the input for
        # output-stride-8 models, 64x smaller than a full-size map.
        logits = model.hl_head(model.backbone(img))[0, 0].float().cpu().numpy()
        stored = logits.astype(np.float16)
        key = keys[item["index"]]
        if not np.isfinite(stored).all():
            raise ConfigError(f"checkpoint={checkpoint}: the HL logits of {key} are not finite in float16")
        atomic_write(out / f"{key}{MAP_SUFFIX}", lambda tmp: np.save(tmp, stored))
        written += 1
    barrier()
    done = sum((out / f"{k}{MAP_SUFFIX}").is_file() for k in keys)
    result = {"out": str(out), "written": written, "already_done": len(mine) - len(todo), "bad": bad,
              "complete": done, "images": len(keys)}
    if info.is_main:
        log.info("HL maps in %s: %d of %d images (%d written now by rank 0, %d already there, %d bad files)", out,
                 done, len(keys), written, len(mine) - len(todo), bad)
    return result


def show(folder, n: int = 4, out=None) -> Path:
    """A PNG of the first `n` stored maps (h = sigmoid(D) + offset, resized to the image) beside their images and
    labels; returns its path (default <folder>/show.png)."""
    import cv2

    from .data import build_datasets
    from .data.hl_maps import MAP_SUFFIX, map_keys, read_manifest
    from .data.transforms import Compose, ToTensor
    from .hardness import hardness_map
    from .models.heads import resize
    from .tracking.hl_maps import hl_panel_figure, image_to_hwc, resize_map, save_figure

    folder = Path(folder)
    manifest = read_manifest(folder)
    data_cfg = OmegaConf.create(manifest["data_config"])
    if "pregenerate" in data_cfg:
        data_cfg.pregenerate = False  # a few scenes are drawn, not the whole set
    train = build_datasets(data_cfg, 0)["train"]
    train.transform = Compose([ToTensor()])
    keys = map_keys(train, data_cfg)
    chosen = [i for i, k in enumerate(keys) if (folder / f"{k}{MAP_SUFFIX}").is_file()][:max(1, n)]
    if not chosen:
        raise MissingInputError(f"{folder}: no stored map (*{MAP_SUFFIX}) for any image of the data set")
    images, labels, maps, hard = [], [], [], []
    hw = None
    for i in chosen:
        item = train[i]
        h, w = item["label"].shape
        hw = hw or (h, w)  # every tile is drawn at the first image's size
        d = torch.from_numpy(np.load(folder / f"{keys[i]}{MAP_SUFFIX}").astype(np.float32))[None, None]
        hl = hardness_map(resize(d, (h, w), manifest["align_corners"]), manifest["hl_offset"])[0].numpy()
        images.append(image_to_hwc(item["img"], hw).transpose(2, 0, 1))
        labels.append(cv2.resize(item["label"].numpy().astype(np.uint8), hw[::-1], interpolation=cv2.INTER_NEAREST))
        maps.append(resize_map(hl, hw))
        hard.append(cv2.resize(item["hard"].numpy().astype(np.uint8), hw[::-1], interpolation=cv2.INTER_NEAREST))
    title = f"{manifest['experiment']}: HL maps of {manifest['data']['name']} {manifest['split']} ({folder.name})"
    fig = hl_panel_figure(np.stack(labels), palette=train.palette, images=np.stack(images), hl=np.stack(maps),
                          hard=np.stack(hard) if train.hard_bits else None, hard_bits=train.hard_bits or None,
                          max_images=len(chosen), title=title, class_names=train.classes)
    return save_figure(fig, Path(out) if out else folder / "show.png")


def export_command(args: list[str]) -> dict:
    """`export` from key=value arguments: out= is ours, everything else composes the run config as hlbench.run."""
    from .compose import compose, hydra_context
    from .eval import saved_run
    from .run import check_overrides
    from .suites import run_name

    outs = [a for a in args if a.startswith("out=")]
    overrides = [a for a in args if not a.startswith("out=")]
    if len(outs) != 1 or not outs[0][4:]:
        raise ConfigError("out=<folder> is required once: where the maps and manifest.json go")
    check_overrides(overrides)
    with hydra_context():
        cfg = compose(overrides, return_hydra_config=True)
    experiment = cfg.hydra.runtime.choices.get("experiment")
    with open_dict(cfg):
        del cfg["hydra"]
    if cfg.run is not None:
        saved, checkpoint, experiment = saved_run(cfg.run)
        # data=... (or data.* keys) exports another data set's maps with the run's model.
        data = cfg.data if any(o.lstrip("+~").split("=")[0].split(".")[0] == "data" for o in overrides) else saved.data
        cfg = OmegaConf.merge(saved, {"checkpoint": str(checkpoint), "device": cfg.device})
        cfg.data = data
    elif experiment is None:
        raise ConfigError("experiment=<HL experiment> (with checkpoint=<file>) or run=<run folder> is required: it "
                          "names the model whose HL branch makes the maps")
    else:
        experiment = run_name(experiment, bool(cfg.hl.enabled))
    return export(cfg, experiment, outs[0][4:])


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in ("export", "show"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from .engine.cores import set_intra_op_threads

    set_intra_op_threads()
    if args[0] == "export":
        return exit_status(lambda: export_command(args[1:]))
    parser = argparse.ArgumentParser(prog="python -m hlbench.hlmap show")
    parser.add_argument("folder")
    parser.add_argument("--n", type=int, default=4, help="maps to draw")
    parser.add_argument("--out", default=None, help="the PNG (default <folder>/show.png)")
    opts = parser.parse_args(args[1:])
    return exit_status(lambda: print("wrote", show(opts.folder, opts.n, opts.out)))


if __name__ == "__main__":
    sys.exit(main())
