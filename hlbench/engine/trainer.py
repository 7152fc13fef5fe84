"""The iteration-based train loop shared by every method: data, accumulation, schedule, eval, checkpoints."""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from ..data import build_datasets, normalize_batch, split_record
from ..data.files import check_mapped_labels
from ..data.sampling import stream_loader
from ..methods import build_method
from ..models import build_model, load_checkpoint
from ..tracking import Tracker
from ..weights import pretrained_name
from . import checkpoint as ckpt
from .distributed import DistInfo, all_reduce_mean, barrier, plan_batches
from .evaluator import evaluate, protocol_of
from .optim import build_optimizer, lr_at, set_lr
from .precision import allow_tf32, autocast

log = logging.getLogger("hlbench")


def _convert_norm(model, norm: str, info: DistInfo):
    if norm == "syncbn":
        if info.device.type == "cuda" and info.world_size > 1:
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log.info("train.norm=syncbn: world size %d on %s, falling back to BatchNorm", info.world_size,
                 info.device.type)
    return model


def _summary_entry(it: int, metrics: dict, protocol: dict, weights: str, model: str, class_names: list[str]) -> dict:
    """One evaluation for summary.json; `weights` says which file and `model` which of the method's weights
    (student or teacher) produced it."""
    return {"iter": it, "mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"], "aAcc": metrics["aAcc"],
            "IoU": {c: metrics[f"IoU.{c}"] for c in class_names},
            "protocol": {**protocol, "weights": weights, "model": model}}


def _report_iou(metrics: dict, classes: list[str]) -> float | None:
    vals = [metrics[f"IoU.{c}"] for c in classes if not math.isnan(metrics.get(f"IoU.{c}", math.nan))]
    return float(np.mean(vals)) if vals else None


def train(cfg, run_dir: Path, info: DistInfo, meta: dict, hooks: dict | None = None) -> dict:
    """Train and evaluate one experiment in `run_dir`; returns the summary written to summary.json.

    Args:
        meta: run identity for tracking: experiment, suite, name, tags.
        hooks: test seam, e.g. {"stop_after": k} stops (as a killed job would) right after iteration k.
    """
    trainer = Trainer(cfg, Path(run_dir), info, meta)
    try:
        return trainer.fit(hooks or {})
    except BaseException:
        trainer.tracker.finish(exit_code=1)
        raise


class Trainer:
    """One run: builds data, model, method and optimiser from the config, resumes, trains, evaluates, records."""

    def __init__(self, cfg, run_dir: Path, info: DistInfo, meta: dict):
        self.cfg, self.run_dir, self.info, self.meta = cfg, run_dir, info, meta
        self.device = info.device
        self.ckpt_dir = run_dir / "checkpoints"
        torch.manual_seed(cfg.seed + info.rank)
        np.random.seed(cfg.seed + info.rank)
        random.seed(cfg.seed + info.rank)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
            allow_tf32(cfg.train.tf32)

        datasets = build_datasets(cfg.data, cfg.seed)
        self.split = split_record(cfg.data)  # the labeled / unlabeled partition of semi-supervised data
        self.val_set = datasets["val"]
        self.classes = list(datasets["train"].classes)
        self.palette = getattr(datasets["train"], "palette", None)
        check_mapped_labels(self.val_set)
        model = build_model(cfg.model, num_classes=len(self.classes), hl=cfg.hl.enabled,
                            detach_hl_features=cfg.hl.detach_features, weights_dir=cfg.weights_dir)
        self.model = _convert_norm(model, cfg.train.norm, info).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.method = build_method(cfg)
        self.streams = self.method.streams(datasets)
        self.plan = plan_batches({name: (s.batch_size, s.key) for name, s in self.streams.items()},
                                 info.world_size, cfg.train.max_batch_per_device)
        self.method.setup(self.model, self.plan)
        self.optimizer = build_optimizer(self.method.param_groups(self.model), cfg.optim)
        self.total = int(cfg.train.iters)
        self.precision = cfg.train.precision
        self.protocol = protocol_of(cfg.eval)
        self.step_times: list[float] = []  # per logging window, for the s/iter reported next to the paper's
        self.start_it, self.best, rng = self._restore()
        self.tracker = Tracker(
            run_dir, cfg, logger=cfg.logger.name, project=cfg.logger.project, entity=cfg.logger.entity,
            group=meta["suite"],
            job_type=cfg.setting, name=meta["name"],
            tags=meta["tags"] + self.method.tags() + ([f"split:{self.split['source']}"] if self.split else []),
            class_names=self.classes, palette=self.palette, rank=info.rank,
            resumed_from=self.start_it if rng is not None else None,
            env_extra={"world_size": info.world_size, "seed": int(cfg.seed), "batch_plan": self.plan.as_dict(),
                       "precision": self.precision, "split": self.split, **self.method.describe()})
        if rng is not None:
            ckpt.set_rng_state(rng)

    @property
    def channels_last(self) -> bool:
        return bool(self.cfg.train.channels_last) and self.device.type == "cuda"

    def _restore(self):
        """resume=true: full state from the newest checkpoint; init_from: weights only. Returns (iter, best, rng)."""
        cfg = self.cfg
        if cfg.resume and (latest := ckpt.latest_checkpoint(self.ckpt_dir)) is not None:
            state = ckpt.load_state(latest)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state.get("method", {}))
            log.info("resumed from %s (iteration %d)", latest, state["iter"])
            return state["iter"], state.get("best"), state["rng"]
        if cfg.init_from:
            # The checkpoint loader's report (loaded / missing / unexpected) and its refusal of a file that
            # matches fewer than half of the model's tensors.
            load_checkpoint(self.model, Path(cfg.init_from))
        return 0, None, None

    def _loaders(self) -> dict:
        """One endless, resumable loader per stream, positioned after the samples already trained on."""
        loaders = {}
        for i, (name, stream) in enumerate(self.streams.items()):
            per_device = self.plan.per_device[name]
            # Streams draw different permutations; the first keeps the run seed's.
            loaders[name] = iter(stream_loader(
                stream.dataset, per_device, seed=int(self.cfg.seed) + 7919 * i, rank=self.info.rank,
                world=self.info.world_size, start=self.start_it * self.plan.accum * per_device,
                workers=int(self.cfg.train.num_workers), pin_memory=self.device.type == "cuda"))
        return loaders

    def _announce(self) -> None:
        cfg, plan = self.cfg, self.plan
        batches = ", ".join(f"{name} {plan.global_batch[name]} = {plan.world_size} device(s) x "
                            f"{plan.per_device[name]}" for name in plan.per_device)
        log.info("global batch %s x %d accumulation step(s); lr %g; %s; %d iterations (%d done)", batches,
                 plan.accum, cfg.optim.lr, self.precision, self.total, self.start_it)
        facts = self.method.describe()
        if "grouping" in facts:
            log.info("per-GPU scope: %s; hl_variant %s", facts["grouping"], facts["hl_variant"])
        if plan.accum > 1:
            log.warning("gradient accumulation: BatchNorm statistics come from batches of %s, not %s",
                        dict(plan.per_device), {n: b // plan.world_size for n, b in plan.global_batch.items()})

    def _to_device(self, batch) -> dict:
        """The batch on the device: the image normalised (padding at exactly 0), other tensors moved as they are."""
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
               if torch.is_tensor(v) and k not in ("img", "img_hw")}
        img = normalize_batch(batch["img"].to(self.device, non_blocking=True), self.cfg.data.mean,
                              self.cfg.data.std, img_hw=batch["img_hw"].to(self.device))
        out["img"] = img.contiguous(memory_format=torch.channels_last) if self.channels_last else img
        return out

    def fit(self, hooks: dict) -> dict:
        cfg, info, accum = self.cfg, self.info, self.plan.accum
        if info.is_main:
            self._announce()
        train_model = torch.compile(self.model) if cfg.train.compile else self.model
        if info.world_size > 1:
            train_model = DistributedDataParallel(
                train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loaders = self._loaders()
        window = _Window()
        bar = tqdm(total=self.total, initial=self.start_it, disable=not info.is_main, desc=self.meta["name"],
                   dynamic_ncols=True, mininterval=5)
        train_start = time.perf_counter()
        self.model.train()
        for it in range(self.start_it, self.total):
            lr = lr_at(it, self.total, cfg.optim)
            set_lr(self.optimizer, lr)
            self.optimizer.zero_grad(set_to_none=True)
            for micro in range(accum):
                t0 = time.perf_counter()
                batches = {name: self._to_device(next(loader)) for name, loader in loaders.items()}
                window.data += time.perf_counter() - t0
                # Under DDP, gradients are all-reduced only on the last accumulation step.
                sync = micro == accum - 1 or info.world_size == 1
                with (nullcontext() if sync else train_model.no_sync()), autocast(self.device, self.precision):
                    loss, logs = self.method.step(train_model, batches, it)
                (loss / accum).backward()
                window.add(logs, accum)
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.optimizer.step()
            done = it + 1
            self.method.after_step(self.model, done)
            window.n += 1
            bar.update(1)
            if done % cfg.train.log_interval == 0 or done == self.total:
                record = window.record(lr, done, self.device)
                self.tracker.log("train", done, record)
                self.step_times.append(record["time"])
                bar.set_postfix(loss=f"{record['loss']:.3f}", data=f"{record['data_time']:.3f}s",
                                step=f"{record['time']:.3f}s")
                window = _Window()
            t_eval = time.perf_counter()
            if done < self.total and _every(cfg.train.eval_interval, done):
                self._update_best(done, self.evaluate(done, eval_cfg=self._periodic_protocol(done)))
            elif done < self.total and cfg.hl.enabled and _every(cfg.train.hl_map_interval, done):
                self._hl_snapshot(done)
            # The logged `time` is the training step alone; evaluations report their own eval_time.
            window.start += time.perf_counter() - t_eval
            if _every(cfg.train.ckpt_interval, done) or done == self.total:
                self._save(done)
            if hooks.get("stop_after") == done:
                bar.close()
                self.tracker.finish(exit_code=1)
                return {"stopped_at": done}
        bar.close()
        return self._finish(time.perf_counter() - train_start)

    def _periodic_protocol(self, it: int):
        """The eval config of a periodic evaluation: eval.during before its `until`, the final protocol after."""
        during = self.cfg.eval.during
        if during is None or it >= float(during.get("until", 1.0)) * self.total:
            return self.cfg.eval
        return OmegaConf.merge(self.cfg.eval, {k: v for k, v in _plain(during).items() if k != "until"})

    def evaluate(self, it: int, dataset=None, score_hl: bool = True, eval_cfg=None, module=None,
                 log: bool = True) -> dict:
        """A protocol (default: the recipe's) on `dataset` (default: val) with the method's eval weights (or
        `module`), logged (with `log`) as a val line plus the HL-map panel. Evaluation is fp32 whatever the training
        precision."""
        t0 = time.perf_counter()
        which = None
        if module is None:
            module, which = self.method.eval_model(self.model)
        eval_cfg = eval_cfg if eval_cfg is not None else self.cfg.eval
        if not score_hl:
            eval_cfg = OmegaConf.merge(eval_cfg, {"hl_auroc": False})
        result = evaluate(module, dataset or self.val_set, eval_cfg, self.cfg.data, self.device, self.classes,
                          num_panel=self.cfg.eval.num_hl_maps, hl_offset=self.cfg.hl.offset)
        result["weights"], result["protocol"] = which, protocol_of(eval_cfg)
        if log and dataset is None:
            self.tracker.log("val", it, {**result["metrics"], **result["hl_auroc_kinds"],
                                         "eval_time": time.perf_counter() - t0, "protocol": result["protocol"]["mode"]})
            self.tracker.log_class_iou(it, {c: result["metrics"][f"IoU.{c}"] for c in self.classes})
        if log:
            self._log_panel(it, result["panel"])
        return result

    def _hl_snapshot(self, it: int) -> None:
        """HL-map snapshot between evaluations, on the same fixed val images as the evaluation panel."""
        fixed = Subset(self.val_set, list(range(min(self.cfg.eval.num_hl_maps, len(self.val_set)))))
        self.evaluate(it, dataset=fixed, score_hl=False)

    def _log_panel(self, it: int, panel) -> None:
        """HL-map panel image (+W&B), and the raw HL and CE-loss maps of those images for stability analysis."""
        if panel is None:  # only rank 0 collects the panel
            return
        self.tracker.log_hl_maps(it, panel["images"], panel["hl"], panel["labels"], panel["preds"],
                                 hard=panel["hard"])
        if panel["hl"] is not None:
            out = self.run_dir / "hl_maps"
            out.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(out / f"maps_{it:06d}.npz", hl=panel["hl"].numpy().astype(np.float16),
                                loss=panel["loss"].numpy().astype(np.float16),
                                label=panel["labels"].numpy().astype(np.uint8), hard=panel["hard"].numpy())

    def _save(self, it: int) -> None:
        if self.info.is_main:
            ckpt.atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "method": self.method.state_dict(), "iter": it, "best": self.best,
                              "rng": ckpt.rng_state()},
                             self.ckpt_dir / f"iter_{it:06d}.pth")
        barrier()

    def _update_best(self, it: int, result: dict) -> None:
        """Keep the best evaluation so far and the weights that produced it (checkpoints/best.pth).

        Like the references, the selection compares scores across protocols (eval.during) unless
        eval.select_from (or, when null, the method) says final_protocol."""
        metrics = result["metrics"]
        select_from = self.cfg.eval.select_from or self.method.select_from()
        if select_from == "final_protocol" and result["protocol"] != self.protocol:
            return
        if self.best is not None and not metrics["mIoU"] > self.best["mIoU"]:
            return
        module, which = self.method.eval_model(self.model)
        if self.info.is_main:
            ckpt.atomic_save({"model": module.state_dict(), "iter": it, "weights": which},
                             self.ckpt_dir / "best.pth")
        self.best = _summary_entry(it, metrics, result["protocol"], f"checkpoints/best.pth (iter {it})", which,
                                   self.classes)

    def _rescore_best(self) -> None:
        """Score the selected weights with the final protocol where another protocol selected them (U2PL's
        eval.py on ckpt_best.pth); the summary keeps both numbers."""
        selected_by = {k: v for k, v in (self.best or {}).get("protocol", {}).items() if k not in ("weights", "model")}
        if self.best is None or selected_by == self.protocol:
            return
        barrier()  # rank 0 wrote best.pth; every rank scores its shard of the val set with those weights
        module = copy.deepcopy(self.method.eval_model(self.model)[0])
        module.load_state_dict(ckpt.load_state(self.ckpt_dir / "best.pth")["model"])
        result = self.evaluate(self.best["iter"], module=module, log=False)
        self.best["rescored"] = _summary_entry(self.best["iter"], result["metrics"], self.protocol,
                                               self.best["protocol"]["weights"], self.best["protocol"]["model"],
                                               self.classes)

    def _finish(self, train_time: float) -> dict:
        """The recipe's protocol on the final weights (the mmseg tables report this LAST value, results.md §1)."""
        cfg, total = self.cfg, self.total
        final = self.evaluate(total)
        self._update_best(total, final)
        self._rescore_best()
        report_classes = list(cfg.data.get("report_classes") or [])
        summary = {
            "experiment": self.meta["experiment"], "suite": self.meta["suite"], "seed": int(cfg.seed),
            "iters": total, "setting": cfg.setting, "method": cfg.method.name, "hl": bool(cfg.hl.enabled),
            "model": cfg.model.name, "data": cfg.data.name, "split": self.split, "pretrained": pretrained_name(cfg),
            "precision": self.precision,
            "train_time_s": round(train_time, 2), "resumed_from": self.start_it or None,
            "s_per_iter": float(np.median(self.step_times)) if self.step_times else None,
            "memory_mb": (int(torch.cuda.max_memory_allocated(self.device) / 2**20)
                          if self.device.type == "cuda" else None),
            "final": _summary_entry(total, final["metrics"], self.protocol, f"final (iter {total})",
                                    final["weights"], self.classes),
            "best": self.best,
            "hl_auroc": final["hl_auroc"],
            "hl_auroc_kinds": final["hl_auroc_kinds"],
            "hard_kinds": list(cfg.data.get("hard_kinds") or []),
            "report_classes": report_classes,
            "report_IoU": _report_iou(final["metrics"], report_classes),
            "paper": _plain(cfg.paper),
            "batch": self.plan.as_dict(),
            **self.method.describe(),
        }
        self.tracker.write_summary(summary)
        self.tracker.finish(exit_code=0)
        return summary


class _Window:
    """Running sums of one logging window; losses stay on the device until the log point (no per-step sync)."""

    def __init__(self):
        self.data, self.start, self.n, self.logs = 0.0, time.perf_counter(), 0, {}

    def add(self, logs: dict, accum: int) -> None:
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v.detach().float() / accum

    def record(self, lr: float, it: int, device) -> dict:
        means = all_reduce_mean({k: v / self.n for k, v in self.logs.items()})
        values = {k: float(v) for k, v in means.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite loss at iteration {it}: {values}")
        record = {"lr": lr, "data_time": self.data / self.n, "time": (time.perf_counter() - self.start) / self.n,
                  **values}
        if device.type == "cuda":
            record["memory"] = int(torch.cuda.max_memory_allocated(device) / 2**20)
        return record


def _every(interval, it: int) -> bool:
    return bool(interval) and it % interval == 0


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if node is not None else None
