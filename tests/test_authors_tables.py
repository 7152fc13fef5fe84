"""analysis.authors_tables / `python -m analysis.authors_tables`: README tables we do not ship, rebuilt from their logs."""
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.authors_tables import (build_paper_tables, class_delta, cost_pairs, cost_summary, label_role, main,
                                     metric_rule, parse_cell, read_readme_tables)
from log_fixtures import mean_percent, write_mmseg_log, write_readme

from hlbench.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["meadow", "power line", "bed "]


def _iou(rng):
    return {c: round(rng.uniform(0.2, 0.9), 4) for c in CLASSES}


@pytest.fixture
def logs_tree(tmp_path):
    """A logs/ folder with four made-up tables: architectures (columns), losses (rows), a foreground-IoU table,
    and a Mask2Former-like one (external baseline, best-checkpoint HL run, an empty link)."""
    rng, root, expect = random.Random(7), tmp_path / "logs", {}

    folder = root / "rivers_and_roads"
    rows, arch = [], {}
    for model, encoder, gpu in [("Alpha", "Rx-9", "A"), ("Beta", "Rx-9 (tiny)", "A"), ("Gamma", "Qz", "B")]:
        early, base_last, hl_last = _iou(rng), _iou(rng), _iou(rng)
        best_first = {c: min(0.99, v + 0.05) for c, v in base_last.items()}  # BEST ≠ LAST: the README shows LAST
        write_mmseg_log(folder / model / "baseline.log.json", CLASSES,
                        [(40, early), (80, best_first), (120, base_last)], hl=False, times=(0.4, 0.5),
                        memory=(1000,), gpu_name="GPU-A")
        write_mmseg_log(folder / model / "ours.log.json", CLASSES, [(40, early), (80, early), (120, hl_last)],
                        hl=True, times=(0.6, 0.7), memory=(1100,), gpu_name=f"GPU-{gpu}")
        arch[model] = (mean_percent(CLASSES, base_last), mean_percent(CLASSES, hl_last), base_last, hl_last)
        shown_hl = arch[model][1] + (0.37 if model == "Gamma" else 0)  # a README typo the check must flag
        rows.append([model, encoder, f"[{arch[model][0]:.2f}]({model}/baseline.log.json)",
                     f"[{shown_hl:.2f}]({model}/ours.log.json)"])
    write_readme(folder, ["Model", "Encoder", "Baseline", "+HL"], rows)
    expect["arch"] = arch

    folder = root / "loss_study"
    losses = {}
    for loss in ["Cross-Entropy", "Dice", "HL"]:
        for net in ["net-a", "net-b"]:
            iou = _iou(rng)
            write_mmseg_log(folder / net / f"{loss.lower()}.json", CLASSES, [(50, iou)], hl=loss == "HL")
            losses[loss, net] = mean_percent(CLASSES, iou)
    write_readme(folder, ["Loss", "Net-A", "Net-B"],
                 [[loss, *(f"[{losses[loss, n]:.2f}]({n}/{loss.lower()}.json)" for n in ["net-a", "net-b"])]
                  for loss in ["Cross-Entropy", "Dice", "HL"]])
    expect["losses"] = losses

    folder, fg = root / "glyphs", {}
    for side in ["baseline", "ours"]:
        iou = {"Backgroud": 0.9712, "Glyph": round(rng.uniform(0.4, 0.7), 4)}
        write_mmseg_log(folder / "net" / f"{side}.log.json", ["Backgroud", "Glyph"], [(30, iou)], hl=side == "ours")
        fg[side] = round(iou["Glyph"] * 100, 2)
    write_readme(folder, ["Arch", "Baseline  (fgIoU)", "+HL  (fgIoU)"],
                 [["Net", f"[{fg['baseline']:.2f}](net/baseline.log.json)", f"[{fg['ours']:.2f}](net/ours.log.json)"]])
    expect["fg"] = fg

    folder = root / "queries"
    evals = [(10, _iou(rng)), (20, _iou(rng)), (30, _iou(rng))]
    write_mmseg_log(folder / "run.log.json", CLASSES, evals, hl=True, save_best="mIoU")
    best = max(mean_percent(CLASSES, iou) for _, iou in evals)
    (folder / "README.md").write_text(
        "Results with a fixed HL map.\n\n## Scenes\n"
        "| Method | mIoU (paper) | mIoU (mmseg official) | mIoU (our, based on mmseg) |\n"
        "|:---:|:---:|:---:|:---:|\n"
        f"| Q-Former | 47.7 | [48.66](https://example.org/q.json) | [{best:.2f}](run.log.json) |\n"
        "| Q-Former-L | - | [51.00](https://example.org/l.json) | [38.67]() |\n"
        "| Q-Former-XL | - | [52.00](https://example.org/xl.json) | [40.00](gone.log.json) |\n")
    expect["queries"] = best
    return root, expect


def _by_name(tables):
    return {t.name: t for t in tables}


def test_unseen_architecture_table_comes_back_exactly(logs_tree):
    root, expect = logs_tree
    tables, skipped, logs = build_paper_tables(root)
    assert skipped == []
    t = _by_name(tables)["rivers_and_roads"]
    assert t.axis == "columns"
    df = t.table
    assert list(df.columns) == ["Model", "Encoder", "Baseline", "+HL", "Δ", "check"]
    body = df.iloc[:-1]
    assert list(body["Model"]) == ["Alpha", "Beta", "Gamma"] and list(body["Encoder"]) == ["Rx-9", "Rx-9 (tiny)", "Qz"]
    arch = expect["arch"]
    assert list(body["Baseline"]) == [arch[m][0] for m in arch]  # LAST, although each baseline's BEST is higher
    assert list(body["+HL"]) == [arch[m][1] for m in arch]
    assert list(body["Δ"]) == pytest.approx([arch[m][1] - arch[m][0] for m in arch], abs=1e-9)
    mean = df.iloc[-1]
    assert mean["Model"] == "mean Δ"
    assert mean["Δ"] == pytest.approx(sum(arch[m][1] - arch[m][0] for m in arch) / 3, abs=1e-4)
    assert list(body["check"][:2]) == ["ok", "ok"]
    flagged = body["check"].iloc[2]
    assert flagged.startswith("✗ +HL") and f"README {arch['Gamma'][1] + 0.37:.2f}" in flagged
    assert f"log {arch['Gamma'][1]:.2f}" in flagged
    assert list(t.failures["row"]) == ["Gamma / Qz"]


def test_rows_axis_foreground_iou_and_best_checkpoint_rules(logs_tree):
    root, expect = logs_tree
    tables = _by_name(build_paper_tables(root)[0])
    loss = tables["loss_study"]
    assert loss.axis == "rows"
    delta_row = loss.table.iloc[-2]
    assert delta_row["Loss"] == "Δ (HL − Cross-Entropy)"
    losses = expect["losses"]
    want = {n: losses["HL", n.lower()] - losses["Cross-Entropy", n.lower()] for n in ("Net-A", "Net-B")}
    assert delta_row["Net-A"] == pytest.approx(want["Net-A"], abs=1e-4)
    assert loss.table.iloc[-1]["Net-A"] == pytest.approx(sum(want.values()) / 2, abs=1e-4)
    assert loss.failures.empty

    fg = tables["glyphs"]
    assert list(fg.cells["metric"]) == ["IoU.Glyph", "IoU.Glyph"]
    assert fg.table.iloc[0]["Δ"] == pytest.approx(expect["fg"]["ours"] - expect["fg"]["baseline"], abs=1e-9)
    assert fg.failures.empty

    q = tables["queries"]
    first = q.table.iloc[0]
    assert first["mIoU (our, based on mmseg)"] == expect["queries"]  # BEST: the run kept a best checkpoint
    assert first["Δ"] == pytest.approx(expect["queries"] - 48.66, abs=1e-9)  # against the README-only baseline
    assert first["mIoU (paper)"] == 47.7 and first["check"] == "ok; README only: mIoU (paper), mIoU (mmseg official)"
    assert "README only" in q.table.iloc[1]["check"] and not q.table.iloc[1]["check"].startswith("✗")
    assert q.table.iloc[2]["check"].startswith("✗ mIoU (our, based on mmseg): missing log")


def test_class_delta_and_training_cost_from_the_pairs(logs_tree):
    root, expect = logs_tree
    tables, _, logs = build_paper_tables(root)
    arch = _by_name(tables)["rivers_and_roads"]
    classes, n = class_delta(arch, logs)
    assert n == 3
    row = classes.set_index("class").loc["bed "]
    deltas = [100 * (h["bed "] - b["bed "]) for _, _, b, h in expect["arch"].values()]
    assert row["mean Δ"] == pytest.approx(sum(deltas) / 3, abs=1e-4)
    assert row["improved"] == f"{sum(d > 0 for d in deltas)}/3"

    pairs = cost_pairs(tables, logs)
    alpha = pairs.set_index("pair").loc["Alpha / Rx-9"]
    assert alpha["s/iter base"] == pytest.approx(0.45) and alpha["s/iter HL"] == pytest.approx(0.65)
    assert alpha["memory ratio"] == pytest.approx(1.1) and alpha["same hardware"]
    gamma = pairs.set_index("pair").loc["Gamma / Qz"]
    assert not gamma["same hardware"] and gamma["hardware"] == "4 × GPU-A → 4 × GPU-B"
    summary = cost_summary(pairs).set_index("table")
    assert summary.loc["rivers_and_roads", "pairs"] == 2  # the pair on different GPUs is left out
    assert summary.loc["rivers_and_roads", "median time ratio"] == pytest.approx(0.65 / 0.45, abs=1e-3)


def test_cells_and_rules():
    assert parse_cell(" [74.08](FCN/baseline.log.json) ") == parse_cell("**[74.08](FCN/baseline.log.json)**")
    cell = parse_cell("[74.08](FCN/baseline.log.json)")
    assert (cell.number, cell.decimals, cell.link) == (74.08, 2, "FCN/baseline.log.json")
    assert parse_cell("47.7\t").decimals == 1 and parse_cell("-").number is None
    assert [label_role(x) for x in ["+HL", "Baseline  (fgIoU)", "mIoU (our, based on mmseg)",
                                    "mIoU (mmseg official)", "mIoU (paper)", "Balanced CE", "Cross-Entropy"]] == \
        ["hl", "baseline", "hl", "baseline", None, None, "baseline"]
    assert metric_rule("+HL (fgIoU) ", ["Backgroud", "Character"]) == "IoU.Character"
    assert metric_rule("+HL", CLASSES) == "mIoU"


def test_readme_with_two_tables_and_bad_row(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# One\n| a | b |\n|---|---|\n| x | [1.0](l.json) |\n\n## Two\n| a | b |\n|---|---|\n"
                      "| y | 2 |\n")
    tables = read_readme_tables(readme, "grp")
    assert [(t.name, t.section) for t in tables] == [("grp.1", "One"), ("grp.2", "Two")]
    readme.write_text("| a | b |\n|---|---|\n| x |\n")
    with pytest.raises(ConfigError, match="README.md:3: table row has 1 cells, its header 2"):
        read_readme_tables(readme, "grp")


@pytest.mark.slow
def test_cli_writes_csv_and_markdown(logs_tree, tmp_path):
    root, expect = logs_tree
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "analysis.authors_tables", str(root), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rivers_and_roads: 3 row(s)" in proc.stdout and "CHECK: 1 cell(s) disagree" in proc.stdout
    assert "Warning" not in proc.stderr
    for stem in ["rivers_and_roads", "rivers_and_roads.classes", "loss_study", "glyphs", "queries", "training_cost"]:
        assert (out / f"{stem}.csv").is_file() and (out / f"{stem}.md").is_file()
    csv = pd.read_csv(out / "rivers_and_roads.csv")
    assert list(csv["Baseline"].iloc[:3]) == [v[0] for v in expect["arch"].values()]
    md = (out / "rivers_and_roads.md").read_text()
    assert "| Alpha " in md and "mean Δ" in md and "half a unit" in md
    assert len(pd.read_csv(out / "cells.csv")) == 6 + 6 + 2 + 9


def test_a_log_no_readme_links_is_named_with_its_value_not_skipped_silently(logs_tree):
    from tests.test_log_readers import U2PL

    root, _ = logs_tree
    (root / "SemiSeg" / "U2PL").mkdir(parents=True)  # the authors' SemiSeg/ folder: evaluation logs, no README
    (root / "SemiSeg" / "U2PL" / "val_best_1.txt").write_text(U2PL)
    (root / "SemiSeg" / "notes.txt").write_text("not a log\n")
    tables, skipped, _ = build_paper_tables(root)
    assert len(tables) == 4  # the README tables, as before
    assert skipped == ["SemiSeg/U2PL/val_best_1.txt: no README table links this u2pl_eval log, so no table shows it "
                       "(last mIoU 68.81)"]


def test_cli_bad_folder_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"analysis.authors_tables: {tmp_path / 'nope'}: logs folder not found"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no sub-folder with a README.md" in capsys.readouterr().err
