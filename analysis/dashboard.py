"""`python -m analysis.dashboard`: the project's W&B report, baseline vs HL per paper table, from the run folders.

    python -m analysis.dashboard [--runs outputs] [--project hlbench] [--entity TEAM] [--title TITLE]

One report section per W&B group (a suite, i.e. one paper table; hlbench.tracking.wandb_layout), its runs split
into baseline and HL by the config's hl.enabled: val mIoU curves, final and best mIoU, final per-class IoU bars,
the HL-map media, and the HL-stability curves. Those curves come from the run folders' HL-map snapshots
(analysis.stability), so each HL run's curves are uploaded as a W&B run of their own (job type hl_stability, same
group and tags, id derived from the training run's).

Online (credentials, and WANDB_MODE neither offline nor disabled) it uploads the curves and saves the report with
wandb-workspaces (`pip install 'hlbench[dashboard]'`); otherwise it prints what it would create and touches no
server.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
from pathlib import Path

import pandas as pd

from analysis.runs import load_runs
from analysis.stability import snapshot_stability
from hlbench.errors import ConfigError
from hlbench.tracking.run_folder import read_yaml
from hlbench.tracking.tracker import WANDB_ID_FILE, wandb_mode
from hlbench.tracking.wandb_layout import BEST_MIOU, FINAL_MIOU, final_iou_key, run_group

HL_KEY = "hl.enabled"  # config key that splits every section into baseline and HL
STABILITY_JOB = "hl_stability"
STABILITY_PREFIX = "hl_stability/"
MEDIA_KEYS = ["hl_maps/panel", "hl_maps/hl", "hl_maps/image"]


def _group(row) -> str:
    group = row.get("wandb_run.group")
    if isinstance(group, str):
        return group
    return run_group(row["experiment"], row.get("suite"), None)  # run folders from before the identity was stored


def _suite_title(suite, group: str) -> str:
    """The suite file's table title (experiments/suites/<suite>.yaml) with the group, else the group's name. Runs
    of a lone experiment= have no suite: the group (the suite whose folder names the experiment) stands for it."""
    if not isinstance(suite, str):
        suite = group
    from hlbench.suites import suite_file
    try:
        return f"{read_yaml(suite_file(suite)).get('table') or suite} ({group})"
    except (ConfigError, FileNotFoundError):
        return group


def _classes(runs: pd.DataFrame) -> list[str]:
    cols = [c for c in runs.columns if c.startswith("final.IoU.") and runs[c].notna().any()]
    return [c[len("final.IoU."):] for c in cols]


def stability_uploads(runs: pd.DataFrame) -> list[dict]:
    """One entry per HL run with at least two HL-map snapshots: its stability curves and the W&B run for them."""
    out = []
    for row in runs.to_dict("records"):
        if not row.get(HL_KEY):
            continue
        curves = snapshot_stability(row["run_dir"])
        if curves.empty:
            continue
        id_file = Path(row["run_dir"]) / WANDB_ID_FILE
        source = (id_file.read_text().strip() if id_file.is_file()
                  else hashlib.sha1(str(Path(row["run_dir"]).resolve()).encode()).hexdigest()[:12])
        name = row.get("wandb_run.name") or f"{row['experiment']}-s{row['seed']}"
        tags = row.get("wandb_run.tags")
        out.append({"run_dir": row["run_dir"], "id": f"{source}-{STABILITY_JOB}", "name": f"{name}-stability",
                    "group": _group(row), "job_type": STABILITY_JOB,
                    "tags": (list(tags) if isinstance(tags, list) else []) + [f"analysis:{STABILITY_JOB}"],
                    "curves": curves})
    return out


def _stability_metrics(curves: pd.DataFrame) -> list[str]:
    return [STABILITY_PREFIX + c for c in curves.columns if c not in ("iter", "prev_iter")]


def dashboard_plan(runs: pd.DataFrame, project: str, entity: str | None, title: str) -> dict:
    """What the report holds: per group its runs, classes and panels (type, title, metric keys), and the
    stability runs (stability_uploads) that feed its stability panels."""
    uploads = stability_uploads(runs)
    sections = []
    if not runs.empty:
        groups = runs.assign(_group=[_group(r) for r in runs.to_dict("records")])
        for group, rows in groups.groupby("_group", sort=True):
            hl = rows[HL_KEY].fillna(False).astype(bool)
            classes = _classes(rows)
            stab = [u for u in uploads if u["group"] == group]
            panels = [
                {"type": "line", "title": "val mIoU vs iteration, baseline vs HL (mean ± std over seeds)",
                 "y": ["val/mIoU"]},
                {"type": "bar", "title": "final and best mIoU", "metrics": [FINAL_MIOU, BEST_MIOU]},
                {"type": "bar", "title": "final per-class IoU", "metrics": [final_iou_key(c) for c in classes]},
            ]
            if hl.any():
                panels.append({"type": "media", "title": "HL maps (panel; HL map and image with class masks)",
                               "media_keys": MEDIA_KEYS})
            if stab:
                panels.append({"type": "line", "title": "HL stability vs loss-based hardness (snapshot rank "
                                                        "correlation, AUROC vs the hardness mask)",
                               "y": sorted({m for u in stab for m in _stability_metrics(u["curves"])})})
            suites = rows["suite"].dropna()
            sections.append({"group": group, "title": _suite_title(suites.iloc[0] if len(suites) else None, group),
                             "filter": f"Metric('group') == '{group}'", "groupby": f"config.{HL_KEY}",
                             "runs": len(rows), "baseline": int((~hl).sum()), "hl": int(hl.sum()),
                             "classes": classes, "panels": panels})
    return {"project": project, "entity": entity, "title": title, "sections": sections, "stability_runs": uploads}


def format_plan(plan: dict, verb: str = "would create") -> str:
    """The plan as text: the report, each section's filter, grouping and panels, and the stability runs."""
    where = f"{plan['entity'] or '<your default entity>'}/{plan['project']}"
    lines = [f"W&B report {plan['title']!r} in {where} ({verb}):"]
    if not plan["sections"]:
        lines.append("  no runs found: the report would be empty")
    for s in plan["sections"]:
        lines.append(f"  section {s['title']}: runs where {s['filter']} ({s['runs']} runs: {s['baseline']} baseline, "
                     f"{s['hl']} HL), grouped by {s['groupby']}")
        for p in s["panels"]:
            keys = p.get("y") or p.get("metrics") or p.get("media_keys")
            shown = ", ".join(keys[:4]) + (f", … ({len(keys)} keys)" if len(keys) > 4 else "")
            lines.append(f"    {p['type']:<5} {p['title']}: {shown}")
    for r in plan["stability_runs"]:
        lines.append(f"  stability run {r['name']} (id {r['id']}, group {r['group']}, job type {r['job_type']}): "
                     f"{len(r['curves'])} point(s) from {r['run_dir']}")
    return "\n".join(lines)


def build_report(plan: dict):
    """The wandb-workspaces Report of a plan (not saved); needs the package, not a server."""
    import wandb_workspaces.reports.v2 as wr

    def panel(p):
        if p["type"] == "line":
            return wr.LinePlot(title=p["title"], x="Step", y=p["y"], groupby_aggfunc="mean",
                               groupby_rangefunc="stddev")
        if p["type"] == "bar":
            return wr.BarPlot(title=p["title"], metrics=p["metrics"], groupby_aggfunc="mean",
                              groupby_rangefunc="stddev")
        return wr.MediaBrowser(title=p["title"], media_keys=p["media_keys"], gallery_axis="step")

    blocks = []
    for s in plan["sections"]:
        runset = wr.Runset(entity=plan["entity"], project=plan["project"], name=s["group"], filters=s["filter"],
                           groupby=[s["groupby"]])
        blocks += [wr.H2(s["title"]), wr.PanelGrid(runsets=[runset], panels=[panel(p) for p in s["panels"]])]
    return wr.Report(entity=plan["entity"], project=plan["project"], title=plan["title"],
                     description="hlbench: baseline vs HL per paper table (python -m analysis.dashboard)",
                     blocks=blocks)


def upload_stability(upload: dict, project: str, entity: str | None, mode: str) -> str:
    """Log one HL run's stability curves (step = iteration) as their own W&B run; returns its id.

    Online, re-running continues the same run (fixed id) and logs only iterations beyond what it already holds.
    """
    import wandb

    run = wandb.init(id=upload["id"], resume="allow", project=project, entity=entity, name=upload["name"],
                     group=upload["group"], job_type=upload["job_type"], tags=upload["tags"], mode=mode,
                     config={"source_run_dir": str(upload["run_dir"])}, settings=wandb.Settings(silent=True),
                     reinit="finish_previous")
    try:
        for row in upload["curves"].to_dict("records"):
            if int(row["iter"]) < (run.step or 0):
                continue
            values = {STABILITY_PREFIX + k: v for k, v in row.items()
                      if k not in ("iter", "prev_iter") and v is not None and not math.isnan(v)}
            run.log(values, step=int(row["iter"]))
    finally:
        run.finish()
    return upload["id"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="outputs", help="the runs folder (default: outputs)")
    parser.add_argument("--project", default="hlbench")
    parser.add_argument("--entity", default=None, help="W&B team or user (default: your API key's entity)")
    parser.add_argument("--title", default="hlbench: baseline vs HL")
    args = parser.parse_args(argv)
    if not Path(args.runs).is_dir():
        print(f"error: {args.runs}: runs folder not found", file=sys.stderr)
        return 2
    runs = load_runs(args.runs)
    plan = dashboard_plan(runs, args.project, args.entity, args.title)
    mode = wandb_mode()
    if mode != "online":
        print(format_plan(plan))
        print(f"W&B mode is {mode}: nothing created. With credentials (wandb login) and WANDB_MODE unset, this "
              "uploads the stability runs and saves the report.")
        return 0
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        print("error: saving the report needs wandb-workspaces: pip install 'hlbench[dashboard]'", file=sys.stderr)
        return 2
    print(format_plan(plan, verb="creating"))
    for upload in plan["stability_runs"]:
        upload_stability(upload, args.project, args.entity, mode)
    if plan["entity"] is None:
        import wandb
        plan["entity"] = wandb.Api().default_entity
    report = build_report(plan).save()
    print(f"report: {report.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
