"""Analysis of hlbench run folders: load runs and metrics, aggregate over seeds, render tables."""
from analysis.runs import CONFIG_AXES, find_run_dirs, load_runs, read_metrics
from analysis.tables import aggregate, format_mean_std, format_table

__all__ = ["CONFIG_AXES", "aggregate", "find_run_dirs", "format_mean_std", "format_table", "load_runs",
           "read_metrics"]
