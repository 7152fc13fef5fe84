"""The end-of-suite comparison table: grouping by experiment, mean ± std (n), paper card columns."""
from hlbench.report import comparison_table


def _summary(exp, seed, miou, hl=False, paper=None):
    return {"experiment": exp, "seed": seed, "hl": hl, "final": {"mIoU": miou}, "report_IoU": None,
            "hl_auroc": 0.75 if hl else None, "train_time_s": 10.0, "s_per_iter": 0.5, "paper": paper,
            "report_classes": ["pole"]}


def test_table_groups_seeds_and_shows_paper_card():
    rows = [_summary("a", 0, 0.50), _summary("a", 1, 0.52),
            _summary("b", 0, 0.60, hl=True, paper={"value": 80.65, "s_per_iter": 0.916})]
    lines = comparison_table(rows, title="T").splitlines()
    assert lines[0] == "T"
    a = next(l for l in lines if l.startswith("a "))
    b = next(l for l in lines if l.startswith("b "))
    assert "51.00 ± 1.41 (2)" in a and "–" in a
    assert "60.00" in b and "0.750" in b and "80.65" in b and "0.916" in b and " yes " in b
