"""`python -m hlbench.run`: run the smoke suite, one experiment (`experiment=`) or a suite (`suite=`).

Hydra composes the config; `run()` does the work and is what tests call. Every run gets a deterministic run
folder <out_dir>/<suite or "runs">/<experiment>[-<profile>]/seed<k> so a requeued job finds its checkpoints.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .compose import compose, hydra_context, with_smoke_model
from .config_checks import check_config
from .engine.cores import set_intra_op_threads
from .engine.preemption import INTERRUPT_EXIT
from .errors import ConfigError, RunStopped
from .paths import experiments_dir
from .report import comparison_table, methods_by_split_table
from .suites import load_suite, paper_card, run_name, run_overrides, suite_file
from .tracking.run_folder import claimed_run_folder
from .weights import require_pretrained

log = logging.getLogger("hlbench")


def run_dir_for(cfg, experiment: str, suite: str | None, profile: str | None, seed: int) -> Path:
    """Deterministic run folder; with resume=false an existing folder is never reused (a -2, -3... sibling is)."""
    name = experiment.replace("/", "-") + (f"-{profile}" if profile else "")
    base = Path(cfg.out_dir) / (suite or "runs") / name / f"seed{seed}"
    versions = [base] + sorted((p for p in base.parent.glob(f"seed{seed}-*") if p.name.rsplit("-", 1)[1].isdigit()),
                               key=lambda p: int(p.name.rsplit("-", 1)[1]))
    existing = [p for p in versions if p.exists()]
    if cfg.resume:
        return existing[-1] if existing else base
    if not existing:
        return base
    last = int(existing[-1].name.rsplit("-", 1)[1]) if existing[-1] != base else 1
    return base.parent / f"seed{seed}-{last + 1}"


def run_experiment(cfg: DictConfig, experiment: str, suite: str | None, profile: str | None) -> dict:
    """Train + evaluate one experiment for cfg.seed; returns its summary (with run_dir)."""
    from .engine.distributed import broadcast_from_main, init_distributed
    from .engine.trainer import train

    check_config(cfg)
    require_pretrained(cfg)
    info = init_distributed(cfg.device)
    meta = {"experiment": experiment, "suite": suite, "profile": profile, "name": f"{experiment}-s{cfg.seed}"}
    # Rank 0 claims the folder (another job starting at the same moment gets another one) and tells the others.
    claim = claimed_run_folder(lambda: run_dir_for(cfg, experiment, suite, profile, int(cfg.seed)), bool(cfg.resume))
    with (claim if info.is_main else nullcontext()) as claimed:
        run_dir = broadcast_from_main(claimed)
        if info.is_main:
            log.info("run folder: %s", run_dir)
        summary = train(cfg, run_dir, info, meta)
    summary["run_dir"] = str(run_dir)
    return summary


def _seeds(cfg) -> list[int]:
    return [int(s) for s in cfg.seeds] if cfg.seeds is not None else [int(cfg.seed)]


def run(cfg: DictConfig, choices: dict, overrides: list[str], multirun: bool = False) -> list[dict]:
    """Run what the composed config asks for: one experiment, or every experiment of cfg.suite; all seeds."""
    from .data import require_data_root
    from .data.hl_maps import require_hl_maps

    profile = choices.get("profile")
    experiment = choices.get("experiment")
    if experiment is not None:
        if (smoke := with_smoke_model(overrides, cfg.model)) != list(overrides):
            cfg = compose(smoke)  # profile=smoke: the tiny model of the experiment's family
        name = run_name(experiment, bool(cfg.hl.enabled))
        plan = [(name, cfg)]
        suite_name, table, layout, suite = None, name, None, None
    else:
        suite = load_suite(cfg.suite)
        suite_name, table, layout = cfg.suite, suite.get("table", cfg.suite), suite.get("layout")
        if layout not in (None, "methods_by_split"):
            raise ConfigError(f"{suite_file(cfg.suite)}: layout={layout!r}; expected methods_by_split or none")
        # Each suite member is composed as if the user had typed experiment=<member> hl.enabled=<its hl> plus their
        # overrides.
        keep = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~") in ("suite", "experiment")]
        plan = [(r.name, compose(keep + run_overrides(r.name))) for r in suite.runs]
    # Every run's config, weights and data folders are checked before the first starts: a suite never stops hours in.
    for name, c in plan:
        check_config(c)
        require_pretrained(c)
        require_data_root(c.data)
        require_hl_maps(c, profile)  # a fixed-map HL run's export (profile=smoke: a uniform stand-in if none fits)
        if c.paper is None:  # the card lives in the suite's cell (paper=... on the command line replaces it)
            OmegaConf.update(c, "paper", paper_card(name, suite), force_add=True)
    jobs = [(name, c, s) for name, c in plan for s in _seeds(c)]
    if multirun and len(jobs) > 1:
        raise ConfigError("in a Hydra multirun each job must be one run: sweep experiment=... and seed=..., "
                          "not suite= or seeds=")
    summaries = []
    for name, c, seed in jobs:
        c = c.copy()
        OmegaConf.set_struct(c, False)
        c.seed = seed
        OmegaConf.set_struct(c, True)
        summaries.append(run_experiment(c, name, suite_name, profile))
    if int(os.environ.get("RANK", "0")) == 0:
        print(comparison_table(summaries, title=table))
        if layout == "methods_by_split":
            print(methods_by_split_table(summaries, title=f"{table}, as the paper lays it out"))
        print("outputs:", *sorted({str(Path(s['run_dir']).parent) for s in summaries}), sep="\n  ")
    return summaries


def known_experiments() -> list[str]:
    root = experiments_dir() / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def print_catalogue() -> None:
    """`python -m hlbench.run list`: the experiments and suites that experiment= and suite= accept."""
    suites = sorted(p.stem for p in (experiments_dir() / "suites").glob("*.yaml"))
    print(f"experiments ({experiments_dir() / 'experiment'}):", *known_experiments(), sep="\n  ")
    print(f"suites ({experiments_dir() / 'suites'}):", *suites, sep="\n  ")
    print("a composed config: python -m hlbench.run experiment=<name> [overrides] --cfg job")


# Config nodes whose keys are the user's to choose, so `+key=value` may add to them: the expected-results card and
# Hydra's own settings (launchers take extra keys).
OPEN_KEYS = ("paper", "hydra")


def _unknown_key(key: str, override: str, cfg) -> ConfigError:
    """The one-line error for an override of a key the config does not have, with the closest existing key."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    siblings = OmegaConf.select(cfg, parent) if parent else cfg
    names = [f"{parent}.{k}" if parent else str(k) for k in siblings] if isinstance(siblings, DictConfig) else []
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{override}: the config has no key {key}{hint} (unknown keys are refused, with or "
                       f"without +, so that a typo cannot run unnoticed)")


def check_overrides(overrides: list[str]) -> None:
    """Compose once before Hydra starts, so that a bad override is one line naming it (Hydra prints several).

    An override that adds a key (`+key=`, `++key=`) outside OPEN_KEYS must name a key the config already has."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException

    try:
        with hydra_context():
            cfg = compose(overrides, return_hydra_config=True)
            groups = set(cfg.hydra.runtime.choices)
            added = {o.key_or_group: o.input_line for o in OverridesParser.create().parse_overrides(overrides)
                     if (o.is_add() or o.is_force_add()) and o.key_or_group not in groups
                     and o.key_or_group.split(".")[0] not in OPEN_KEYS}
            if added:
                base = compose([o for o in overrides if o not in added.values()])
                missing = object()
                for key, line in added.items():
                    if OmegaConf.select(base, key, default=missing) is missing:
                        raise _unknown_key(key, line, base)
    except MissingConfigException as err:
        first = str(err).splitlines()[0]
        # Experiments live on the search path, for which Hydra lists no options.
        options = err.options or (known_experiments() if "'experiment/" in first else [])
        raise ConfigError(first + (f"; available: {', '.join(options)}" if options else "")) from None
    except HydraException as err:
        if (match := re.match(r"Could not override '([^']+)'", str(err))) is not None:
            # Hydra's hint here is to add the key with +, which would then run with the key ignored.
            key = match.group(1)
            line = next(o for o in overrides if o.split("=", 1)[0].lstrip("+~") == key)
            raise _unknown_key(key, line, compose([o for o in overrides if o != line])) from None
        lines = [ln.strip().rstrip(".") for ln in str(err).splitlines() if ln.strip() and not ln.startswith("See ")]
        raise ConfigError("; ".join(lines)) from None


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    set_intra_op_threads()
    hc = HydraConfig.get()
    try:
        run(cfg, dict(hc.runtime.choices), list(hc.overrides.task), multirun=hc.mode.name == "MULTIRUN")
    except RunStopped as err:
        # A fault the run handled (pre-emption, non-finite loss, full disk): one line; its exit status tells a
        # requeueing launcher whether to resubmit (preemption.REQUEUE_EXIT).
        if os.environ.get("HLBENCH_TRACEBACK"):
            raise
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        # A Ctrl-C outside the training steps (building, evaluating) or a second one: nothing to checkpoint.
        if os.environ.get("HLBENCH_TRACEBACK"):
            raise
        print("stopped: Ctrl-C outside a training step: no checkpoint written; resume=true continues from the "
              "newest one", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT)
    except ConfigError as err:
        # Bad input (config values, data, weights) is reported in one line; HLBENCH_TRACEBACK=1 shows the trace.
        # Any other exception is a fault of ours and keeps its traceback.
        if os.environ.get("HLBENCH_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def launch(hydra_entry) -> None:
    """Check the command line's overrides (one-line errors), then hand over to a @hydra.main entry point."""
    args = sys.argv[1:]
    if args == ["list"]:
        print_catalogue()
        return
    # Hydra's own flags (--multirun sweeps, --cfg, --help) go to Hydra unchecked: sweeps do not compose as one job.
    if not any(a.startswith("-") for a in args):
        try:
            check_overrides(args)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    hydra_entry()


def main() -> None:
    launch(hydra_main)


if __name__ == "__main__":
    main()
