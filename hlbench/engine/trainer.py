"""The iteration-based train loop shared by every method: data, accumulation, schedule, eval, checkpoints."""
from __future__ import annotations

import copy
import logging
import math
import random
import shutil
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
from ..data.bad_samples import bad_sample_files, bad_sample_report, restore_bad_sample_files
from ..data.files import check_mapped_labels
from ..data.sampling import stream_loader
from ..errors import ConfigError, RunStopped
from ..memory import available_memory, estimate_train_memory
from ..methods import build_method
from ..models import build_model, load_checkpoint
from ..tracking import Tracker
from ..tracking.wandb_layout import run_identity
from ..weights import pretrained_name
from . import checkpoint as ckpt
from .cores import cpu_plan, loader_workers
from .distributed import DistInfo, all_reduce_mean, any_rank, barrier, host_group, plan_batches
from .evaluator import evaluate, hardness_kinds, protocol_of
from .optim import build_optimizer, lr_at, set_lr
from .precision import allow_tf32, autocast
from .preemption import REQUEUE_EXIT, StopSignals, stop_exit_status

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
        meta: run identity: experiment, suite, profile (None outside profiles) and name (the progress bar's).
        hooks: test seam, e.g. {"stop_after": k} stops (as a killed job would) right after iteration k.
    """
    trainer = Trainer(cfg, Path(run_dir), info, meta)
    try:
        with StopSignals() as stop:
            return trainer.fit(hooks or {}, stop)
    except BaseException:
        trainer.tracker.finish(exit_code=1)
        raise
    finally:
        # Ends the loader workers now, whatever ended the run: they do not act on stop signals (preemption.py), so
        # left to the interpreter's exit they could outlive it.
        trainer.loaders.clear()
        if trainer.bar is not None:  # ends the progress line, so that an error message starts a line of its own
            trainer.bar.close()


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

        datasets = self.datasets = build_datasets(cfg.data, cfg.seed)
        self.split = split_record(cfg.data)  # the labeled / unlabeled partition of semi-supervised data
        self.val_set = datasets["val"]
        self.classes = list(datasets["train"].classes)
        self.palette = getattr(datasets["train"], "palette", None)
        check_mapped_labels(self.val_set)
        model = build_model(cfg.model, num_classes=len(self.classes), hl=cfg.hl, weights_dir=cfg.weights_dir)
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
        self.skip_limit = int(cfg.train.skip_nonfinite)
        self.skipped: list[int] = []  # iterations whose update was skipped for a non-finite loss
        self.last_saved: Path | None = None  # the newest checkpoint this run wrote or resumed from
        self.host_group = host_group()  # ranks agree on stop requests and skips without a GPU sync
        self.loaders: dict = {}  # the training streams, once fit() starts them
        self.bar = None  # fit()'s progress bar
        self.train_time_before = 0.0  # seconds of training before a resume (summary.json counts the whole run)
        self.start_it, self.best, ranks = self._restore()
        self.identity = run_identity(cfg, meta["experiment"], meta["suite"], meta.get("profile"),
                                     pretrained=pretrained_name(cfg), method_tags=self.method.tags(), split=self.split)
        self.tracker = Tracker(
            run_dir, cfg, logger=cfg.logger.name, project=cfg.logger.project, entity=cfg.logger.entity,
            **self.identity,
            class_names=self.classes, palette=self.palette, rank=info.rank,
            resumed_from=self.start_it if ranks is not None else None,
            env_extra={"world_size": info.world_size, "seed": int(cfg.seed), "batch_plan": self.plan.as_dict(),
                       "precision": self.precision, "split": self.split, **self.method.describe()})
        if ranks is not None:
            self._restore_rank(ranks)

    @property
    def channels_last(self) -> bool:
        return bool(self.cfg.train.channels_last) and self.device.type == "cuda"

    def _restore(self):
        """resume=true: full state from the newest readable checkpoint; init_from: weights only. Returns (iter, best,
        per-rank states).

        The iteration places the lr schedule and every data stream (their samplers restart at that sample); the
        per-rank states (RNG, BatchNorm statistics) are set once tracking has started."""
        cfg = self.cfg
        if cfg.resume and (found := ckpt.latest_valid_state(self.ckpt_dir)) is not None:
            latest, state = found
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state.get("method", {}))
            self.skipped = list(state.get("skipped_nonfinite", []))
            self.train_time_before = float(state.get("train_time_s", 0.0))
            self.step_times = list(state.get("step_times", []))
            restore_bad_sample_files(self.datasets, state.get("bad_samples", {}))
            self.last_saved = latest
            log.info("resumed from %s (iteration %d)", latest, state["iter"])
            return state["iter"], state.get("best"), ckpt.rank_states(state)
        if cfg.init_from:
            # The checkpoint loader's report (loaded / missing / unexpected) and its refusal of a file that
            # matches fewer than half of the model's tensors.
            load_checkpoint(self.model, Path(cfg.init_from))
        return 0, None, None

    @torch.no_grad()
    def _restore_rank(self, ranks: list[dict]) -> None:
        """Each rank's own RNG, BatchNorm statistics (DDP broadcasts rank 0's only at the next forward) and method
        state; with another world size than the checkpoint's, every rank re-seeded from (seed, rank, iteration)."""
        info = self.info
        if len(ranks) != info.world_size:
            ckpt.reseed(int(self.cfg.seed), info.rank, self.start_it)
            if info.is_main:
                log.warning("resuming %d process(es) from a checkpoint of %d: each rank's RNG is re-seeded from "
                            "(seed, rank, iteration %d), and BatchNorm statistics and method state are rank 0's",
                            info.world_size, len(ranks), self.start_it)
            return
        mine = ranks[info.rank]
        ckpt.set_rng_state(mine["rng"], self.device)
        if mine["buffers"] is not None:
            for name, buf in self.model.named_buffers():
                buf.copy_(mine["buffers"][name])
        self.method.load_rank_state_dict(mine["method"])

    def _loaders(self) -> dict:
        """One endless, resumable loader per stream, positioned after the samples already trained on."""
        loaders = {}
        for i, (name, stream) in enumerate(self.streams.items()):
            per_device = self.plan.per_device[name]
            # Streams draw different permutations; the first keeps the run seed's.
            loaders[name] = iter(stream_loader(
                stream.dataset, per_device, seed=int(self.cfg.seed) + 7919 * i, rank=self.info.rank,
                world=self.info.world_size, start=self.start_it * self.plan.accum * per_device,
                workers=loader_workers(int(self.cfg.train.num_workers), len(self.streams), cpu_plan().free),
                pin_memory=self.device.type == "cuda"))
        return loaders

    def _announce(self) -> None:
        cfg, plan = self.cfg, self.plan
        batches = ", ".join(f"{name} {plan.global_batch[name]} = {plan.world_size} device(s) x "
                            f"{plan.per_device[name]}" for name in plan.per_device)
        log.info("global batch %s x %d accumulation step(s); lr %g; %s; %d iterations (%d done)", batches,
                 plan.accum, cfg.optim.lr, self.precision, self.total, self.start_it)
        cpus, requested = cpu_plan(), int(cfg.train.num_workers)
        log.info(cpus.describe(loader_workers(requested, len(self.streams), cpus.free), requested))
        estimate = estimate_train_memory(cfg, len(self.classes), sum(plan.per_device.values()),
                                         cfg.data.train_pipeline.crop, labeled=next(iter(plan.per_device.values())))
        available = available_memory(self.device)
        line = estimate.describe(available)
        if available is None or estimate.total <= available:
            log.info(line)
        elif cfg.train.memory_check:  # a run past the memory is killed (SIGKILL) with no message, minutes in
            raise ConfigError(f"{line}: it does not fit; {estimate.what_fits(available, max(plan.per_device.values()))}"
                              f" (train.memory_check=false trains anyway)")
        else:
            log.warning("%s; training anyway (train.memory_check=false)", line)
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

    def fit(self, hooks: dict, stop: StopSignals) -> dict:
        """Train from the restored iteration to the end, then evaluate. `stop` holds a SIGTERM / SIGUSR1 received
        meanwhile: the loop then checkpoints at the end of the step and raises RunStopped(exit_code=REQUEUE_EXIT)."""
        cfg, info, accum = self.cfg, self.info, self.plan.accum
        if info.is_main:
            self._announce()
        train_model = torch.compile(self.model) if cfg.train.compile else self.model
        if info.world_size > 1:
            train_model = DistributedDataParallel(
                train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loaders = self.loaders = self._loaders()
        window = _Window()
        bar = self.bar = tqdm(total=self.total, initial=self.start_it, disable=not info.is_main, desc=self.meta["name"],
                   dynamic_ncols=True, mininterval=5)
        self.fit_start = train_start = time.perf_counter()
        self.model.train()
        for it in range(self.start_it, self.total):
            lr = lr_at(it, self.total, cfg.optim)
            set_lr(self.optimizer, lr)
            self.optimizer.zero_grad(set_to_none=True)
            step_logs = []
            for micro in range(accum):
                t0 = time.perf_counter()
                batches = {name: self._to_device(next(loader)) for name, loader in loaders.items()}
                window.data += time.perf_counter() - t0
                # Under DDP, gradients are all-reduced only on the last accumulation step.
                sync = micro == accum - 1 or info.world_size == 1
                with (nullcontext() if sync else train_model.no_sync()), autocast(self.device, self.precision):
                    loss, logs = self.method.step(train_model, batches, it)
                (loss / accum).backward()
                step_logs.append(logs)
            done, step = it + 1, _merged(step_logs, accum)
            if not self._skip_nonfinite(done, step):
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
                self.optimizer.step()
                self.method.after_step(self.model, done)
                window.add(done, step)
            window.n += 1
            bar.update(1)
            saving = _every(cfg.train.ckpt_interval, done) or done == self.total
            evaluating = done < self.total and _every(cfg.train.eval_interval, done)
            if done % cfg.train.log_interval == 0 or done == self.total:
                self._check_finite(window)
                record = window.record(lr, done, self.device)
                self.tracker.log("train", done, record)
                self.step_times.append(record["time"])
                bar.set_postfix(loss=f"{record.get('loss', math.nan):.3f}", data=f"{record['data_time']:.3f}s",
                                step=f"{record['time']:.3f}s")
                window = _Window()
            elif saving or evaluating:
                self._check_finite(window)  # before best.pth or a checkpoint can take weights a bad step made
            t_eval = time.perf_counter()
            if evaluating:
                self._update_best(done, self.evaluate(done, eval_cfg=self._periodic_protocol(done)))
            elif done < self.total and cfg.hl.enabled and _every(cfg.train.hl_map_interval, done):
                self._hl_snapshot(done)
            # The logged `time` is the training step alone; evaluations report their own eval_time.
            window.start += time.perf_counter() - t_eval
            if saving:
                self._save(done)
            if hooks.get("stop_after") == done:
                bar.close()
                self.tracker.finish(exit_code=1)
                return {"stopped_at": done}
            if any_rank(stop.received is not None, self.host_group):
                bar.close()
                self._stop_for_requeue(done, stop.received, window, saved=saving)
        bar.close()
        return self._finish(self.train_time_before + time.perf_counter() - train_start)

    def _skip_nonfinite(self, it: int, step: dict) -> bool:
        """With train.skip_nonfinite=K: True (no update) when a logged value of step `it` is not finite, up to K
        times in the run; a RunStopped beyond that, or when the bad values reached state a skip cannot restore.

        Deciding before the update needs the values on the host each step: the one sync per step this option costs
        (off, non-finite values are found at the next log point, evaluation or checkpoint, at no extra sync)."""
        if not self.skip_limit:
            return False
        bad = _first_nonfinite([(it, step)])
        if not any_rank(bad is not None, self.host_group):
            return False
        self.skipped.append(it)
        what = _terms(bad[1]) if bad else "on another rank"
        if len(self.skipped) > self.skip_limit:
            raise RunStopped(f"non-finite loss at iteration {it} ({what}): more than train.skip_nonfinite="
                             f"{self.skip_limit} steps skipped (iterations {self.skipped}); {self._last_good()}")
        if any_rank(not _all_finite([self.model.state_dict(), self.method.state_dict()]), self.host_group):
            raise RunStopped(f"non-finite loss at iteration {it} ({what}) reached the BatchNorm statistics or the "
                             f"method's state, which skipping the update cannot undo; {self._last_good()}")
        log.warning("non-finite loss at iteration %d (%s): update skipped (%d of train.skip_nonfinite=%d)", it,
                    what, len(self.skipped), self.skip_limit)
        return True

    def _check_finite(self, window: _Window) -> None:
        """A RunStopped naming the first non-finite logged value of the window's steps (one host transfer), so no
        log line, evaluation or checkpoint uses what it produced; the last good checkpoint stays the newest."""
        bad = window.first_nonfinite()
        if any_rank(bad is not None, self.host_group):
            where = f"at iteration {bad[0]} ({_terms(bad[1])})" if bad else "on another rank"
            raise RunStopped(f"non-finite loss {where}; stopped without saving: {self._last_good()}; "
                             f"train.skip_nonfinite=K would skip up to K such steps")

    def _last_good(self) -> str:
        return (f"the last good checkpoint is {self.last_saved}" if self.last_saved
                else "no checkpoint was written before it")

    def _stop_for_requeue(self, it: int, signal_name: str | None, window: _Window, saved: bool) -> None:
        """Pre-emption: the state after step `it` on disk (unless this step saved it), W&B told, RunStopped."""
        if not saved:
            self._check_finite(window)
            self._save(it)
        status = stop_exit_status(signal_name)
        self.tracker.finish(exit_code=status, preempted=True)
        then = "continue it" if status != REQUEUE_EXIT else "requeue the job"
        raise RunStopped(f"{signal_name or 'a stop signal (another rank)'} at iteration {it}: saved "
                         f"{self.ckpt_dir / _ckpt_name(it)}; {then} with resume=true (exit status {status})",
                         exit_code=status)

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
        kinds = hardness_kinds(self.val_set)
        self.tracker.log_hl_maps(it, panel["images"], panel["hl"], panel["labels"], panel["preds"],
                                 hard=panel["hard"], loss=panel["loss"], hard_bits=kinds)
        if panel["hl"] is not None:
            out = self.run_dir / "hl_maps"
            out.mkdir(parents=True, exist_ok=True)
            # image, pred, class names, palette and the kinds' names/bits: analysis redraws the panel from the file
            np.savez_compressed(out / f"maps_{it:06d}.npz", hl=panel["hl"].numpy().astype(np.float16),
                                loss=panel["loss"].numpy().astype(np.float16),
                                label=panel["labels"].numpy().astype(np.uint8), hard=panel["hard"].numpy(),
                                image=panel["images"].numpy().astype(np.uint8),
                                pred=panel["preds"].numpy().astype(np.uint8),
                                classes=np.array(self.classes, dtype=str),
                                palette=np.array(self.tracker.palette, np.uint8).reshape(-1, 3),
                                kinds=np.array(list(kinds), dtype=str), bits=np.array(list(kinds.values()), np.int64))

    def _save(self, it: int) -> None:
        """The full training state after `it` iterations, then train.keep_checkpoints pruning of older ones."""
        bad_samples = bad_sample_files(self.datasets)  # every rank: it gathers theirs
        ranks = ckpt.gather_rank_states({
            "rng": ckpt.rng_state(self.device), "method": self.method.rank_state_dict(),
            "buffers": {name: b.detach().cpu().clone() for name, b in self.model.named_buffers()}}, self.host_group)
        if self.info.is_main:
            path = self.ckpt_dir / _ckpt_name(it)
            self._write({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "method": self.method.state_dict(), "iter": it, "best": self.best,
                         "skipped_nonfinite": self.skipped, "bad_samples": bad_samples, "ranks": ranks,
                         "train_time_s": self.train_time_before + time.perf_counter() - self.fit_start,
                         "step_times": self.step_times}, path)
            self.last_saved = path
            ckpt.prune_checkpoints(self.ckpt_dir, int(self.cfg.train.keep_checkpoints), path)
        barrier()

    def _write(self, state: dict, path: Path) -> None:
        """ckpt.atomic_save; a failed write (full disk, quota, I/O error) leaves the earlier files as they were and
        stops the run in one line saying so."""
        try:
            ckpt.atomic_save(state, path)
        except (OSError, RuntimeError) as err:  # torch.save reports a short write as a RuntimeError
            free = shutil.disk_usage(path.parent).free / 2**20
            raise RunStopped(f"could not write {path} ({type(err).__name__}: {err}; {free:.0f} MiB free there); the "
                             f"files already there are unchanged ({self._last_good()}); free space, then "
                             f"resume=true") from err

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
            self._write({"model": module.state_dict(), "iter": it, "weights": which}, self.ckpt_dir / "best.pth")
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
            "experiment": self.meta["experiment"], "suite": self.meta["suite"], "profile": self.meta.get("profile"),
            "seed": int(cfg.seed),
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
            "skipped_nonfinite": {"count": len(self.skipped), "iters": self.skipped},
            "bad_samples": bad_sample_report(self.datasets),  # data.on_bad_sample=skip: files left out, per split
            "paper": _plain(cfg.paper),
            "batch": self.plan.as_dict(),
            "wandb_run": self.identity,  # name, group, job_type, tags of the W&B run (analysis.dashboard reads them)
            **self.method.describe(),
        }
        self.tracker.write_summary(summary)
        self.tracker.finish(exit_code=0)
        return summary


class _Window:
    """The steps of one logging window; their logged values stay on the device until the log point (no per-step
    sync). `n` counts every step (for the timings), `steps` those that updated the weights."""

    def __init__(self):
        self.data, self.start, self.n, self.steps = 0.0, time.perf_counter(), 0, []

    def add(self, it: int, logs: dict) -> None:
        self.steps.append((it, logs))

    def first_nonfinite(self) -> tuple[int, dict] | None:
        return _first_nonfinite(self.steps)

    def record(self, lr: float, it: int, device) -> dict:
        keys = dict.fromkeys(k for _, logs in self.steps for k in logs)
        means = all_reduce_mean({k: torch.stack([logs[k] for _, logs in self.steps if k in logs]).mean()
                                 for k in keys})
        record = {"lr": lr, "data_time": self.data / self.n, "time": (time.perf_counter() - self.start) / self.n,
                  **{k: float(v) for k, v in means.items()}}
        if device.type == "cuda":
            record["memory"] = int(torch.cuda.max_memory_allocated(device) / 2**20)
        return record


def _merged(step_logs: list[dict], accum: int) -> dict:
    """One iteration's logged values (device scalars): the mean over its accumulation steps."""
    merged = {}
    for logs in step_logs:
        for k, v in logs.items():
            merged[k] = merged.get(k, 0.0) + v.detach().float() / accum
    return merged


def _first_nonfinite(steps: list[tuple[int, dict]]) -> tuple[int, dict] | None:
    """(iteration, {key: value}) of the first step with a non-finite logged value, or None; one host transfer."""
    if not steps:
        return None
    flat = iter(torch.stack([v for _, logs in steps for v in logs.values()]).tolist())
    for it, logs in steps:
        bad = {k: v for k, v in zip(logs, flat) if not math.isfinite(v)}
        if bad:
            return it, bad
    return None


def _terms(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _all_finite(state) -> bool:
    """Whether every floating-point tensor in nested dicts and lists (state dicts) is finite."""
    if torch.is_tensor(state):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_all_finite(v) for v in state)
    return True


def _ckpt_name(it: int) -> str:
    return f"iter_{it:06d}.pth"


def _every(interval, it: int) -> bool:
    return bool(interval) and it % interval == 0


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if node is not None else None
