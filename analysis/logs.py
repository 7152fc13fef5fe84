"""Training and evaluation logs into pandas, one schema for every source.

Sources: the HL authors' mmsegmentation 0.x `*.log.json`, mmengine text logs (mmseg 1.x: Mask2Former, SegFormer),
U2PL `eval.py` logs, UniMatch training logs, and hlbench run folders. `read_log` picks the reader.

One row per logged line (a training window or an evaluation). Columns, in this order:
- run identity, the same on every row: `run` (the log's path or run folder), `format`, `config` (config /
  experiment name), `hl` (True / False, <NA> where the log does not say), `hardware` ("4 × NVIDIA A100-PCIE-40GB"),
  `gpus`, `batch` (images per iteration over all GPUs), `save_best` (the metric the run kept its best checkpoint
  on, None when it kept none);
- per line: `mode` (train / val / test), `iter` (the training iteration: for an evaluation, the iteration of the
  model evaluated; <NA> where the log does not say), `epoch`, `protocol` (evaluation mode where logged), `lr`,
  `s_per_iter`, `data_time`, `memory_mb` (train lines), `loss`, `aAcc`, `mIoU`, `mAcc`;
- `IoU.<class>` and `Acc.<class>` in the log's class order, then every other logged key under its own name
  (loss terms, `*.acc_seg` which mmseg logs in %).

Metrics (aAcc, mIoU, mAcc, IoU.*, Acc.*) are fractions in [0, 1] whatever the log printed (mmengine, U2PL and
UniMatch print %).
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import pandas as pd

from analysis.runs import SUMMARY_FILE, read_metrics
from hlbench.errors import ConfigError, MissingInputError
from hlbench.tracking.run_folder import read_json, read_jsonl

RUN_COLUMNS = ("run", "format", "config", "hl", "hardware", "gpus", "batch", "save_best")
LINE_COLUMNS = ("mode", "iter", "epoch", "protocol", "lr", "s_per_iter", "data_time", "memory_mb", "loss",
                "aAcc", "mIoU", "mAcc")
METRICS = ("aAcc", "mIoU", "mAcc")
ENV_FILE = "env.json"

_SAVE_BEST = re.compile(r"save_best\s*=\s*['\"]([^'\"]+)['\"]")
_ENV_GPUS = re.compile(r"^\s*GPU ([\d,]+): (.+?)\s*$", re.M)


# ---------------------------------------------------------------- shared pieces


def _frame(records: list[dict], run: dict) -> pd.DataFrame:
    """Rows -> the schema's column order; the run identity repeated on every row."""
    df = pd.DataFrame([{**run, **r} for r in records])
    for col in (*RUN_COLUMNS, *LINE_COLUMNS):
        if col not in df.columns:
            df[col] = None
    rest = [c for c in df.columns if c not in RUN_COLUMNS and c not in LINE_COLUMNS]
    per_class = [c for c in rest if c.startswith("IoU.")] + [c for c in rest if c.startswith("Acc.")]
    df = df[[*RUN_COLUMNS, *LINE_COLUMNS, *per_class, *[c for c in rest if c not in per_class]]]
    for col in ("iter", "epoch", "gpus", "batch"):
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    df["hl"] = df["hl"].astype("boolean")
    return df


def _hardware(env_text: str, gpus: int | None) -> tuple[str | None, int | None]:
    """("N × <GPU name>", N) from an environment dump's `GPU 0,1,2,3: <name>` lines.

    N is the run's GPU count when the config gives it (the machine may show more GPUs than the run used), else
    the number of ids listed; GPUs of different kinds are listed one kind after the other.
    """
    found = _ENV_GPUS.findall(env_text)
    if not found:
        return None, gpus
    if gpus is None:
        gpus = sum(len(ids.split(",")) for ids, _ in found)
    names = list(dict.fromkeys(name for _, name in found))
    return (f"{gpus} × {names[0]}" if len(names) == 1 else " + ".join(
        f"{len(ids.split(','))} × {name}" for ids, name in found)), gpus


def _first_int(pattern: str, text: str) -> int | None:
    m = re.search(pattern, text, re.M | re.S)
    return int(m.group(1)) if m else None


def _batch(per_gpu: int | None, gpus: int | None) -> int | None:
    return per_gpu * gpus if per_gpu is not None and gpus is not None else None


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


# ---------------------------------------------------------------- mmseg 0.x log.json


def _mmseg_gpus(config: str) -> int | None:
    m = re.search(r"^gpu_ids\s*=\s*range\((\d+),\s*(\d+)\)", config, re.M)
    if m:
        return int(m.group(2)) - int(m.group(1))
    m = re.search(r"^gpu_ids\s*=\s*\[([\d,\s]*)\]", config, re.M)
    return len([i for i in m.group(1).split(",") if i.strip()]) if m else None


def _model_type(config: str) -> str | None:
    m = re.search(r"^model\s*=\s*dict\(\s*type\s*=\s*'([^']+)'", config, re.M)
    return m.group(1) if m else None


def read_mmseg_json(path) -> pd.DataFrame:
    """An mmseg 0.x `*.log.json`: the header line, then train and val lines.

    mmseg's val-line `iter` counts val dataloader steps per GPU (125 on Cityscapes with 4 GPUs), not training
    iterations: an evaluation gets the `iter` of the train line before it, the model it evaluated.
    """
    path = Path(path)
    lines = read_jsonl(path)
    if not lines or "mode" in lines[0] or "env_info" not in lines[0]:
        raise ConfigError(f"{path}: not an mmseg 0.x log.json (line 1 must be the header with env_info)")
    header, config = lines[0], str(lines[0].get("config", ""))
    classes = list(header.get("CLASSES") or [])
    gpus = _mmseg_gpus(config)
    hardware, gpus = _hardware(str(header.get("env_info", "")), gpus)
    model = _model_type(config)
    save_best = _SAVE_BEST.search(config)
    run = {"run": str(path), "format": "mmseg_json", "config": header.get("exp_name"),
           # the authors' HL runs use their Weighted(Cascade)EncoderDecoder, the baselines mmseg's own
           "hl": None if model is None else model.startswith("Weighted"),
           "hardware": hardware, "gpus": gpus,
           "batch": _batch(_first_int(r"samples_per_gpu\s*=\s*(\d+)", config), gpus),
           "save_best": save_best.group(1) if save_best else None}
    records, train_iter = [], None
    for line in lines[1:]:
        mode = line.get("mode")
        if mode == "train":
            rec = dict(line)
            train_iter = rec["iter"]
            rec["s_per_iter"] = rec.pop("time", None)
            rec["memory_mb"] = rec.pop("memory", None)
        elif mode == "val":
            rec = {k: v for k, v in line.items() if k != "iter"}
            rec["iter"] = train_iter
            missing = [c for c in classes if f"IoU.{c}" not in line]
            if missing:
                raise ConfigError(f"{path}: a val line lacks IoU of classes {missing[:3]} named in the header")
        else:
            continue  # a further header (none in the authors' logs)
        records.append(rec)
    return _frame(records, run)


# ---------------------------------------------------------------- mmengine text log

_MMENGINE_LINE = re.compile(r"^(?:\d{4}/)?\d{2}/\d{2} \d{2}:\d{2}:\d{2} - mmengine - \w+ -\s?(.*)$")
_ITER = re.compile(r"^Iter\((train|val|test)\)\s*\[\s*(\d+)\s*/\s*\d+\]\s*(.*)$", re.S)


def _pairs(text: str) -> dict:
    """`lr: 1.9e-06  eta: 10:09:17  time: 0.16` -> numeric pairs only (eta is a clock, not a number)."""
    out = {}
    for part in re.split(r"\s{2,}", text.strip()):
        key, sep, value = part.partition(": ")
        number = _number(value.strip()) if sep else None
        if number is not None:
            out[key.strip()] = number
    return out


def _prettytable(text: str) -> dict:
    """mmengine's per-class table (`| Class | IoU | Acc |`, values in %) -> {"IoU.<class>": fraction, ...}."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.strip().startswith("|")]
    if not rows:
        return {}
    head, out = rows[0], {}
    for row in rows[1:]:
        for name, value in zip(head[1:], row[1:]):
            number = _number(value)
            out[f"{name}.{row[0]}"] = None if number is None else number / 100
    return out


def _messages(path: Path) -> list[str]:
    """The log's messages: a prefixed line plus the unprefixed lines after it (config, env, tables)."""
    messages = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _MMENGINE_LINE.match(line)
        if m:
            messages.append(m.group(1))
        elif messages:
            messages[-1] += "\n" + line
    return messages


def read_mmengine_log(path) -> pd.DataFrame:
    """An mmengine text log: `Iter(train)` lines, and per evaluation the per-class table then `Iter(val) [n/n]`."""
    path = Path(path)
    messages = _messages(path)
    if not messages:
        raise ConfigError(f"{path}: no `... - mmengine - INFO - ...` lines: not an mmengine log")
    config = next((m[len("Config:"):] for m in messages if m.startswith("Config:")), "")
    env = next((m for m in messages if "System environment" in m), "")
    gpus = _first_int(r"GPU number:\s*(\d+)", env)
    if gpus is None and "Distributed training: False" in env:
        gpus = 1
    hardware, gpus = _hardware(env, gpus)
    model = _model_type(config)
    save_best = _SAVE_BEST.search(config)
    work_dir = re.search(r"^work_dir\s*=\s*'([^']+)'", config, re.M)
    records, train_iter, per_class = [], None, {}
    for msg in messages:
        if msg.startswith("per class results:") or msg.lstrip("\n").startswith("+-"):
            per_class.update(_prettytable(msg))
            continue
        m = _ITER.match(msg)
        if not m:
            continue
        mode, step, pairs = m.group(1), int(m.group(2)), _pairs(m.group(3))
        if mode == "train":
            train_iter = step
            rec = {"mode": mode, "iter": step, **pairs}
            rec["s_per_iter"] = rec.pop("time", None)
            rec["memory_mb"] = rec.pop("memory", None)
        elif "mIoU" in pairs:  # the result line; progress lines (`Iter(val) [50/500] eta ...`) carry no metric
            rec = {"mode": mode, "iter": train_iter if mode == "val" else None,
                   **{k: pairs[k] / 100 for k in METRICS if k in pairs}, **per_class}
            per_class = {}
        else:
            continue
        records.append(rec)
    trained = [r for r in records if r["mode"] == "train"]
    run = {"run": str(path), "format": "mmengine", "config": Path(work_dir.group(1)).name if work_dir else None,
           # SegFormer+HL logs its EncoderDecoderWeight and a weight_loss term; Mask2Former+HL reads a precomputed
           # HL map through the data pipeline, which the log does not name: unknown there
           "hl": True if (model and "Weight" in model) or any("weight_loss" in r for r in trained) else None,
           "hardware": hardware, "gpus": gpus,
           "batch": _batch(_first_int(r"^train_dataloader\s*=\s*dict\(.*?batch_size\s*=\s*(\d+)", config), gpus),
           "save_best": save_best.group(1) if save_best else None}
    return _frame(records, run)


# ---------------------------------------------------------------- U2PL eval.py and UniMatch logs

_U2PL_CLASS = re.compile(r"\* class \[(\d+)\] IoU ([\d.]+)\s*$")
_U2PL_MIOU = re.compile(r"\* (?:epoch (\d+) )?mIoU ([\d.]+)\s*$")
_U2PL_ARGS = re.compile(r"\] Namespace\((.*)\)\s*$")
_U2PL_CKPT = re.compile(r"=> load checkpoint\[(\w+)\]")


def read_u2pl_eval(path) -> pd.DataFrame:
    """A U2PL `eval.py` log (`val_best_*.txt` / `val_last_*.txt`): ` * class [i] IoU x` lines, then ` * mIoU x`.

    The log names no classes: IoU columns are `IoU.<trainId>`. It evaluates a saved checkpoint, so there is no
    training iteration.
    """
    path = Path(path)
    args, key, per_class, records = "", None, {}, []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("["):
            continue  # Python warnings and print() output between the logger's lines
        if m := _U2PL_ARGS.search(line):
            args = m.group(1)
        elif m := _U2PL_CKPT.search(line):
            key = m.group(1)
        elif m := _U2PL_CLASS.search(line):
            per_class[f"IoU.{m.group(1)}"] = float(m.group(2)) / 100
        elif m := _U2PL_MIOU.search(line):
            records.append({"mode": "val", "epoch": m.group(1), "mIoU": float(m.group(2)) / 100, **per_class})
            per_class = {}
    if not records:
        raise ConfigError(f"{path}: no ` * mIoU <value>` line: not a U2PL evaluation log")
    model_path = re.search(r"model_path='([^']*)'", args)
    protocol = " ".join(p for p in (model_path and model_path.group(1), key and f"[{key}]") if p) or None
    for rec in records:
        rec["protocol"] = protocol
    config = re.search(r"config='([^']*)'", args)
    run = {"run": str(path), "format": "u2pl_eval", "config": config.group(1) if config else None,
           "hl": None, "hardware": None, "gpus": None, "batch": None,
           "save_best": "mIoU" if model_path and "best" in Path(model_path.group(1)).name else None}
    return _frame(records, run)


_UNIMATCH_EPOCH = re.compile(r"=+> Epoch: (\d+), LR: ([\d.eE+-]+)(.*)$")
_UNIMATCH_ITERS = re.compile(r"Iters: (\d+)[,\s](.*)$")
_UNIMATCH_CLASS = re.compile(r"\*{5} Evaluation[^>]*>>>> Class \[(\d+) ([^\]]+)\] IoU: ([\d.]+)")
_UNIMATCH_MEAN = re.compile(r"\*{5} Evaluation\s*\(?(\w*)\)?\s*\*{5} >>>> mean ?IoU: ([\d.]+)", re.I)


def read_unimatch_log(path) -> pd.DataFrame:
    """A UniMatch training log: `===========> Epoch: e, LR: ...` per epoch, `Iters: i, Total loss: ...` lines,
    and per evaluation `***** Evaluation <mode> ***** >>>> meanIOU: x` (optionally after per-class lines).

    `Iters` counts within the epoch, so rows carry `epoch` and no training iteration; `protocol` is the
    evaluation mode (center_crop / sliding_window / original).
    """
    path = Path(path)
    records, epoch, per_class, best_kept = [], None, {}, False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := _UNIMATCH_EPOCH.search(line):
            epoch, best_kept = int(m.group(1)), best_kept or "Previous best" in m.group(3)
        elif m := _UNIMATCH_ITERS.search(line):
            rec = {"mode": "train", "epoch": epoch}
            for part in m.group(2).split(","):
                name, sep, value = part.partition(":")
                number = _number(value.strip()) if sep else None
                if number is not None:
                    name = name.strip().lower()
                    rec["loss" if name == "total loss" else name.replace(" ", "_")] = number
            records.append(rec)
        elif m := _UNIMATCH_CLASS.search(line):
            per_class[f"IoU.{m.group(2).strip()}"] = float(m.group(3)) / 100
        elif m := _UNIMATCH_MEAN.search(line):
            records.append({"mode": "val", "epoch": epoch, "protocol": m.group(1) or None,
                            "mIoU": float(m.group(2)) / 100, **per_class})
            per_class = {}
    if not any(r["mode"] == "val" for r in records):
        raise ConfigError(f"{path}: no `***** Evaluation ... meanIOU` line: not a UniMatch log")
    run = {"run": str(path), "format": "unimatch", "config": None, "hl": None, "hardware": None, "gpus": None,
           "batch": None, "save_best": "mIoU" if best_kept else None}  # it saves best.pth on each new best
    return _frame(records, run)


# ---------------------------------------------------------------- hlbench run folders


def read_run_folder(run_dir) -> pd.DataFrame:
    """An hlbench run folder's metrics.jsonl (resumes applied, analysis.runs.read_metrics) in the common schema."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / SUMMARY_FILE)
    env = read_json(run_dir / ENV_FILE) if (run_dir / ENV_FILE).is_file() else {}
    metrics = read_metrics(run_dir).rename(columns={"time": "s_per_iter", "memory": "memory_mb"})
    devices = env.get("devices") or []
    gpus = env.get("world_size") or (len(devices) or None)
    names = list(dict.fromkeys(devices))
    batch = (summary.get("batch") or {}).get("global") or {}
    run = {"run": str(run_dir), "format": "hlbench", "config": summary.get("experiment"),
           "hl": summary.get("hl") if isinstance(summary.get("hl"), bool) else None,
           "hardware": f"{gpus} × {names[0]}" if len(names) == 1 else " + ".join(names) or None,
           "gpus": gpus, "batch": batch.get("labeled"), "save_best": None}
    return _frame(metrics.to_dict("records"), run)


# ---------------------------------------------------------------- dispatch and summaries


def log_format(path) -> str:
    """Which reader fits `path`, from its content (file names vary: `ours.log.json`, `hl.json`, `<date>.log`)."""
    path = Path(path)
    if path.is_dir():
        if (path / SUMMARY_FILE).is_file():
            return "hlbench"
        raise ConfigError(f"{path}: a folder without {SUMMARY_FILE}: not an hlbench run folder")
    if not path.is_file():
        raise MissingInputError(f"{path}: log file not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    if head.lstrip().startswith("{") and '"env_info"' in head.split("\n", 1)[0]:
        return "mmseg_json"
    if " - mmengine - " in head:
        return "mmengine"
    if "eval.py" in head and any(_U2PL_MIOU.search(line) or _U2PL_ARGS.search(line) for line in head.splitlines()):
        return "u2pl_eval"
    if _UNIMATCH_EPOCH.search(head) or "***** Evaluation" in head:
        return "unimatch"
    raise ConfigError(f"{path}: not a log format analysis.logs reads (mmseg 0.x log.json, mmengine, U2PL eval, "
                      "UniMatch, hlbench run folder)")


READERS = {"mmseg_json": read_mmseg_json, "mmengine": read_mmengine_log, "u2pl_eval": read_u2pl_eval,
           "unimatch": read_unimatch_log, "hlbench": read_run_folder}


def read_log(path) -> pd.DataFrame:
    """Any supported log or run folder -> the common schema."""
    return READERS[log_format(path)](path)


def evaluations(log: pd.DataFrame) -> pd.DataFrame:
    """The evaluation rows (mode val), in log order."""
    return log[log["mode"] == "val"].reset_index(drop=True)


def log_classes(log: pd.DataFrame) -> list[str]:
    """Class names in the log's order, from its IoU.<class> columns (names kept verbatim, spaces and all)."""
    return [c[len("IoU."):] for c in log.columns if c.startswith("IoU.")]


def training_cost(log: pd.DataFrame) -> dict:
    """The authors' cost measures: median s/iter over train lines, peak memory (MB) over the run, line count."""
    train = log[log["mode"] == "train"]
    times = list(pd.to_numeric(train["s_per_iter"]).dropna())
    memory = pd.to_numeric(train["memory_mb"]).dropna()
    return {"s_per_iter": statistics.median(times) if times else None,
            "memory_mb": int(memory.max()) if len(memory) else None, "train_lines": len(train)}
