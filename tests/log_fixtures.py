"""Small logs in the HL authors' formats, written by tests: mmseg 0.x log.json and a logs/ folder README.

Modelled on mmsegmentation 0.22's JSON-lines logger (header line, then train / val lines in its key order) so
that analysis.logs and analysis.authors_tables meet the real layout; the values are whatever a test asks for.
"""
from __future__ import annotations

import json
from pathlib import Path


def mmseg_config(*, hl: bool, gpus: int, samples_per_gpu: int, interval: int, max_iters: int,
                 save_best: str | None = None) -> str:
    model = "WeightedEncoderDecoder" if hl else "EncoderDecoder"
    best = f", save_best='{save_best}'" if save_best else ""
    return (f"norm_cfg = dict(type='SyncBN', requires_grad=True)\nmodel = dict(\n    type='{model}',\n"
            f"    backbone=dict(type='ResNetV1c', depth=18),\n    test_cfg=dict(mode='whole'))\n"
            f"data = dict(\n    samples_per_gpu={samples_per_gpu},\n    workers_per_gpu=2)\n"
            f"runner = dict(type='IterBasedRunner', max_iters={max_iters})\n"
            f"evaluation = dict(interval={interval}, metric='mIoU', pre_eval=True{best})\n"
            f"gpu_ids = range(0, {gpus})\n")


def write_mmseg_log(path, classes, evals, *, hl: bool, gpus: int = 4, samples_per_gpu: int = 2,
                    gpu_name: str = "NVIDIA A100-PCIE-40GB", times=(0.5,), memory=(1000,), val_steps: int = 7,
                    save_best: str | None = None) -> Path:
    """evals: [(training iteration, {class: IoU fraction}), ...] in order. Before each evaluation two train lines
    (half-way and at the iteration) take their `time` and `memory` in turn from `times` / `memory`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    interval = evals[0][0]
    header = {"env_info": f"sys.platform: linux\nCUDA available: True\nGPU {','.join(map(str, range(gpus)))}: "
                          f"{gpu_name}\nPyTorch: 1.8.2+cu111\nMMSegmentation: 0.22.1+",
              "seed": 0, "exp_name": f"{'hl' if hl else 'base'}_{path.parent.name}.py", "mmseg_version": "0.22.1+",
              "config": mmseg_config(hl=hl, gpus=gpus, samples_per_gpu=samples_per_gpu, interval=interval,
                                     max_iters=evals[-1][0], save_best=save_best),
              "CLASSES": list(classes), "PALETTE": [[k, k, k] for k in range(len(classes))]}
    lines, n = [header], 0
    for epoch, (it, iou) in enumerate(evals, start=1):
        for train_iter in (it - interval // 2, it):
            losses = {"decode.loss_ce": 0.5, "decode.acc_seg": 80.0, "aux.loss_ce": 0.2, "aux.acc_seg": 75.0}
            if hl:
                losses["weight_loss"] = -0.005
            lines.append({"mode": "train", "epoch": epoch, "iter": train_iter, "lr": 0.01,
                          "memory": memory[n % len(memory)], "data_time": 0.01, **losses,
                          "loss": round(sum(v for k, v in losses.items() if "loss" in k), 5),
                          "time": times[n % len(times)]})
            n += 1
        miou = round(sum(iou[c] for c in classes) / len(classes), 4)
        lines.append({"mode": "val", "epoch": epoch, "iter": val_steps, "lr": 0.01, "aAcc": 0.9, "mIoU": miou,
                      "mAcc": 0.8, **{f"IoU.{c}": iou[c] for c in classes},
                      **{f"Acc.{c}": min(1.0, iou[c] + 0.05) for c in classes}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def mean_percent(classes, iou) -> float:
    """The README number of an mmseg log's mIoU: the 4-decimal fraction × 100."""
    return round(round(sum(iou[c] for c in classes) / len(classes), 4) * 100, 2)


def write_readme(folder, header, rows) -> Path:
    """A README.md holding one Markdown pipe table (`rows` of cell strings, links written by the caller)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
