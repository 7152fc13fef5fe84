"""Suites: one file per table (experiments/suites/<name>.yaml). A paper table's suite holds its cells (row,
column, the experiment that fills it, the paper's numbers); a study's suite is a bare list of experiments.

An experiment file is a paper row's baseline; a cell or list entry with `hl: true` runs it with hl.enabled=true.
Each such run is named run_name(experiment, hl): `<experiment>` or `<experiment>+hl`, the name of its run folder,
its summary and its W&B run."""
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


HL_SUFFIX = "+hl"


def run_name(experiment: str, hl: bool) -> str:
    """The name of `experiment` run with hl.enabled=`hl`."""
    return experiment + (HL_SUFFIX if hl else "")


def run_overrides(name: str) -> list[str]:
    """The overrides that compose the run `name` (run_name): its experiment and hl.enabled."""
    hl = name.endswith(HL_SUFFIX)
    return [f"experiment={name[:-len(HL_SUFFIX)] if hl else name}", f"hl.enabled={hl}"]


def _entry(path: Path, where: str, entry) -> dict:
    """{experiment, hl} of a cell or list entry: a mapping with `experiment` (and `hl`), or a bare name."""
    if isinstance(entry, str):
        entry = {"experiment": entry}
    if not isinstance(entry, (dict, DictConfig)) or not isinstance(entry.get("experiment"), str):
        raise ConfigError(f"{path}: {where} must name an experiment (a name, or a mapping with 'experiment')")
    hl = entry.get("hl", False)
    if not isinstance(hl, bool):
        raise ConfigError(f"{path}: {where}: hl={hl!r}; expected true or false")
    return {"experiment": entry["experiment"], "hl": hl}


def load_suite(name: str) -> DictConfig:
    """A suite: a paper table's `cells` (each names the experiment that fills it, `hl: true` for an HL column), or a
    bare `experiments` list for a table the paper does not have. `runs` is filled with {name, experiment, hl} per
    cell or entry, in order."""
    path = suite_file(name)
    suite = OmegaConf.load(path)
    cells = suite.get("cells")
    if cells is not None:
        if suite.get("experiments") is not None:
            raise ConfigError(f"{path}: give 'cells' or 'experiments', not both (the cells name the experiments)")
        for i, cell in enumerate(cells):
            if missing := [k for k in ("experiment", "row", "column") if cell.get(k) is None]:
                raise ConfigError(f"{path}: cells[{i}] has no {', '.join(missing)}")
        entries = [_entry(path, f"cells[{i}]", cell) for i, cell in enumerate(cells)]
    else:
        entries = [_entry(path, f"experiments[{i}]", e) for i, e in enumerate(suite.get("experiments") or [])]
    if not entries:
        raise ConfigError(f"{path}: expected a non-empty 'cells' or 'experiments' list")
    suite.runs = [{"name": run_name(e["experiment"], e["hl"]), **e} for e in entries]
    if len(names := [r["name"] for r in suite.runs]) != len(set(names)):
        raise ConfigError(f"{path}: {sorted(n for n in set(names) if names.count(n) > 1)} listed more than once")
    return suite


def suite_cards(suite: DictConfig) -> dict[str, dict]:
    """{run name: its expected-results card} of a suite's cells: the table's `paper` fields, the row's (`rows`),
    the cell's own, and the paper's baseline of the row, the value of its `baseline_column` cell (default
    "baseline"), where the table has one."""
    plain = OmegaConf.to_container(suite)
    table, rows, cells = plain.get("paper") or {}, plain.get("rows") or {}, plain.get("cells") or []
    column = suite.get("baseline_column", "baseline")
    baselines = {cell["row"]: cell.get("value") for cell in cells if cell["column"] == column}
    cards = {}
    for cell in cells:
        card = {**table, **rows.get(cell["row"], {}),
                **{k: v for k, v in cell.items() if k not in ("experiment", "hl")}}
        if cell["row"] in baselines:
            card["baseline"] = baselines[cell["row"]]
        cards[run_name(cell["experiment"], cell.get("hl", False))] = card
    return cards


def paper_card(name: str, suite: DictConfig | None = None) -> dict | None:
    """The card of the run `name` (run_name) from its suite's cell: `suite`'s, else that of the suite whose cells
    name it."""
    if suite is not None and (card := suite_cards(suite).get(name)) is not None:
        return card
    for path in sorted((experiments_dir() / "suites").glob("*.yaml")):
        if (card := suite_cards(load_suite(path.stem)).get(name)) is not None:
            return card
    return None
