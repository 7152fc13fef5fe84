"""`python -m hlbench.eval experiment=<name> checkpoint=<path>`: score saved weights with the recipe's protocol.
`python -m hlbench.eval run=<run folder>`: score a run's best weights (else its newest checkpoint) with its config.

Accepts hlbench, mmsegmentation 0.x and 1.x checkpoints (hlbench.models.load_checkpoint). Results go to a new
folder <out_dir>/eval/<experiment>/<checkpoint stem>[-2, -3...] holding metrics.json and config.yaml.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config_checks import check_config
from .engine.cores import set_intra_op_threads
from .errors import ConfigError, MissingInputError
from .run import launch
from .suites import run_name

log = logging.getLogger("hlbench")


def new_eval_dir(out_dir, experiment: str, checkpoint: Path) -> Path:
    """A folder that did not exist before: <out_dir>/eval/<experiment>/<stem>, else <stem>-2, <stem>-3..."""
    parent = Path(out_dir) / "eval" / experiment.replace("/", "-")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = parent / (checkpoint.stem if n == 1 else f"{checkpoint.stem}-{n}")
        try:
            path.mkdir()  # atomic: two evaluations started together never share a folder
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"{parent}: no free folder name for {checkpoint.stem}")


def iou_table(metrics: dict, class_names: list[str]) -> str:
    """Per-class IoU and the mIoU/mAcc/aAcc lines, in percent like mmseg's log table."""
    width = max(len(c) for c in [*class_names, "class"])

    def pct(x):
        return "   nan" if x is None or math.isnan(x) else f"{100 * x:6.2f}"

    rows = [f"{'class':<{width}}    IoU    Acc"]
    rows += [f"{c:<{width}} {pct(metrics[f'IoU.{c}'])} {pct(metrics[f'Acc.{c}'])}" for c in class_names]
    rows.append(f"mIoU {pct(metrics['mIoU'])}  mAcc {pct(metrics['mAcc'])}  aAcc {pct(metrics['aAcc'])}")
    return "\n".join(rows)


def saved_run(path) -> tuple[DictConfig, Path, str]:
    """(config, checkpoint, experiment) of a run folder, from its config.yaml and checkpoints/best.pth (else its
    newest iter_*.pth), or of a checkpoint inside a run folder's checkpoints/."""
    from .engine.checkpoint import latest_checkpoint
    from .tracking.run_folder import CONFIG_FILE, read_json

    path = Path(path)
    run_dir = path.parent.parent if path.is_file() else path
    if not (run_dir / CONFIG_FILE).is_file():
        raise MissingInputError(f"run={path}: expected a run folder (holding {CONFIG_FILE} and checkpoints/) or a "
                                f"checkpoint in one")
    best = run_dir / "checkpoints" / "best.pth"
    checkpoint = path if path.is_file() else best if best.is_file() else latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise MissingInputError(f"run={path}: {run_dir / 'checkpoints'} holds no best.pth or iter_*.pth")
    summary = run_dir / "summary.json"
    experiment = read_json(summary)["experiment"] if summary.is_file() else run_dir.parent.name
    return OmegaConf.load(run_dir / CONFIG_FILE), checkpoint, experiment


def evaluate_checkpoint(cfg: DictConfig, experiment: str) -> dict:
    """Build cfg.model, load cfg.checkpoint, evaluate on cfg.data's val split; returns the written metrics."""
    from .data import build_datasets
    from .data.files import check_mapped_labels
    from .engine.distributed import init_distributed
    from .engine.evaluator import evaluate, protocol_of
    from .models import trained_model
    from .tracking import atomic_write_json, environment_record, write_config

    check_config(cfg)
    if not cfg.get("checkpoint"):
        raise ConfigError("checkpoint=<path> is required: the weights to evaluate")
    checkpoint = Path(cfg.checkpoint)
    info = init_distributed(cfg.device)
    val_set = build_datasets(cfg.data, cfg.seed)["val"]
    check_mapped_labels(val_set)
    classes = list(val_set.classes)
    # The HL branch never runs at inference (the authors' hl_encoder_decoder.py) but is built so the checkpoint's
    # HL weights load and its map can be scored against the data set's hardness mask.
    model, report = trained_model(cfg, checkpoint, len(classes))
    model.to(info.device)
    result = evaluate(model, val_set, cfg.eval, cfg.data, info.device, classes, hl_offset=cfg.hl.offset)
    out = {"experiment": experiment, "checkpoint": str(checkpoint.resolve()), "protocol": protocol_of(cfg.eval),
           "mIoU": result["metrics"]["mIoU"], "metrics": result["metrics"], "hl_auroc": result["hl_auroc"],
           "hl_auroc_kinds": result["hl_auroc_kinds"],
           "weights": {"loaded": len(report["loaded"]), "missing": report["missing"],
                       "unexpected": report["unexpected"]}}
    if info.is_main:
        run_dir = new_eval_dir(cfg.out_dir, experiment, checkpoint)
        write_config(run_dir, cfg)
        atomic_write_json(run_dir / "metrics.json", {**out, "env": environment_record()})
        print(f"{experiment} @ {checkpoint}")
        print(iou_table(result["metrics"], classes))
        auroc = result["hl_auroc"]
        print(f"HL AUROC {100 * auroc:.2f} (the HL map against the data set's hardness mask)" if auroc is not None
              else "HL AUROC – (no HL branch, or no hardness mask in this data set)")
        print("outputs:", run_dir)
        out["run_dir"] = str(run_dir)
    return out


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    set_intra_op_threads()
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    try:
        if cfg.run is not None:
            saved, checkpoint, experiment = saved_run(cfg.run)
            cfg = OmegaConf.merge(saved, {"checkpoint": str(checkpoint), "out_dir": cfg.out_dir, "device": cfg.device})
        elif experiment is None:
            raise ConfigError("experiment=<name> (with checkpoint=<path>) or run=<run folder> is required: it defines "
                              "the model, data and test protocol")
        else:
            experiment = run_name(experiment, bool(cfg.hl.enabled))
        evaluate_checkpoint(cfg, experiment)
    except ConfigError as err:  # bad input: one line; anything else is a fault of ours and keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    launch(hydra_main)


if __name__ == "__main__":
    main()
