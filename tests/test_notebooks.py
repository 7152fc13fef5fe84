"""notebooks/: every .ipynb matches its jupytext .py and carries no outputs, and runs headless on real runs.

The fixture runs are made by the real runner (smoke suite, and two semi-supervised experiments at two label
splits, a few iterations each); the fixture logs are a made-up authors'-logs tree (README table + mmseg logs).
Each notebook runs as Jupyter runs it: its kernel in notebooks/, HLBENCH_RUNS given relative to the project root
(as `HLBENCH_RUNS=outputs jupyter lab notebooks/` from there).
"""
import json
import os

import jupytext
import nbformat
import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from nbclient import NotebookClient

from hlbench.run import run, run_experiment
from hlbench.suites import run_overrides
from tests.conftest import compose_run, REPO, SMOKE_HL_RUN, TINY

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))
SEMISUP = ["profile=smoke", "data=synthetic_semisup", "logger=none", "data.train.num_images=16",
           "data.val.num_images=2", "data.val.size=[32,32]", "data.train.size=[32,32]",
           "data.train_pipeline.crop=[32,32]",
           "train.iters=2", "train.batch_size=2", "train.log_interval=1", "train.hl_map_interval=1", "seeds=null"]
SEMISUP_RUNS = [(experiment, fraction) for experiment in ("semisup_synthetic/suponly", "semisup_synthetic/unimatch+hl")
                for fraction in (0.25, 0.5)]


def _sources(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_every_notebook_has_both_files():
    assert {p.stem for p in NOTEBOOKS} == {p.stem for p in (REPO / "notebooks").glob("*.ipynb")}
    assert {"hl_analysis", "hl_maps", "hl_stability", "paper_tables", "semisup"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("py", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_is_paired_with_py_and_has_no_outputs(py):
    ipynb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    assert _sources(ipynb) == _sources(jupytext.read(py)), \
        f"{py.with_suffix('.ipynb').name} is stale: run `jupytext --sync notebooks/{py.name}`"
    code = [c for c in ipynb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.fixture(scope="module")
def fixture_runs(tmp_path_factory):
    """The smoke suite (baseline + HL, 4 iterations, HL maps at 2 and 4) and SupOnly / UniMatch + HL at 1/4 and
    1/2 of a 16-scene pool (2 iterations, HL maps at 1 and 2), all in one runs folder."""
    out = tmp_path_factory.mktemp("runs")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
        run(*compose_run(TINY + ["train.iters=4", "train.hl_map_interval=2"], out))
        for experiment, fraction in SEMISUP_RUNS:
            cfg = compose_run(SEMISUP + [*run_overrides(experiment), f"data.split_fraction={fraction}"], out)[0]
            run_experiment(cfg, experiment, "semisup_synthetic", "smoke")
    GlobalHydra.instance().clear()
    return out


def write_fake_logs(root):
    """A logs/ tree of one made-up table (README cells linking mmseg 0.x log.json files), two rows x baseline/HL."""
    table = root / "toy_table"
    lines = ["| Model | Baseline | +HL |", "|:--|:--|:--|"]
    for name, base, hl in (("NetA", 0.41, 0.45), ("NetB", 0.50, 0.49)):
        cells = []
        for kind, miou in (("baseline", base), ("hl", hl)):
            model = "WeightedEncoderDecoder" if kind == "hl" else "EncoderDecoder"  # the authors' HL model type
            header = {"env_info": "GPU 0: Fake GPU", "config": f"model = dict(type='{model}')\ngpu_ids = range(0, 1)\n",
                      "CLASSES": ["sky", "cat"], "exp_name": f"{name}_{kind}"}
            train = {"mode": "train", "epoch": 1, "iter": 10, "lr": 0.01, "memory": 100, "time": 0.5, "loss": 1.0}
            val = {"mode": "val", "epoch": 1, "iter": 3, "lr": 0.01, "aAcc": 0.9, "mIoU": miou, "mAcc": 0.5,
                   "IoU.sky": miou, "IoU.cat": miou}
            path = table / name / f"{kind}.log.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(x) + "\n" for x in (header, train, val)))
            cells.append(f"[{100 * miou:.2f}]({name}/{kind}.log.json)")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    (table / "README.md").write_text("# Toy table\n\n" + "\n".join(lines) + "\n")
    return root


def _execute(notebook, monkeypatch, runs_dir, logs_dir=None):
    """Run a notebook in a fresh kernel (the venv's python3) working in notebooks/, as Jupyter does; returns (all
    text output, stderr included, and the number of images)."""
    monkeypatch.setenv("HLBENCH_RUNS", runs_dir)
    monkeypatch.delenv("PWD", raising=False)  # where jupyter was started: unknown, so the project root counts
    monkeypatch.setenv("HLBENCH_LOGS", str(logs_dir or ""))
    # The kernel picks the inline backend (figures become image/png outputs) unless a backend is forced.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(REPO / "notebooks" / f"{notebook}.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    return text, images


HL_RUNS = 1 + sum(e.endswith("+hl") for e, _ in SEMISUP_RUNS)
# notebook: (texts its output must contain, notes it must not print, images)
ON_RUNS = {
    "hl_analysis": ([f"{2 + len(SEMISUP_RUNS)} run(s)", f"{HL_RUNS} with HL", SMOKE_HL_RUN, "smoke/pspnet_r18_tiny",
                     "±",
                     "hl_rank_corr", "1 pair(s)", "mean Δ"],
                    ["no runs", "no train/val", "no HL-map", "no pairs", "no baseline/HL"], 3 + HL_RUNS),
    "hl_maps": ([f"{HL_RUNS} HL run(s) with HL-map snapshots", "| pole", "mean HL", "| thin", "| none"],
                ["no HL run", "no snapshot names"], HL_RUNS + 2),
    "hl_stability": ([f"{HL_RUNS} HL run(s)", "corr_prev", "top_final", "auroc.thin", "| hl ", "| loss "],
                     ["no run with", "no stability", "no snapshot grid"], 1 + min(2, HL_RUNS)),
    "semisup": (["4 semi-supervised", "reference rule:", "last iteration:", "seeded(0.25, 0)", "seeded(0.5, 0)",
                 "semisup_synthetic/unimatch+hl", "ours (paper)"], ["no semi-supervised"], 1),
    "paper_tables": (["2 suite(s): semisup_synthetic, smoke", SMOKE_HL_RUN, "final.mIoU",
                      "toy_table: 0 cell(s) failing",
                      "| NetA", "mean Δ"], ["no suite runs", "no runs", "HLBENCH_LOGS is not"], 1),
}
NO_RUNS_WARNING = "does not exist: run `make run`, or set HLBENCH_RUNS"
ON_NOTHING = {"hl_analysis": ["0 run(s)", "no HL-map panels", "no per-class Δ"],
              "hl_maps": ["0 run(s)", "no panels", "no per-class hardness", "no per-kind hardness"],
              "hl_stability": ["0 HL run(s)", "no stability numbers", "no stability curves", "no snapshot grid"],
              "semisup": ["0 run(s)", "no method × split table", "nothing to compare", "no chart"],
              "paper_tables": ["0 run(s)", "no tables", "no paper-shaped table", "no final / best table",
                               "HLBENCH_LOGS is not a folder"]}


def test_every_notebook_is_checked():
    assert set(ON_RUNS) == set(ON_NOTHING) == {p.stem for p in NOTEBOOKS}


@pytest.mark.slow
@pytest.mark.parametrize("notebook", sorted(ON_RUNS))
def test_notebook_runs_on_fixture_runs_and_logs(notebook, fixture_runs, tmp_path, monkeypatch):
    text, images = _execute(notebook, monkeypatch, os.path.relpath(fixture_runs, REPO), write_fake_logs(tmp_path))
    expected, notes, n_images = ON_RUNS[notebook]
    assert f"runs folder: {fixture_runs}\n" in text and NO_RUNS_WARNING not in text
    assert [e for e in expected if e not in text] == [], text
    assert [n for n in notes if n in text] == [], text
    assert images == n_images


@pytest.mark.slow
@pytest.mark.parametrize("notebook", sorted(ON_NOTHING))
def test_notebook_notes_missing_data_instead_of_failing(notebook, tmp_path, monkeypatch):
    text, images = _execute(notebook, monkeypatch, str(tmp_path / "nothing_here"))
    assert [e for e in ON_NOTHING[notebook] + [NO_RUNS_WARNING] if e not in text] == [], text
    assert images == 0
