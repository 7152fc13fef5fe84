"""The iteration-based train loop shared by every method: data, accumulation, schedule, eval, checkpoints."""
from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm import tqdm

from ..data import build_datasets, normalize_batch, worker_init_fn
from ..methods import build_method
from ..models import build_model
from ..tracking import Tracker
from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_mean, barrier, plan_batch
from .evaluator import evaluate, protocol_of
from .optim import build_optimizer, lr_at, set_lr

log = logging.getLogger("hlbench")


class InfiniteShardedSampler(Sampler):
    """Endless reshuffled passes over the data set, sharded by rank, resumable at any sample.

    Yields (index, sample_seed): the seed makes each sample's augmentation a function of the run seed and the
    sample's position in the stream, independent of worker count and of where a run was resumed.
    """

    def __init__(self, size: int, seed: int, rank: int, world: int, start: int = 0):
        self.size, self.seed, self.rank, self.world, self.start = size, seed, rank, world, start
        self.per_rank = math.ceil(size / world)

    def __iter__(self):
        k = self.start
        while True:
            epoch, pos = divmod(k, self.per_rank)
            perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            perm = perm.repeat(math.ceil(self.per_rank * self.world / self.size))[: self.per_rank * self.world]
            for idx in perm[self.rank::self.world][pos:].tolist():
                yield idx, (self.seed * 1_000_003 + k * self.world + self.rank) % 2**32
                k += 1


class SeededSamples(torch.utils.data.Dataset):
    """Seeds every RNG an augmentation might use from the sampler's per-sample seed, then loads the sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        idx, seed = key
        # Forked so that with num_workers=0 the training process's own RNG stream (dropout) is untouched.
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            item = self.dataset[idx]
        random.setstate(py_state)
        np.random.set_state(np_state)
        return item


def _autocast(device, amp):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else nullcontext()


def _convert_norm(model, norm: str, info: DistInfo):
    if norm not in ("bn", "syncbn"):
        raise ValueError(f"train.norm must be bn or syncbn, got {norm!r}")
    if norm == "syncbn":
        if info.device.type == "cuda" and info.world_size > 1:
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("train.norm=syncbn: world size %d on %s, falling back to BatchNorm", info.world_size,
                 info.device.type)
    return model


def _summary_entry(it: int, metrics: dict, protocol: dict, weights: str, class_names: list[str]) -> dict:
    return {"iter": it, "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"], "aAcc": metrics["aAcc"],
            "IoU": {c: metrics[f"IoU.{c}"] for c in class_names},
            "protocol": {**protocol, "weights": weights}}


def _report_iou(metrics: dict, classes: list[str]) -> float | None:
    vals = [metrics[f"IoU.{c}"] for c in classes if not math.isnan(metrics.get(f"IoU.{c}", math.nan))]
    return float(np.mean(vals)) if vals else None


def train(cfg, run_dir: Path, info: DistInfo, meta: dict, hooks: dict | None = None) -> dict:
    """Train and evaluate one experiment in `run_dir`; returns the summary written to summary.json.

    Args:
        meta: run identity for tracking: experiment, suite, name, tags.
        hooks: test seam, e.g. {"stop_after": k} stops (as a killed job would) right after iteration k.
    """
    hooks = hooks or {}
    torch.manual_seed(cfg.seed + info.rank)
    np.random.seed(cfg.seed + info.rank)
    random.seed(cfg.seed + info.rank)
    device = info.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)

    datasets = build_datasets(cfg.data, cfg.seed)
    train_set, val_set = datasets["train"], datasets["val"]
    classes = list(train_set.classes)
    model = build_model(cfg.model, num_classes=len(classes), hl=cfg.hl.enabled,
                        detach_hl_features=cfg.hl.detach_features)
    model = _convert_norm(model, cfg.train.norm, info).to(device)
    if cfg.train.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    method = build_method(cfg, cfg.data.ignore_index)
    optimizer = build_optimizer(model, cfg.optim, cfg.hl.lr_mult)

    start_it, best, state = 0, None, None
    ckpt_dir = Path(run_dir) / "checkpoints"
    if cfg.resume and (latest := ckpt.latest_checkpoint(ckpt_dir)) is not None:
        state = ckpt.load_state(latest)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_it, best = state["iter"], state.get("best")
        log.info("resumed from %s (iteration %d)", latest, start_it)
    elif cfg.init_from:
        path = Path(cfg.init_from)
        weights = ckpt.model_weights(ckpt.load_state(path), path)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        log.info("init_from %s: %d tensors loaded, missing %s, unexpected %s", path,
                 len(weights) - len(unexpected), list(missing), list(unexpected))
    per_device, accum = plan_batch(cfg.train.batch_size, info.world_size, cfg.train.max_batch_per_device)
    tracker = Tracker(run_dir, cfg, logger=cfg.logger.name, project=cfg.logger.project, group=meta["suite"],
                      job_type=cfg.setting, tags=meta["tags"], name=meta["name"], class_names=classes,
                      palette=getattr(train_set, "palette", None), rank=info.rank,
                      resumed_from=start_it if state is not None else None,
                      env_extra={"world_size": info.world_size, "seed": int(cfg.seed), "global_batch":
                                 int(cfg.train.batch_size), "per_device_batch": per_device, "accumulation": accum})
    try:
        return _train_loop(cfg, run_dir, info, meta, hooks, tracker, model, optimizer, method, train_set, val_set,
                           classes, start_it, best, state, per_device, accum)
    except BaseException:
        tracker.finish(exit_code=1)
        raise


def _train_loop(cfg, run_dir, info, meta, hooks, tracker, model, optimizer, method, train_set, val_set, classes,
                start_it, best, state, per_device, accum):
    device = info.device
    total = int(cfg.train.iters)
    ckpt_dir = Path(run_dir) / "checkpoints"
    if state is not None:
        ckpt.set_rng_state(state["rng"])

    if info.is_main:
        log.info("global batch %d = %d device(s) x %d per device x %d accumulation step(s); lr %g; %d iterations "
                 "(%d done)", cfg.train.batch_size, info.world_size, per_device, accum, cfg.optim.lr, total, start_it)
        if accum > 1:
            log.warning("gradient accumulation: BatchNorm statistics come from batches of %d, not %d", per_device,
                        cfg.train.batch_size // info.world_size)

    train_model = model
    if cfg.train.compile:
        train_model = torch.compile(model)
    if info.world_size > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = InfiniteShardedSampler(len(train_set), cfg.seed, info.rank, info.world_size,
                                     start=start_it * accum * per_device)
    workers = int(cfg.train.num_workers)
    loader = DataLoader(SeededSamples(train_set), batch_size=per_device, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, worker_init_fn=worker_init_fn,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(loader)

    protocol = protocol_of(cfg.eval)
    amp = bool(cfg.train.amp)
    report_classes = list(cfg.data.get("report_classes") or [])

    def run_eval(it: int, num_panel: int) -> dict:
        t0 = time.perf_counter()
        result = evaluate(model, val_set, cfg.eval, cfg.data, device, classes, amp=amp, num_panel=num_panel,
                          hl_offset=cfg.hl.offset)
        tracker.log("val", it, {**result["metrics"], **result["hl_auroc_kinds"],
                                "eval_time": time.perf_counter() - t0})
        tracker.log_class_iou(it, {c: result["metrics"][f"IoU.{c}"] for c in classes})
        _log_panel(tracker, run_dir, it, result["panel"])
        return result

    model.train()
    window = {"data": 0.0, "start": time.perf_counter(), "n": 0, "logs": {}}
    bar = tqdm(total=total, initial=start_it, disable=not info.is_main, desc=meta["name"], dynamic_ncols=True,
               mininterval=5)
    train_start = time.perf_counter()
    last_eval = None
    for it in range(start_it, total):
        lr = lr_at(it, total, cfg.optim)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            window["data"] += time.perf_counter() - t0
            img = normalize_batch(batch["img"].to(device, non_blocking=True), cfg.data.mean, cfg.data.std,
                                  img_hw=batch["img_hw"].to(device))
            if cfg.train.channels_last and device.type == "cuda":
                img = img.contiguous(memory_format=torch.channels_last)
            batch = {"img": img, "label": batch["label"].to(device, non_blocking=True)}
            sync = micro == accum - 1 or info.world_size == 1
            ctx = train_model.no_sync() if not sync else nullcontext()
            with ctx, _autocast(device, amp):
                loss, logs = method(train_model, batch)
            (loss / accum).backward() if not amp else (loss.float() / accum).backward()
            for k, v in logs.items():
                window["logs"][k] = window["logs"].get(k, 0.0) + v.detach().float() / accum
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        window["n"] += 1
        done = it + 1
        bar.update(1)

        if done % cfg.train.log_interval == 0 or done == total:
            means = all_reduce_mean({k: v / window["n"] for k, v in window["logs"].items()})
            if not all(math.isfinite(float(v)) for v in means.values()):
                raise FloatingPointError(f"non-finite loss at iteration {done}: "
                                         f"{ {k: float(v) for k, v in means.items()} }")
            elapsed = time.perf_counter() - window["start"]
            record = {"lr": lr, "data_time": window["data"] / window["n"], "time": elapsed / window["n"],
                      **{k: float(v) for k, v in means.items()}}
            if device.type == "cuda":
                record["memory"] = int(torch.cuda.max_memory_allocated(device) / 2**20)
            tracker.log("train", done, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", data=f"{record['data_time']:.3f}s",
                            step=f"{record['time']:.3f}s")
            window = {"data": 0.0, "start": time.perf_counter(), "n": 0, "logs": {}}

        t_eval = time.perf_counter()
        if cfg.train.eval_interval and done % cfg.train.eval_interval == 0 and done != total:
            last_eval = (done, run_eval(done, cfg.eval.num_hl_maps))
            best = _update_best(best, done, last_eval[1]["metrics"], protocol, classes, ckpt_dir, model, info)
        elif cfg.train.hl_map_interval and done % cfg.train.hl_map_interval == 0 and done != total and cfg.hl.enabled:
            _log_panel_only(model, val_set, cfg, device, classes, tracker, done, amp, run_dir)
        # The logged `time` is the training step alone; evaluations report their own eval_time.
        window["start"] += time.perf_counter() - t_eval

        if (cfg.train.ckpt_interval and done % cfg.train.ckpt_interval == 0) or done == total:
            if info.is_main:
                ckpt.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": done,
                                  "best": best, "rng": ckpt.rng_state()},
                                 ckpt_dir / f"iter_{done:06d}.pth")
            barrier()
        if hooks.get("stop_after") == done:
            bar.close()
            tracker.finish(exit_code=1)
            return {"stopped_at": done}
    bar.close()
    train_time = time.perf_counter() - train_start

    # The recipe's protocol on the final weights; the mmseg tables report this (LAST) value (results.md §1).
    final = run_eval(total, cfg.eval.num_hl_maps) if start_it < total or last_eval is None else last_eval[1]
    best = _update_best(best, total, final["metrics"], protocol, classes, ckpt_dir, model, info)
    summary = {
        "experiment": meta["experiment"], "suite": meta["suite"], "seed": int(cfg.seed), "iters": total,
        "setting": cfg.setting, "hl": bool(cfg.hl.enabled), "model": cfg.model.name, "data": cfg.data.name,
        "train_time_s": round(train_time, 2), "resumed_from": start_it or None,
        "final": _summary_entry(total, final["metrics"], protocol, f"final (iter {total})", classes),
        "best": best,
        "hl_auroc": final["hl_auroc"],
        "hl_auroc_kinds": final["hl_auroc_kinds"],
        "hard_kinds": list(cfg.data.get("hard_kinds") or []),
        "report_classes": report_classes,
        "report_IoU": _report_iou(final["metrics"], report_classes),
        "paper": _plain(cfg.paper),
        "batch": {"global": int(cfg.train.batch_size), "per_device": per_device, "accumulation": accum,
                  "world_size": info.world_size},
    }
    tracker.write_summary(summary)
    tracker.finish(exit_code=0)
    return summary


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def _update_best(best, it, metrics, protocol, classes, ckpt_dir, model, info):
    """Keep the best evaluation so far and its weights (checkpoints/best.pth)."""
    if best is not None and not metrics["mIoU"] > best["mIoU"]:
        return best
    if info.is_main:
        ckpt.atomic_save({"model": model.state_dict(), "iter": it}, ckpt_dir / "best.pth")
    return _summary_entry(it, metrics, protocol, f"checkpoints/best.pth (iter {it})", classes)


@torch.no_grad()
def _log_panel_only(model, val_set, cfg, device, classes, tracker, it, amp, run_dir):
    """HL-map snapshot between evaluations, on the same fixed val images as the evaluation panel."""
    subset = Subset(val_set, list(range(min(cfg.eval.num_hl_maps, len(val_set)))))
    eval_cfg = {**_plain(cfg.eval), "hl_auroc": False}
    result = evaluate(model, subset, OmegaConf.create(eval_cfg), cfg.data, device, classes, amp=amp,
                      num_panel=cfg.eval.num_hl_maps, hl_offset=cfg.hl.offset)
    _log_panel(tracker, run_dir, it, result["panel"])


def _log_panel(tracker, run_dir, it, panel) -> None:
    """HL-map panel image (+W&B), and the raw HL and CE-loss maps of the same fixed images for stability analysis."""
    if panel is None:  # only rank 0 collects the panel
        return
    tracker.log_hl_maps(it, panel["images"], panel["hl"], panel["labels"], panel["preds"], hard=panel["hard"])
    if panel["hl"] is not None:
        (Path(run_dir) / "hl_maps").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(Path(run_dir) / "hl_maps" / f"maps_{it:06d}.npz", hl=panel["hl"].numpy().astype(np.float16),
                            loss=panel["loss"].numpy().astype(np.float16), label=panel["labels"].numpy().astype(np.uint8),
                            hard=panel["hard"].numpy())
