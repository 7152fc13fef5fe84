"""Our runs in each paper table's shape, read from the suite file's cells."""
import pandas as pd
import pytest

from analysis.suite_tables import suite_table
from hlbench.suites import load_suite, paper_card


def _runs(experiments, final, best):
    return pd.DataFrame([{"experiment": e, "seed": seed, "final.mIoU": final + seed / 100,
                          "best.mIoU": best + seed / 100} for e in experiments for seed in (0, 1)])


def test_fullsup_table_has_the_papers_rows_and_columns_with_ours_beside_its_numbers():
    runs = _runs(["fullsup/fcn_r101", "fullsup/fcn_r101_hl"], 0.70, 0.72)
    table = suite_table(runs, "fullsup")
    assert table.index.tolist() == ["fcn", "pspnet", "deeplabv3", "deeplabv3plus", "upernet", "ocrnet"]
    assert table.columns.tolist() == ["baseline", "HL"] and table.columns.name == "final"
    paper = paper_card("fullsup/fcn_r101_hl")["value"]
    assert table.loc["fcn", "HL"] == f"70.5 ± 0.7 (2) | {paper:g}"
    assert table.loc["ocrnet", "baseline"].startswith(" | ")  # no run yet: the paper's number alone
    assert suite_table(runs, "fullsup", "best").loc["fcn", "HL"].startswith("72.5 ± 0.7 (2)")
    assert "final" in table.attrs["title"]


def test_every_paper_suite_is_a_full_grid_and_the_bare_lists_are_refused():
    for name in ("fullsup", "losses", "ade20k", "dg", "semisup", "unimatch_suponly"):
        table = suite_table(pd.DataFrame(columns=["experiment"]), name)
        assert table.size == len(load_suite(name).experiments)  # one cell per experiment, none left over
    assert suite_table(pd.DataFrame(columns=["experiment"]), "losses").columns.tolist() == \
        ["ce", "balanced_ce", "ohem", "focal", "hl"]
    with pytest.raises(KeyError, match="no cells"):
        suite_table(pd.DataFrame(columns=["experiment"]), "smoke")
    with pytest.raises(KeyError, match="shows"):
        suite_table(pd.DataFrame(columns=["experiment"]), "fullsup", "median")
