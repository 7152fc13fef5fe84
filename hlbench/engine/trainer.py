"""The iteration-based train loop shared by every method (`Trainer.fit`), and what only the loop needs.

Who owns the rest: building the run (run_parts.build_run), checkpoints (checkpoint.Checkpoints), best-checkpoint
selection (best.BestSelection), the non-finite guard (nonfinite.NonFiniteGuard), the summary (summary.run_summary),
HL-map snapshots (tracking.snapshots), evaluation (evaluator.evaluate) and pre-emption (preemption.StopSignals).
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from tqdm import tqdm

from ..data import normalize_batch
from ..data.bad_samples import bad_sample_files, restore_bad_sample_files
from ..data.sampling import stream_loader
from ..errors import ConfigError, RunStopped
from ..memory import available_memory, estimate_train_memory
from ..models import load_checkpoint
from ..tracking import Tracker
from ..tracking.snapshots import save_snapshot
from ..tracking.wandb_layout import run_identity
from ..weights import pretrained_name
from . import checkpoint as ckpt
from .best import BestSelection
from .cores import cpu_plan, loader_workers
from .distributed import DistInfo, all_reduce_mean, any_rank, barrier, host_group
from .evaluator import evaluate, hardness_kinds, protocol_of
from .nonfinite import NonFiniteGuard
from .optim import lr_at, set_lr
from .precision import autocast, grad_scaler
from .preemption import REQUEUE_EXIT, StopSignals, stop_exit_status
from .run_parts import build_run, uses_channels_last
from .summary import run_summary

log = logging.getLogger("hlbench")


def train(cfg, run_dir: Path, info: DistInfo, meta: dict) -> dict:
    """Train and evaluate one experiment in `run_dir`; returns the summary written to summary.json.

    Args:
        meta: run identity: experiment, suite, profile (None outside profiles) and name (the progress bar's).
    """
    trainer = Trainer(cfg, Path(run_dir), info, meta)
    try:
        with StopSignals() as stop:
            return trainer.fit(stop)
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
    """One run: built from the config (RunParts), resumed, trained, evaluated and recorded."""

    def __init__(self, cfg, run_dir: Path, info: DistInfo, meta: dict):
        self.cfg, self.run_dir, self.info, self.meta = cfg, run_dir, info, meta
        self.device = info.device
        self.parts = parts = build_run(cfg, info)
        self.model, self.method, self.optimizer, self.plan = parts.model, parts.method, parts.optimizer, parts.plan
        self.classes, self.streams = parts.classes, parts.streams
        self.total = int(cfg.train.iters)
        self.protocol = protocol_of(cfg.eval)
        self.host_group = host_group()  # ranks agree on stop requests and skips without a GPU sync
        self.checkpoints = ckpt.Checkpoints(run_dir / "checkpoints", int(cfg.train.keep_checkpoints))
        self.guard = NonFiniteGuard(int(cfg.train.skip_nonfinite), self.host_group, self.checkpoints.last_good)
        self.scaler = grad_scaler(self.device, cfg.train.precision)
        self.selection = BestSelection(cfg.eval.select_from or self.method.select_from(), self.protocol,
                                       self.classes, self.checkpoints, info.is_main)
        self.step_times: list[float] = []  # per logging window, for the s/iter reported next to the paper's
        self.train_time_before = 0.0  # seconds of training before a resume (summary.json counts the whole run)
        self.loaders: dict = {}  # the training streams, once fit() starts them
        self.bar = None  # fit()'s progress bar
        self.start_it, ranks = self._restore()
        self.identity = run_identity(cfg, meta["experiment"], meta["suite"], meta.get("profile"),
                                     pretrained=pretrained_name(cfg), method_tags=self.method.tags(),
                                     split=parts.split)
        self.tracker = Tracker(
            run_dir, cfg, logger=cfg.logger.name, project=cfg.logger.project, entity=cfg.logger.entity,
            **self.identity,
            class_names=self.classes, palette=parts.palette, rank=info.rank,
            resumed_from=self.start_it if ranks is not None else None,
            env_extra={"world_size": info.world_size, "seed": int(cfg.seed), "batch_plan": self.plan.as_dict(),
                       "precision": cfg.train.precision, "split": parts.split, **self.method.describe()})
        if ranks is not None:
            self._restore_rank(ranks)

    def _restore(self):
        """resume=true: full state from the newest readable checkpoint; init_from: weights only. Returns (iter,
        per-rank states).

        The iteration places the lr schedule and every data stream (their samplers restart at that sample); the
        per-rank states (RNG, BatchNorm statistics) are set once tracking has started."""
        cfg = self.cfg
        if cfg.resume and (state := self.checkpoints.latest()) is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):  # fp16's loss scale and its growth count; empty for the other precisions
                self.scaler.load_state_dict(state["scaler"])
            self.method.load_state_dict(state.get("method", {}))
            self.selection.best = state.get("best")
            self.guard.skipped = list(state.get("skipped_nonfinite", []))
            self.train_time_before = float(state.get("train_time_s", 0.0))
            self.step_times = list(state.get("step_times", []))
            restore_bad_sample_files(self.parts.datasets, state.get("bad_samples", {}))
            log.info("resumed from %s (iteration %d)", self.checkpoints.last_saved, state["iter"])
            return state["iter"], ckpt.rank_states(state)
        if cfg.init_from:
            # The checkpoint loader's report (loaded / missing / unexpected) and its refusal of a file that
            # matches fewer than half of the model's tensors.
            load_checkpoint(self.model, Path(cfg.init_from))
        return 0, None

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
                 plan.accum, cfg.optim.lr, cfg.train.precision, self.total, self.start_it)
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
        out["img"] = img.contiguous(memory_format=torch.channels_last) if uses_channels_last(self.cfg, self.device) \
            else img
        return out

    def fit(self, stop: StopSignals) -> dict:
        """Train from the restored iteration to the end, then evaluate. `stop` holds a stop signal received
        meanwhile: the loop then checkpoints at the end of the step and raises RunStopped."""
        cfg, info, accum = self.cfg, self.info, self.plan.accum
        if info.is_main:
            self._announce()
        train_model = torch.compile(self.model) if cfg.train.compile else self.model
        if info.world_size > 1:
            train_model = DistributedDataParallel(
                train_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        loaders = self.loaders = self._loaders()
        window = _Window()
        bar = self.bar = tqdm(total=self.total, initial=self.start_it, disable=not info.is_main,
                              desc=self.meta["name"], dynamic_ncols=True, mininterval=5)
        self.fit_start = time.perf_counter()
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
                with (nullcontext() if sync else train_model.no_sync()), autocast(self.device, cfg.train.precision):
                    loss, logs = self.method.step(train_model, batches, it)
                self.scaler.scale(loss / accum).backward()
                step_logs.append(logs)
            done, step = it + 1, _merged(step_logs, accum)
            if not self.guard.skip(done, step, [self.model.state_dict(), self.method.state_dict()]):
                if cfg.train.grad_clip:
                    self.scaler.unscale_(self.optimizer)  # fp16: clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
                # fp16: a step whose gradients overflowed is skipped here and the scale halved, as mmcv's
                # Fp16OptimizerHook does; its loss was finite, so it is no fault for the guard above.
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.method.after_step(self.model, done)
                window.add(done, step)
            window.n += 1
            bar.update(1)
            saving = _every(cfg.train.ckpt_interval, done) or done == self.total
            evaluating = done < self.total and _every(cfg.train.eval_interval, done)
            if done % cfg.train.log_interval == 0 or done == self.total:
                self.guard.check(window.steps)
                record = window.record(lr, done, self.device)
                if self.scaler.is_enabled():
                    record["loss_scale"] = self.scaler.get_scale()
                self.tracker.log("train", done, record)
                self.step_times.append(record["time"])
                bar.set_postfix(loss=f"{record.get('loss', math.nan):.3f}", data=f"{record['data_time']:.3f}s",
                                step=f"{record['time']:.3f}s")
                window = _Window()
            elif saving or evaluating:
                self.guard.check(window.steps)  # before best.pth or a checkpoint can take weights a bad step made
            t_eval = time.perf_counter()
            if evaluating:
                self.selection.update(done, self.validate(done, self._periodic_protocol(done)), self.method,
                                      self.model)
            elif done < self.total and cfg.hl.enabled and _every(cfg.train.hl_map_interval, done):
                self._hl_snapshot(done)
            # The logged `time` is the training step alone; evaluations report their own eval_time.
            window.start += time.perf_counter() - t_eval
            if saving:
                self._save(done)
            if any_rank(stop.received is not None, self.host_group):
                bar.close()
                self._stop_for_requeue(done, stop.received, window, saved=saving)
        bar.close()
        return self._finish()

    def _stop_for_requeue(self, it: int, signal_name: str | None, window: _Window, saved: bool) -> None:
        """Pre-emption or Ctrl-C: the state after step `it` on disk (unless this step saved it), W&B told,
        RunStopped with the signal's exit status."""
        if not saved:
            self.guard.check(window.steps)
            self._save(it)
        status = stop_exit_status(signal_name)
        self.tracker.finish(exit_code=status, preempted=True)
        then = "continue it" if status != REQUEUE_EXIT else "requeue the job"
        raise RunStopped(f"{signal_name or 'a stop signal (another rank)'} at iteration {it}: saved "
                         f"{self.checkpoints.path(it)}; {then} with resume=true (exit status {status})",
                         exit_code=status)

    def _periodic_protocol(self, it: int):
        """The eval config of a periodic evaluation: eval.during before its `until`, the final protocol after."""
        during = self.cfg.eval.during
        if during is None or it >= float(during.get("until", 1.0)) * self.total:
            return self.cfg.eval
        plain = OmegaConf.to_container(during, resolve=True)
        return OmegaConf.merge(self.cfg.eval, {k: v for k, v in plain.items() if k != "until"})

    def _score(self, module, dataset, eval_cfg) -> dict:
        """evaluator.evaluate of `module` (fp32, whatever the training precision), with its protocol."""
        result = evaluate(module, dataset, eval_cfg, self.cfg.data, self.device, self.classes,
                          num_panel=self.cfg.eval.num_hl_maps, hl_offset=self.cfg.hl.offset)
        result["protocol"] = protocol_of(eval_cfg)
        return result

    def validate(self, it: int, eval_cfg=None) -> dict:
        """The method's evaluated network on the val set under `eval_cfg` (default: the recipe's protocol), logged as a
        val line with per-class IoU, plus the HL-map panel and snapshot."""
        t0 = time.perf_counter()
        module, network = self.method.eval_model(self.model)
        result = self._score(module, self.parts.val_set, eval_cfg if eval_cfg is not None else self.cfg.eval)
        result["network"] = network
        self.tracker.log("val", it, {**result["metrics"], **result["hl_auroc_kinds"],
                                     "eval_time": time.perf_counter() - t0, "protocol": result["protocol"]["mode"]})
        self.tracker.log_class_iou(it, {c: result["metrics"][f"IoU.{c}"] for c in self.classes})
        self._log_panel(it, result["panel"])
        return result

    def _hl_snapshot(self, it: int) -> None:
        """HL-map panel and snapshot between evaluations, on the same fixed val images as the evaluation's."""
        val = self.parts.val_set
        fixed = Subset(val, list(range(min(self.cfg.eval.num_hl_maps, len(val)))))
        module, _ = self.method.eval_model(self.model)
        self._log_panel(it, self._score(module, fixed, OmegaConf.merge(self.cfg.eval, {"hl_auroc": False}))["panel"])

    def _log_panel(self, it: int, panel) -> None:
        """HL-map panel image (+W&B), and the raw HL and CE-loss maps of those images for stability analysis."""
        if panel is None:  # only rank 0 collects the panel
            return
        kinds = hardness_kinds(self.parts.val_set)
        self.tracker.log_hl_maps(it, panel["images"], panel["hl"], panel["labels"], panel["preds"],
                                 hard=panel["hard"], loss=panel["loss"], hard_bits=kinds)
        if panel["hl"] is not None:
            save_snapshot(self.run_dir, it, hl=panel["hl"].numpy(), loss=panel["loss"].numpy(),
                          label=panel["labels"].numpy(), hard=panel["hard"].numpy(), image=panel["images"].numpy(),
                          pred=panel["preds"].numpy(), classes=self.classes, palette=self.tracker.palette,
                          kinds=kinds)

    def _save(self, it: int) -> None:
        """The full training state after `it` iterations: rank 0 writes the shared state and every rank's own (RNG,
        BatchNorm statistics, the method's per-rank state)."""
        bad_samples = bad_sample_files(self.parts.datasets)  # every rank: it gathers theirs
        ranks = ckpt.gather_rank_states({
            "rng": ckpt.rng_state(self.device), "method": self.method.rank_state_dict(),
            "buffers": {name: b.detach().cpu().clone() for name, b in self.model.named_buffers()}}, self.host_group)
        if self.info.is_main:
            self.checkpoints.save(it, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "method": self.method.state_dict(), "iter": it, "best": self.selection.best,
                "skipped_nonfinite": self.guard.skipped, "bad_samples": bad_samples, "ranks": ranks,
                "train_time_s": self.train_time_before + time.perf_counter() - self.fit_start,
                "step_times": self.step_times})
        barrier()

    def _finish(self) -> dict:
        """The recipe's protocol on the final weights (the authors' mmseg tables report this LAST log.json value), the
        selected weights rescored, summary.json."""
        train_time = self.train_time_before + time.perf_counter() - self.fit_start
        final = self.validate(self.total)
        self.selection.update(self.total, final, self.method, self.model)
        self.selection.rescore(lambda module: self._score(module, self.parts.val_set, self.cfg.eval), self.method,
                               self.model)
        summary = run_summary(self.cfg, self.meta, self.parts, final=final, protocol=self.protocol,
                              best=self.selection.best, train_time=train_time, start_it=self.start_it,
                              step_times=self.step_times, skipped=self.guard.skipped, identity=self.identity,
                              device=self.device)
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


def _every(interval, it: int) -> bool:
    return bool(interval) and it % interval == 0
