"""notebooks/hl_analysis: the .ipynb matches its jupytext .py, carries no outputs, and runs headless on real runs."""
import jupytext
import nbformat
import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from nbclient import NotebookClient

from hlbench.run import run
from tests.conftest import REPO, TINY, compose_run

NOTEBOOK = REPO / "notebooks" / "hl_analysis.ipynb"


def _sources(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_ipynb_is_paired_with_py_and_has_no_outputs():
    ipynb = nbformat.read(NOTEBOOK, as_version=4)
    assert _sources(ipynb) == _sources(jupytext.read(NOTEBOOK.with_suffix(".py"))), \
        "notebooks/hl_analysis.ipynb is stale: run `jupytext --sync notebooks/hl_analysis.py`"
    code = [c for c in ipynb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The real smoke suite (baseline + HL, seed 0), 4 iterations with HL maps at 2 and 4: one stability pair."""
    out = tmp_path_factory.mktemp("runs")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
        run(*compose_run(TINY + ["train.iters=4", "train.hl_map_interval=2"], out))
    GlobalHydra.instance().clear()
    return out


def _execute(runs_dir, monkeypatch):
    """Run the notebook in a fresh kernel (the venv's python3) with HLBENCH_RUNS set; returns all text output."""
    monkeypatch.setenv("HLBENCH_RUNS", str(runs_dir))
    # The kernel picks the inline backend (figures become image/png outputs) unless a backend is forced.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    return text, images


@pytest.mark.slow
def test_notebook_runs_on_smoke_runs(smoke_runs, monkeypatch):
    text, images = _execute(smoke_runs, monkeypatch)
    assert "2 run(s)" in text and "1 with HL" in text
    assert "smoke/hl" in text and "smoke/baseline" in text and "±" in text  # runs table
    assert "hl_rank_corr" in text  # stability table (maps at iters 2 and 4)
    assert "1 pair(s)" in text and "mean Δ" in text
    assert not any(note in text for note in ("no runs", "no train/val", "no HL-map", "no pairs", "no baseline/HL"))
    assert images == 4  # learning curves, one HL panel, stability, per-class Δ


@pytest.mark.slow
def test_notebook_notes_missing_data_instead_of_failing(tmp_path, monkeypatch):
    text, images = _execute(tmp_path / "nothing_here", monkeypatch)
    assert "0 run(s)" in text and "no HL-map panels" in text and "no per-class Δ" in text
    assert images == 0
