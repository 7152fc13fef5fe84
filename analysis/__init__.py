"""Analysis of hlbench run folders and the authors' logs: load runs and metrics, aggregate over seeds, tables."""
import importlib

# Loaded on first use, so that `python -m analysis.tables` does not find analysis.tables already imported by
# the package (runpy warns that running a module the package imported "may result in unpredictable behaviour").
_EXPORTS = {"CONFIG_AXES": "analysis.runs", "find_run_dirs": "analysis.runs", "load_runs": "analysis.runs",
            "read_metrics": "analysis.runs", "aggregate": "analysis.tables", "format_mean_std": "analysis.tables",
            "format_table": "analysis.tables"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
