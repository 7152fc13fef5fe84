"""The HL authors' paper tables rebuilt from the training logs their READMEs link to.

The authors' `logs/` folder has one sub-folder per paper table. Its README.md holds the table, each result cell a
Markdown link such as `[74.08](FCN/baseline.log.json)` to the log the number came from. For every README table
this module re-reads each linked log (analysis.logs), applies the table's reporting rule (`metric_rule`,
`selection_rule`), and returns the table in the README's shape with Δ = HL − baseline, a mean Δ line and a check
column; from the same baseline / HL pairs it builds the per-class IoU Δ table and the training-cost comparison
(median s/iter, peak memory, HL / baseline). Nothing about any particular table is written here: rows, columns,
classes, metrics and numbers all come from the READMEs and the logs.

    python -m analysis.authors_tables <logs dir> --out DIR
"""
from __future__ import annotations

import argparse
import sys
import hashlib
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.compare import per_class_delta, summarise_class_deltas
from analysis.logs import evaluations, log_classes, log_format, read_log, training_cost
from analysis.tables import format_table
from hlbench.errors import ConfigError, MissingInputError
from hlbench.tracking.run_folder import atomic_write_text

README = "README.md"
DELTA, CHECK, MEAN_DELTA = "Δ", "check", "mean Δ"
TOLERANCE = ("a cell passes when |README − log| ≤ half a unit of the README's last printed digit "
             "(README numbers are the log's value rounded to the digits shown)")

# Which side of the comparison a column header or row label is. "+HL", "HL", "ours" / "our, based on mmseg" are
# the HL runs; "Baseline", "mmseg official" and plain cross-entropy (the loss HL replaces) are the baselines.
_HL_LABEL = re.compile(r"\+\s*HL\b|\bHL\b|\bours?\b", re.I)
_BASELINE_LABEL = re.compile(r"baseline|official|cross[- ]?entropy|^\s*CE\s*$", re.I)

_LINK = re.compile(r"^\[(.*)\]\((.*)\)$", re.S)
_EMPHASIS = re.compile(r"^(\*\*|__|\*|_)(.+)\1$", re.S)
_NUMBER = re.compile(r"^[+-]?\d+(?:\.(\d*))?$")
_SEPARATOR = re.compile(r"^:?-+:?$")
FAILED = ("mismatch", "missing log", "unreadable log", "no evaluation", "no metric")


# ---------------------------------------------------------------- README tables


@dataclass(frozen=True)
class Cell:
    text: str                 # as shown, link and emphasis removed
    number: float | None      # the number shown, if the cell is one
    decimals: int | None      # digits after the point as printed
    link: str | None          # the link target ("" for an empty `[38.67]()`), None when not a link


def parse_cell(raw: str) -> Cell:
    text, link = _plain(raw), None
    m = _LINK.match(text)
    if m:
        text, link = _plain(m.group(1)), m.group(2).strip()
    n = _NUMBER.match(text)
    return Cell(text, float(text) if n else None, len(n.group(1) or "") if n else None, link)


def _plain(text: str) -> str:
    text = text.strip()
    while m := _EMPHASIS.match(text):
        text = m.group(2).strip()
    return text


@dataclass
class ReadmeTable:
    name: str                 # output file stem
    readme: Path
    section: str              # the heading above the table, "" if none
    header: list[str]
    rows: list[list[Cell]]

    @property
    def value_columns(self) -> list[int]:
        """Columns holding a number in some row; the others label the rows."""
        return [j for j in range(len(self.header)) if any(r[j].number is not None for r in self.rows)]

    @property
    def label_columns(self) -> list[int]:
        values = set(self.value_columns)
        return [j for j in range(len(self.header)) if j not in values]

    def row_label(self, i: int) -> str:
        return " / ".join(self.rows[i][j].text for j in self.label_columns if self.rows[i][j].text) or str(i + 1)

    @property
    def linked(self) -> bool:
        return any(c.link for r in self.rows for c in r)


def _split_row(line: str) -> list[str]:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") else line
    return line.split("|")


def read_readme_tables(readme, name: str) -> list[ReadmeTable]:
    """Every Markdown pipe table of `readme`, with the heading it sits under; several tables get name.1, name.2."""
    readme = Path(readme)
    lines = readme.read_text(encoding="utf-8").splitlines()
    found, section, i = [], "", 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif (line.startswith("|") and i + 1 < len(lines)
              and all(_SEPARATOR.match(c.strip()) for c in _split_row(lines[i + 1]))):
            header, rows, j = [_plain(c) for c in _split_row(line)], [], i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                cells = _split_row(lines[j])
                if len(cells) != len(header):
                    raise ConfigError(f"{readme}:{j + 1}: table row has {len(cells)} cells, its header "
                                      f"{len(header)}")
                rows.append([parse_cell(c) for c in cells])
                j += 1
            found.append(ReadmeTable(name, readme, section, header, rows))
            i = j
            continue
        i += 1
    if len(found) > 1:
        for k, table in enumerate(found, start=1):
            table.name = f"{name}.{k}"
    return found


def find_readmes(root) -> list[tuple[str, Path]]:
    """(table name, README path) for each README.md below `root` (the root's own README is not a table folder)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInputError(f"{root}: logs folder not found")
    readmes = sorted(p for p in root.rglob(README) if p.parent != root)
    return [(p.parent.relative_to(root).as_posix().replace("/", "-"), p) for p in readmes]


# ---------------------------------------------------------------- reporting rules


def label_role(label: str) -> str | None:
    """"hl", "baseline" or None for a column header or row label."""
    if _HL_LABEL.search(label):
        return "hl"
    return "baseline" if _BASELINE_LABEL.search(label) else None


def metric_rule(words: str, classes: list[str]) -> str:
    """The logged metric a cell reports, from the words of its column header and section title.

    "fgIoU" (TotalText's "Baseline (fgIoU)") is the IoU of the foreground class of a two-class background /
    foreground log, not the 2-class mean the log also prints; "mAcc" / "aAcc" name those metrics; otherwise the
    papers' default, mIoU.
    """
    lower = words.lower()
    if "fgiou" in lower or "foreground" in lower:
        foreground = [c for c in classes if not c.strip().lower().startswith("backg")]
        if len(classes) != 2 or len(foreground) != 1:
            raise ConfigError(f"fgIoU needs a background/foreground log; its classes are {classes[:4]}")
        return f"IoU.{foreground[0]}"
    for metric in ("mAcc", "aAcc"):
        if metric.lower() in lower:
            return metric
    return "mIoU"


def selection_rule(log: pd.DataFrame) -> tuple[str, str | None]:
    """Which evaluation a cell reports: ("best", metric) when the run kept a best checkpoint on `metric`
    (mmengine's `save_best='mIoU'`: the Mask2Former logs), else ("last", None), the final evaluation, i.e. the
    model at the end of training, which is all an mmseg 0.x run without save_best leaves behind."""
    save_best = log["save_best"].iloc[0] if len(log) else None
    return ("best", save_best) if isinstance(save_best, str) and save_best else ("last", None)


# ---------------------------------------------------------------- rebuilding


class LogCache:
    """Each linked log read once (the cost and class tables reuse the logs of the main table)."""

    def __init__(self):
        self._logs: dict[Path, pd.DataFrame | Exception] = {}

    def get(self, path: Path) -> pd.DataFrame:
        if path not in self._logs:
            try:
                self._logs[path] = read_log(path)
            except (ConfigError, ValueError, OSError) as err:
                self._logs[path] = err
        found = self._logs[path]
        if isinstance(found, Exception):
            raise found
        return found


def _percent(value) -> float | None:
    value = pd.to_numeric(value, errors="coerce")
    return None if pd.isna(value) else round(float(value) * 100, 4)


def rebuild_cell(cell: Cell, log_path: Path | None, words: str, logs: LogCache) -> dict:
    """One value cell: the README number next to the value its log gives under the table's rules."""
    out = {"readme": cell.number, "decimals": cell.decimals, "log": str(log_path) if log_path else None,
           "metric": None, "rule": None, "value": cell.number, "iter": None, "eval_index": None, "last": None,
           "best": None, "best_iter": None, "status": "README only" if cell.number is not None else "empty"}
    if log_path is None:
        return out
    if not log_path.exists():
        return {**out, "status": "missing log"}
    try:
        log = logs.get(log_path)
        evals = evaluations(log)
        if evals.empty:
            return {**out, "status": "no evaluation"}
        metric = metric_rule(words, log_classes(log))
        if metric not in evals.columns or evals[metric].isna().all():
            return {**out, "metric": metric, "status": "no metric"}
    except (ConfigError, ValueError, OSError) as err:
        return {**out, "status": "unreadable log", "error": str(err)}
    rule, by = selection_rule(log)
    best_row = evals.loc[pd.to_numeric(evals[metric]).idxmax()]
    if rule == "best" and by in evals.columns:
        index = int(pd.to_numeric(evals[by]).idxmax())
    else:
        index, rule = len(evals) - 1, "last"
    chosen = evals.iloc[index]
    value = _percent(chosen[metric])
    # README numbers are rounded to the digits they print: half a unit of the last digit is agreement
    agrees = cell.number is None or (value is not None and
                                     abs(value - cell.number) <= 0.5 * 10.0 ** -cell.decimals + 1e-9)
    return {**out, "metric": metric, "rule": rule if rule == "last" else f"best {by}", "value": value,
            "iter": _int(chosen["iter"]), "eval_index": index, "last": _percent(evals.iloc[-1][metric]),
            "best": _percent(best_row[metric]), "best_iter": _int(best_row["iter"]),
            "status": "ok" if agrees else "mismatch"}


def _int(value):
    return None if pd.isna(value) else int(value)


@dataclass
class Pair:
    label: str
    base: dict                # rebuild_cell() of the baseline cell
    hl: dict


@dataclass
class PaperTable:
    readme_table: ReadmeTable
    cells: pd.DataFrame       # one row per value cell
    table: pd.DataFrame       # the README's shape, numbers rebuilt, with Δ, mean Δ and check
    markdown: str
    axis: str | None          # "columns" (HL and baseline are columns), "rows", or None (no comparison found)
    pairs: list[Pair] = field(default_factory=list)
    mean_delta: float | None = None

    @property
    def name(self) -> str:
        return self.readme_table.name

    @property
    def failures(self) -> pd.DataFrame:
        return self.cells[self.cells["status"].isin(FAILED)]


def comparison(t: ReadmeTable) -> tuple[str | None, int | None, int | None]:
    """(axis, baseline index, HL index): which two columns (or rows) a Δ compares, from their labels."""
    values = t.value_columns
    roles = {j: label_role(t.header[j]) for j in values}
    hl = [j for j in values if roles[j] == "hl"]
    if len(hl) == 1:
        base = [j for j in values if roles[j] == "baseline"]
        before = [j for j in base if j < hl[0]]
        if base:
            return "columns", (before or base)[-1], hl[0]
    rows = {i: label_role(t.row_label(i)) for i in range(len(t.rows))}
    hl_rows = [i for i, r in rows.items() if r == "hl"]
    base_rows = [i for i, r in rows.items() if r == "baseline"]
    if len(hl_rows) == 1 and len(base_rows) == 1:
        return "rows", base_rows[0], hl_rows[0]
    return None, None, None


def _fmt(value, decimals, sign=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:{'+' if sign else ''}.{decimals}f}"


def _check_text(t: ReadmeTable, cells: list[tuple[int, dict]]) -> str:
    """The check column of one row: "ok", or each failing cell with what the log says."""
    notes, readme_only = [], []
    for j, c in cells:
        col = t.header[j]
        if c["status"] == "mismatch":
            hint = f"; BEST {c['best']:.2f} @{c['best_iter']}" if c["best"] != c["value"] else ""
            notes.append(f"✗ {col}: README {_fmt(c['readme'], c['decimals'])} ≠ log {c['value']:.2f} "
                         f"({c['rule']} @{c['iter']}{hint})")
        elif c["status"] in FAILED:
            detail = c.get("error") or c["log"]
            notes.append(f"✗ {col}: {c['status']} ({detail})")
        elif c["status"] == "README only":
            readme_only.append(col)
    if readme_only:
        notes.append("README only: " + ", ".join(readme_only))
    return "; ".join(notes) if any(n.startswith("✗") for n in notes) else "; ".join(["ok", *notes])


def rebuild_table(t: ReadmeTable, logs: LogCache) -> PaperTable:
    """The README table with every linked cell re-read from its log; Δ, mean Δ and check added."""
    folder = t.readme.parent
    values, labels = t.value_columns, t.label_columns
    cell_rows, rebuilt = [], {}
    for i, row in enumerate(t.rows):
        for j in values:
            c = row[j]
            path = (folder / c.link) if c.link and "://" not in c.link else None
            r = rebuild_cell(c, path, f"{t.header[j]} {t.section}", logs)
            if c.link and "://" in c.link:
                r["log"] = c.link  # published elsewhere (e.g. mmseg's model zoo): README number only
            rebuilt[i, j] = r
            cell_rows.append({"table": t.name, "row": t.row_label(i), "column": t.header[j], **r})
    cells = pd.DataFrame(cell_rows)
    axis, base, hl = comparison(t)
    pairs: list[Pair] = []
    if axis == "columns":
        pairs = [Pair(t.row_label(i), rebuilt[i, base], rebuilt[i, hl]) for i in range(len(t.rows))]
    elif axis == "rows":
        pairs = [Pair(t.header[j], rebuilt[base, j], rebuilt[hl, j]) for j in values]
    deltas = {p.label: (p.hl["value"] - p.base["value"]
                        if p.hl["value"] is not None and p.base["value"] is not None else None) for p in pairs}
    present = [d for d in deltas.values() if d is not None]
    mean_delta = sum(present) / len(present) if present else None
    digits = max((c.decimals for r in t.rows for c in r if c.decimals is not None), default=2)

    numeric, shown = [], []
    for i, row in enumerate(t.rows):
        num = {t.header[j]: row[j].text for j in labels}
        txt = dict(num)
        for j in values:
            r = rebuilt[i, j]
            num[t.header[j]] = r["value"]
            txt[t.header[j]] = _fmt(r["value"], r["decimals"] or digits) if r["value"] is not None else row[j].text
        if axis == "columns":
            d = deltas[t.row_label(i)]
            num[DELTA], txt[DELTA] = (None if d is None else round(d, 4)), _fmt(d, digits, sign=True)
        num[CHECK] = txt[CHECK] = _check_text(t, [(j, rebuilt[i, j]) for j in values])
        numeric.append(num)
        shown.append(txt)
    first = t.header[labels[0]] if labels else None
    blank = {t.header[j]: "" for j in labels}
    if axis == "rows":
        label = f"{DELTA} ({t.row_label(hl)} − {t.row_label(base)})"
        num = {**blank, **({first: label} if first else {}), CHECK: ""}
        txt = dict(num)
        for j in values:
            d = deltas[t.header[j]]
            num[t.header[j]], txt[t.header[j]] = (None if d is None else round(d, 4)), _fmt(d, digits, sign=True)
        numeric.append(num)
        shown.append(txt)
    if axis is not None:
        where = DELTA if axis == "columns" else t.header[values[0]]
        num = {**blank, **({first: MEAN_DELTA} if first else {}), CHECK: ""}
        txt = dict(num)
        num[where] = None if mean_delta is None else round(mean_delta, 4)
        txt[where] = _fmt(mean_delta, digits, sign=True)
        numeric.append(num)
        shown.append(txt)
    columns = [*t.header, *([DELTA] if axis == "columns" else []), CHECK]
    table = pd.DataFrame(numeric, columns=columns)
    display = pd.DataFrame(shown, columns=columns).fillna("")
    markdown = _table_markdown(t, cells, display, axis, base, hl)
    return PaperTable(t, cells, table, markdown, axis, pairs, mean_delta)


def _table_markdown(t, cells, display, axis, base, hl) -> str:
    rules = cells.dropna(subset=["rule"]).groupby(["rule", "metric"], sort=False).size()
    rule_text = "; ".join(f"{n} cell(s): {r.upper() if r == 'last' else r.replace('best', 'BEST by')} "
                          f"evaluation, {m} × 100" for (r, m), n in rules.items()) or "no cell links a local log"
    if axis == "columns":
        compare = f"{DELTA} = {t.header[hl]} − {t.header[base]}."
    elif axis == "rows":
        compare = f"{DELTA} = {t.row_label(hl)} − {t.row_label(base)}, per column."
    else:
        compare = "No HL / baseline pair found in the labels: no Δ."
    failed = len(cells[cells["status"].isin(FAILED)])
    lines = [f"## {t.name}", "", f"From `{t.readme}`" + (f", section \"{t.section}\"" if t.section else "") + ".",
             "", format_table(display), "", f"- Rebuilt values: {rule_text}.", f"- {compare}",
             f"- check: {TOLERANCE}. " + ("All linked cells agree." if not failed else f"{failed} cell(s) disagree.")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- per-class IoU Δ and training cost


def _selected_row(cell: dict, logs: LogCache) -> pd.Series | None:
    """The evaluation a rebuilt cell reports (None for a cell without a readable log)."""
    if cell["status"] not in ("ok", "mismatch"):
        return None
    return evaluations(logs.get(Path(cell["log"]))).iloc[cell["eval_index"]]


def class_delta(table: PaperTable, logs: LogCache) -> tuple[pd.DataFrame, int]:
    """Per class over the table's baseline / HL pairs (each at its cell's reported evaluation): mean base IoU,
    mean Δ, median Δ, improved "k/n" (points of IoU), and the number of pairs used."""
    deltas = []
    for p in table.pairs:
        rows = [_selected_row(c, logs) for c in (p.base, p.hl)]
        if any(r is None for r in rows):
            continue
        ious = [{c: row[f"IoU.{c}"] for c in log_classes(logs.get(Path(cell["log"])))}
                for row, cell in zip(rows, (p.base, p.hl))]
        try:
            deltas.append(per_class_delta({"final": {"IoU": ious[0]}}, {"final": {"IoU": ious[1]}}))
        except ValueError as err:  # logs of different data sets: the pair has no per-class Δ
            warnings.warn(f"{table.name} {p.label}: {p.base['log']} vs {p.hl['log']}: {err}; pair left out")
    return summarise_class_deltas(deltas).round(4), len(deltas)


def _digest(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def cost_pairs(tables: list[PaperTable], logs: LogCache) -> pd.DataFrame:
    """One row per baseline / HL pair with both training logs: median s/iter and peak memory of each, HL / base."""
    rows = []
    for table in tables:
        for p in table.pairs:
            if p.base["status"] not in ("ok", "mismatch") or p.hl["status"] not in ("ok", "mismatch"):
                continue
            base_log, hl_log = logs.get(Path(p.base["log"])), logs.get(Path(p.hl["log"]))
            base, hl = training_cost(base_log), training_cost(hl_log)
            if base["s_per_iter"] is None or hl["s_per_iter"] is None:
                continue
            hw_base, hw_hl = base_log["hardware"].iloc[0], hl_log["hardware"].iloc[0]
            mem = base["memory_mb"] and hl["memory_mb"]
            rows.append({"table": table.name, "pair": p.label,
                         "hardware": hw_base if hw_base == hw_hl else f"{hw_base} → {hw_hl}",
                         "batch": base_log["batch"].iloc[0], "same hardware": bool(hw_base and hw_base == hw_hl),
                         "s/iter base": round(base["s_per_iter"], 3), "s/iter HL": round(hl["s_per_iter"], 3),
                         "time ratio": round(hl["s_per_iter"] / base["s_per_iter"], 3),
                         "memory MB base": base["memory_mb"], "memory MB HL": hl["memory_mb"],
                         "memory ratio": round(hl["memory_mb"] / base["memory_mb"], 3) if mem else None,
                         "files": (_digest(p.base["log"]), _digest(p.hl["log"]))})
    return pd.DataFrame(rows, columns=["table", "pair", "hardware", "batch", "same hardware", "s/iter base",
                                       "s/iter HL", "time ratio", "memory MB base", "memory MB HL",
                                       "memory ratio", "files"])


def cost_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per table and over all: same-hardware pairs (byte-identical log pairs once), median time / memory ratio."""
    kept = pairs[pairs["same hardware"]].drop_duplicates("files")

    def line(name, df):
        t, m = list(df["time ratio"]), [v for v in df["memory ratio"] if v is not None and not pd.isna(v)]
        return {"table": name, "pairs": len(df), "median time ratio": _median(t), "mean time ratio": _mean(t),
                "time ratio range": f"{min(t):.2f}–{max(t):.2f}" if t else "–",
                "median memory ratio": _median(m), "mean memory ratio": _mean(m),
                "memory ratio range": f"{min(m):.2f}–{max(m):.2f}" if m else "–"}

    lines = [line(name, df) for name, df in kept.groupby("table", sort=False)]
    return pd.DataFrame([*lines, line("all", kept)])


def _median(values):
    return round(statistics.median(values), 3) if values else None


def _mean(values):
    return round(statistics.fmean(values), 3) if values else None


# ---------------------------------------------------------------- the whole folder


def unlinked_logs(root, tables: list[PaperTable], logs: LogCache) -> pd.DataFrame:
    """The logs below `root` that no rebuilt table's cell links (e.g. the authors' SemiSeg/ evaluation logs, which
    have no README table): log (relative to root), format and the last evaluation's mIoU × 100."""
    root = Path(root)
    linked = {Path(log).resolve() for t in tables for log in t.cells["log"].dropna() if "://" not in log}
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != README):
        if path.resolve() in linked:
            continue
        try:
            kind = log_format(path)
            evals = evaluations(logs.get(path))
        except (ConfigError, ValueError, OSError):
            continue  # not a log analysis.logs reads
        last = _percent(evals.iloc[-1]["mIoU"]) if not evals.empty and "mIoU" in evals.columns else None
        rows.append({"log": path.relative_to(root).as_posix(), "format": kind, "last mIoU": last})
    return pd.DataFrame(rows, columns=["log", "format", "last mIoU"])


def build_paper_tables(root) -> tuple[list[PaperTable], list[str], LogCache]:
    """Every linked README table below `root`, rebuilt; plus notes on what was not: README tables without a linked
    cell, and logs no table links (unlinked_logs)."""
    logs, tables, skipped = LogCache(), [], []
    readmes = find_readmes(root)
    if not readmes:
        raise ConfigError(f"{root}: no sub-folder with a {README}: not a folder laid out like the authors' logs/")
    for name, readme in readmes:
        for t in read_readme_tables(readme, name):
            if t.linked:
                tables.append(rebuild_table(t, logs))
            else:
                skipped.append(f"{t.name}: no cell links a log ({readme})")
    for log in unlinked_logs(root, tables, logs).itertuples():
        value = "no evaluation" if log[3] is None or pd.isna(log[3]) else f"last mIoU {log[3]:.2f}"
        skipped.append(f"{log.log}: no README table links this {log.format} log, so no table shows it ({value})")
    return tables, skipped, logs


def _write(out: Path, stem: str, df: pd.DataFrame, markdown: str) -> list[Path]:
    return [atomic_write_text(out / f"{stem}.csv", df.to_csv(index=False)),
            atomic_write_text(out / f"{stem}.md", markdown)]


def write_paper_tables(root, out) -> str:
    """Write every rebuilt table (CSV + Markdown), the per-class Δ tables, the cost tables and all cells to `out`;
    return the console report."""
    root, out = Path(root), Path(out)
    tables, skipped, logs = build_paper_tables(root)
    report, written = [], []
    for t in tables:
        written += _write(out, t.name, t.table, t.markdown)
        failed = t.failures
        mean = f"mean Δ {t.mean_delta:+.2f}" if t.mean_delta is not None else "no Δ"
        verdict = "check clean" if failed.empty else f"CHECK: {len(failed)} cell(s) disagree"
        report += [f"{t.name}: {len(t.readme_table.rows)} row(s), {mean}, {verdict}", "", t.markdown]
        classes, n = class_delta(t, logs)
        if n:
            md = (f"## {t.name}: per-class IoU Δ over {n} baseline / HL pair(s)\n\nPoints of IoU at each cell's "
                  f"reported evaluation; improved = pairs with Δ > 0.\n\n{format_table(classes)}\n")
            written += _write(out, f"{t.name}.classes", classes, md)
    pairs = cost_pairs(tables, logs)
    if not pairs.empty:
        summary = cost_summary(pairs)
        shown = pairs.drop(columns="files")
        md = ("## Training cost, HL vs baseline (from the logs' train lines)\n\n"
              "s/iter: median of the logged 50-iteration window means; memory: peak MB (rank 0) over the run; "
              "ratio = HL / baseline.\n\n" + format_table(shown, digits=3) +
              "\n\nSummary over same-hardware pairs (byte-identical log pairs counted once):\n\n"
              + format_table(summary, digits=3) + "\n")
        written += _write(out, "training_cost", shown, md)
        written.append(atomic_write_text(out / "training_cost_summary.csv", summary.to_csv(index=False)))
        report += [md]
    all_cells = pd.concat([t.cells for t in tables], ignore_index=True) if tables else pd.DataFrame()
    written.append(atomic_write_text(out / "cells.csv", all_cells.to_csv(index=False)))
    report += [*skipped, f"wrote {len(written)} file(s) to {out}"]
    return "\n".join(report)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.authors_tables",
        description="Rebuild every table of a folder laid out like the HL authors' logs/ (sub-folders whose "
                    "README.md table cells link to log files) from the logs, with Δ, mean Δ and a check column.")
    parser.add_argument("logs", type=Path, help="the logs folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSV and Markdown tables")
    args = parser.parse_args(argv)
    try:
        print(write_paper_tables(args.logs, args.out))
    except ConfigError as err:
        print(f"analysis.authors_tables: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
