"""Analysis of hlbench run folders (runs, tables, suite_tables, semisup, hl_maps, stability, hl_study, dashboard)
and of the HL authors' logs (logs, authors_tables)."""
from analysis.runs import CONFIG_AXES, find_run_dirs, load_runs, read_metrics
from analysis.tables import aggregate, format_mean_std, format_table

__all__ = ["CONFIG_AXES", "aggregate", "find_run_dirs", "format_mean_std", "format_table", "load_runs",
           "read_metrics"]
