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


def test_methods_by_split_table_is_shaped_like_the_paper():
    from hlbench.report import methods_by_split_table

    def run(row, col, seed, best, last, rescored=None, value=70.0):
        s = _summary(f"{row}-{col}", seed, last, paper={"row": row, "column": col, "value": value})
        s["best"] = {"mIoU": best, **({"rescored": {"mIoU": rescored}} if rescored is not None else {})}
        return s

    rows = [run("U2PL", "1/16", 0, 0.60, 0.58, rescored=0.70), run("U2PL", "1/16", 1, 0.61, 0.59, rescored=0.72),
            run("U2PL", "1/8", 0, 0.75, 0.74), run("UniMatch", "1/16", 0, 0.76, 0.75, value=75.7),
            run("UniMatch", "1/2", 0, 0.80, 0.79, value=None)]
    text = methods_by_split_table(rows, title="S").splitlines()
    rule = text[text.index("mIoU x100, reference selection rule:") + 1:text.index("mIoU x100, last iteration:")]
    assert rule[0].split() == ["method", "1/16", "ours", "(paper)", "1/8", "ours", "(paper)", "1/2", "ours", "(paper)"]
    u2pl = next(line for line in rule if line.startswith("U2PL"))
    assert "71.00 ± 1.41 (2) (70.0)" in u2pl and "75.00 (1) (70.0)" in u2pl  # re-scored best where there is one
    unimatch = next(line for line in rule if line.startswith("UniMatch"))
    assert "76.00 (1) (75.7)" in unimatch and "80.00 (1) (–)" in unimatch
    last = text[text.index("mIoU x100, last iteration:"):]
    assert "58.50 ± 0.71 (2) (70.0)" in next(line for line in last if line.startswith("U2PL"))


def test_a_smoke_model_run_is_not_set_beside_the_papers_number():
    from hlbench.report import methods_by_split_table

    card = {"row": "U2PL", "column": "1/8", "value": 74.4, "s_per_iter": 0.9}
    smoke = dict(_summary("semisup/u2pl_1_8", 0, 0.5, paper=card), profile="smoke", best={"mIoU": 0.5})
    fast = dict(_summary("semisup/u2pl_1_4", 0, 0.6, paper=dict(card, column="1/4")), profile="fast",
                best={"mIoU": 0.6})
    lines = comparison_table([smoke, fast]).splitlines()
    smoke_line = next(line for line in lines if line.startswith("semisup/u2pl_1_8"))
    assert smoke_line.count("smoke model") == 2 and "74.40" not in smoke_line  # mIoU and s/iter
    assert "74.40" in next(line for line in lines if line.startswith("semisup/u2pl_1_4"))  # same model, bf16
    table = methods_by_split_table([smoke, fast])
    assert "50.00 (1) (smoke model)" in table and "60.00 (1) (74.4)" in table and "50.00 (1) (74.4)" not in table
