"""Suites: one file per table (experiments/suites/<name>.yaml). A paper table's suite holds its cells (row,
column, the experiment that fills it, the paper's numbers); a study's suite is a bare list of experiments."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .paths import experiments_dir


def suite_file(name: str) -> Path:
    path = experiments_dir() / "suites" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"suite={name!r}: no file {path}; known suites: {', '.join(known)}")
    return path


def load_suite(name: str) -> DictConfig:
    """A suite: a paper table's `cells` (each names the experiment that fills it), or a bare `experiments` list
    for a table the paper does not have; `experiments` is filled from the cells."""
    path = suite_file(name)
    suite = OmegaConf.load(path)
    cells = suite.get("cells")
    if cells is not None:
        if suite.get("experiments") is not None:
            raise ConfigError(f"{path}: give 'cells' or 'experiments', not both (the cells name the experiments)")
        for i, cell in enumerate(cells):
            if missing := [k for k in ("experiment", "row", "column") if cell.get(k) is None]:
                raise ConfigError(f"{path}: cells[{i}] has no {', '.join(missing)}")
        suite.experiments = [cell.experiment for cell in cells]
    if not suite.get("experiments"):
        raise ConfigError(f"{path}: expected a non-empty 'cells' or 'experiments' list")
    return suite


def suite_cards(suite: DictConfig) -> dict[str, dict]:
    """{experiment: its expected-results card} of a suite's cells: the table's `paper` fields, the row's (`rows`),
    the cell's own, and the paper's baseline of the row, the value of its `baseline_column` cell (default
    "baseline"), where the table has one."""
    plain = OmegaConf.to_container(suite)
    table, rows, cells = plain.get("paper") or {}, plain.get("rows") or {}, plain.get("cells") or []
    column = suite.get("baseline_column", "baseline")
    baselines = {cell["row"]: cell.get("value") for cell in cells if cell["column"] == column}
    cards = {}
    for cell in cells:
        card = {**table, **rows.get(cell["row"], {}), **{k: v for k, v in cell.items() if k != "experiment"}}
        if cell["row"] in baselines:
            card["baseline"] = baselines[cell["row"]]
        cards[cell["experiment"]] = card
    return cards


def paper_card(experiment: str, suite: DictConfig | None = None) -> dict | None:
    """The card of `experiment` from its suite's cell: `suite`'s, else that of the suite whose cells name it."""
    if suite is not None and (card := suite_cards(suite).get(experiment)) is not None:
        return card
    for path in sorted((experiments_dir() / "suites").glob("*.yaml")):
        if (card := suite_cards(load_suite(path.stem)).get(experiment)) is not None:
            return card
    return None
