"""Tracker: the run folder is the source of truth; W&B mirrors it and may fail without stopping training."""
from __future__ import annotations

import datetime
import logging
import netrc
import numbers
import os
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

from hlbench.errors import ConfigError
from hlbench.tracking.environment import environment_record
from hlbench.tracking.hl_maps import (as_maps, colorize_hl, default_palette, hl_panel_figure, image_to_hwc,
                                      resize_map, save_figure, to_numpy)
from hlbench.tracking.run_folder import (CONFIG_FILE, METRICS_FILE, RESUME_MODE, append_jsonl,
                                         atomic_write_json, atomic_write_text, atomic_write_yaml, flatten,
                                         read_yaml, to_plain, write_config)
from hlbench.tracking.wandb_layout import define_metrics

log = logging.getLogger(__name__)

LOGGERS = ("wandb", "none")
WANDB_ID_FILE = "wandb_id.txt"


def _has_wandb_credentials() -> bool:
    """True when an API key is available (env var or a ~/.netrc entry for the W&B host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE if set, else online with credentials and offline without.

    Online mode with a key but no network hangs ~100 s before failing, so no key must mean offline.
    """
    return os.environ.get("WANDB_MODE") or ("online" if _has_wandb_credentials() else "offline")


class Tracker:
    """Writes config.yaml, env.json, metrics.jsonl, summary.json, hl_maps/ and mirrors them to W&B.

    Args:
        run_dir: the run folder (created).
        config: resolved config (dict or DictConfig).
        logger: "wandb" or "none" ("none" never imports wandb).
        palette: class colours for HL-map panels; a tab20 palette when None.
        env_extra: engine facts stored in env.json (world size, seeds, effective batch).
        resumed_from: iteration of the checkpoint this run continues from, None for a fresh start.
        rank: only rank 0 writes anything.
        entity: the W&B team or user that owns the run; None is the API key's default entity.
    """

    def __init__(self, run_dir, config, *, logger: str = "none", project: str = "hlbench",
                 entity: str | None = None, group: str | None = None, job_type: str | None = None, tags=(),
                 name: str | None = None, class_names=(), palette=None, env_extra: dict | None = None,
                 resumed_from: int | None = None, rank: int = 0):
        if logger not in LOGGERS:
            raise ConfigError(f"tracking logger must be one of {LOGGERS}, got {logger!r}")
        self.active = rank == 0
        self.run_dir = Path(run_dir)
        self.class_names = list(class_names)
        self.name = name or f"{self.run_dir.parent.name}/{self.run_dir.name}"  # the panels' titles
        self.palette = list(palette) if palette is not None else default_palette(len(self.class_names))
        self._wandb = None
        self._run = None
        self._last_step = -1
        self._finished = False
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = to_plain(config)
        self._write_provenance(config, env_extra or {}, resumed_from)
        if logger == "wandb":
            self._start_wandb(config, project=project, entity=entity, group=group, job_type=job_type,
                              tags=list(tags), name=name)

    def _write_provenance(self, config: dict, env_extra: dict, resumed_from: int | None) -> None:
        """Fresh run: config.yaml + env.json. Resume: keep those; record the new env (and config if changed)."""
        env = environment_record(env_extra)
        config_path = self.run_dir / CONFIG_FILE
        if resumed_from is None or not config_path.exists():
            write_config(self.run_dir, config)
            atomic_write_json(self.run_dir / "env.json", env)
        else:
            suffix = f"resume-{resumed_from}"
            atomic_write_json(self.run_dir / f"env.{suffix}.json", env)
            if read_yaml(config_path) != config:
                atomic_write_yaml(self.run_dir / f"config.{suffix}.yaml", config)
        if resumed_from is not None:
            append_jsonl(self.run_dir / METRICS_FILE, {
                "mode": RESUME_MODE, "iter": int(resumed_from),
                "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
            self._last_step = int(resumed_from)

    def _start_wandb(self, config: dict, **init_kwargs) -> None:
        mode = wandb_mode()
        if mode == "offline":
            # offline init still makes a telemetry call unless error reporting is off
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        try:
            import wandb
        except ImportError as e:
            log.warning("W&B logging disabled: cannot import wandb (%s); local files are still written", e)
            return
        self._wandb = wandb
        id_file = self.run_dir / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters/digits
            atomic_write_text(id_file, run_id + "\n")
        # one W&B run per run folder: a resumed job continues the same W&B run instead of starting a new one.
        # finish_previous: in a Hydra multirun (one process) a run left open by a failed job must not absorb this one
        # silent: W&B's start banner and end-of-run history/summary panel (dozens of lines per run) would bury the
        # results table; it still records everything and W&B warnings still print. Console capture stays on (the
        # run's Logs tab): W&B's default tees Python's stdout/stderr writes and unhooks at finish, before the table.
        self._run = self._call(wandb.init, id=run_id, resume="allow", mode=mode, config=config,
                               dir=os.environ.get("WANDB_DIR", str(self.run_dir)), reinit="finish_previous",
                               settings=wandb.Settings(silent=True), **init_kwargs)
        if self._run is not None:
            self._last_step = max(self._last_step, (self._run.step or 0) - 1)
            self._call(define_metrics, self._run, self.class_names)
        if self._run is not None:
            self._call(self._announce_run)

    def _announce_run(self) -> None:
        """Our one console line in place of W&B's: where the run is, printed at the start so a killed job has it too."""
        if self._run.disabled:
            return
        if self._run.offline:
            line = f"W&B offline run; to upload it: wandb sync {self._run.sync_dir}"
        else:
            line = f"W&B run: {self._run.url}"
        print(line, file=sys.stderr, flush=True)

    def _call(self, fn, *args, **kwargs):
        """Run a W&B call; on any error warn once and switch W&B off for the rest of the run."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a tracking failure must never stop training
            log.warning("W&B disabled for the rest of this run after an error in %s: %r",
                        getattr(fn, "__name__", fn), e)
            self._run = None
            return None

    def _wandb_log(self, data: dict, it: int) -> None:
        """Log at step=it; a step below the last logged one (W&B rejects it) goes to the summary instead."""
        if self._run is None:
            return
        if it < self._last_step:
            self._call(self._run.summary.update, data)
            return
        self._last_step = it
        self._call(self._run.log, data, step=it)

    def log(self, mode: str, it: int, metrics: dict) -> None:
        """Append {"mode", "iter", **metrics} to metrics.jsonl and log numeric values as W&B "<mode>/<key>"."""
        if not self.active:
            return
        append_jsonl(self.run_dir / METRICS_FILE, {"mode": mode, "iter": int(it), **metrics})
        scalars = {f"{mode}/{k}": v for k, v in to_plain(metrics).items()
                   if isinstance(v, numbers.Number) and not isinstance(v, bool)}
        self._wandb_log(scalars, int(it))

    def log_hl_maps(self, it: int, images, hl, labels, preds, hard=None, loss=None, hard_bits=None) -> Path | None:
        """Save the HL-map panel to hl_maps/iter_<it>.png; log it, and each image and HL map with class masks, to W&B.

        `loss` (per-pixel CE) and `hard_bits` ({kind: bit} of the `hard` mask) add the loss and hardness-kind columns.
        """
        if not self.active:
            return None
        fig = hl_panel_figure(labels, preds, self.palette, images=images, hl=hl, loss=loss, hard=hard,
                              hard_bits=hard_bits, title=f"{self.name}, iteration {int(it)}",
                              class_names=self.class_names or None)
        path = save_figure(fig, self.run_dir / "hl_maps" / f"iter_{int(it):06d}.png")
        if self._run is not None:
            data = self._call(self._hl_media, path, images, hl, to_numpy(labels), to_numpy(preds))
            if data is not None:
                self._wandb_log(data, int(it))
        return path

    def _hl_media(self, panel: Path, images, hl, labels, preds) -> dict:
        """The panel, and per image the image and its HL map with W&B's toggleable prediction / ground-truth masks."""
        names = dict(enumerate(self.class_names)) | {255: "ignore"}

        def with_masks(rgb, i):
            return self._wandb.Image(rgb, caption=f"image {i}", masks={
                "prediction": {"mask_data": preds[i], "class_labels": names},
                "ground_truth": {"mask_data": labels[i], "class_labels": names}})

        data = {"hl_maps/panel": self._wandb.Image(str(panel), caption="image | ground truth | prediction | HL map"
                                                                       " | CE loss | hardness kinds"),
                "hl_maps/image": [with_masks(image_to_hwc(images[i], labels[i].shape), i) for i in range(len(labels))]}
        if hl is not None:
            hl = as_maps(hl)
            data["hl_maps/hl"] = [with_masks(colorize_hl(resize_map(hl[i], labels[i].shape)), i)
                                  for i in range(len(labels))]
        return data

    def log_class_iou(self, it: int, iou: dict) -> None:
        """Per-class IoU as a W&B table (metrics.jsonl already holds IoU.<class> from the val line)."""
        if not self.active or self._run is None:
            return
        table = self._call(self._wandb.Table, columns=["class", "IoU"],
                           data=[[c, to_plain(v)] for c, v in iou.items()])
        if table is not None:
            self._wandb_log({"val/class_IoU": table}, int(it))

    def write_summary(self, summary: dict) -> None:
        """Write summary.json atomically and copy its non-null values into the W&B run summary."""
        if not self.active:
            return
        atomic_write_json(self.run_dir / "summary.json", summary)
        if self._run is not None:
            flat = {k: v for k, v in flatten(to_plain(summary), sep="/").items() if v is not None}
            self._call(self._run.summary.update, flat)

    def finish(self, exit_code: int = 0, preempted: bool = False) -> None:
        """Finish the W&B run (one finished run per Hydra multirun job); safe to call more than once.

        `preempted`: W&B shows the run as preempted (to be resumed), not as failed."""
        if self._finished:
            return
        self._finished = True
        if self._run is not None and preempted:
            self._call(self._run.mark_preempting)
        if self._run is not None:
            self._call(self._run.finish, exit_code=exit_code)
            self._run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
