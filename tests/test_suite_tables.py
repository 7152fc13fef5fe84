"""Our runs in each paper table's shape, read from the suite file's cells."""
import pandas as pd
import pytest

from analysis.suite_tables import profiles, suite_table
from hlbench.suites import load_suite, paper_card


def _runs(experiments, final, best):
    return pd.DataFrame([{"experiment": e, "seed": seed, "final.mIoU": final + seed / 100,
                          "best.mIoU": best + seed / 100} for e in experiments for seed in (0, 1)])


def test_fullsup_table_has_the_papers_rows_and_columns_with_ours_beside_its_numbers():
    runs = _runs(["fullsup/fcn_r101", "fullsup/fcn_r101+hl"], 0.70, 0.72)
    table = suite_table(runs, "fullsup")
    assert table.index.tolist()[:6] == ["fcn", "pspnet", "deeplabv3", "deeplabv3plus", "upernet", "ocrnet"]
    assert table.columns.tolist() == ["baseline", "HL"] and table.columns.name == "final"
    paper = paper_card("fullsup/fcn_r101+hl")["value"]
    assert table.loc["fcn", "HL"] == f"70.50 ± 0.71 (2); paper {paper:g}"
    assert table.loc["ocrnet", "baseline"] == f"; paper {paper_card('fullsup/ocrnet_r101')['value']:g}"  # no run yet
    assert suite_table(runs, "fullsup", "best").loc["fcn", "HL"].startswith("72.50 ± 0.71 (2)")
    assert "final" in table.attrs["title"]


def test_a_profiles_runs_make_their_own_table_and_a_smoke_model_is_not_set_beside_the_paper():
    real = _runs(["fullsup/fcn_r101"], 0.70, 0.72).assign(profile=None)
    smoke = _runs(["fullsup/fcn_r101"], 0.05, 0.05).assign(profile="smoke")
    runs = pd.concat([real, smoke], ignore_index=True)
    assert profiles(runs) == [None, "smoke"] and profiles(_runs(["x"], 0, 0)) == [None]
    paper = paper_card("fullsup/fcn_r101")["value"]
    assert suite_table(runs, "fullsup").loc["fcn", "baseline"] == f"70.50 ± 0.71 (2); paper {paper:g}"
    table = suite_table(runs, "fullsup", profile="smoke")
    assert table.loc["fcn", "baseline"] == "5.50 ± 0.71 (2); smoke model"
    assert table.loc["ocrnet", "HL"] == "; smoke model" and "profile=smoke" in table.attrs["title"]


def test_every_paper_suite_is_a_full_grid_and_the_bare_lists_are_refused():
    for name in ("fullsup", "losses", "ade20k", "dg", "semisup", "unimatch_suponly"):
        table = suite_table(pd.DataFrame(columns=["experiment"]), name)
        assert table.size == len(load_suite(name).runs)  # one cell per experiment, none left over
    assert suite_table(pd.DataFrame(columns=["experiment"]), "losses").columns.tolist() == \
        ["ce", "balanced_ce", "ohem", "focal", "hl"]
    with pytest.raises(KeyError, match="no cells"):
        suite_table(pd.DataFrame(columns=["experiment"]), "smoke")
    with pytest.raises(KeyError, match="shows"):
        suite_table(pd.DataFrame(columns=["experiment"]), "fullsup", "median")
