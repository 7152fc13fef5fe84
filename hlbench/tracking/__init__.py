"""Run tracking: the run folder (config.yaml, env.json, metrics.jsonl, summary.json, hl_maps/) and W&B."""
from hlbench.tracking.environment import environment_record
from hlbench.tracking.hl_maps import colorize_hl, colorize_labels, default_palette, hl_panel_figure, save_figure
from hlbench.tracking.run_folder import (append_jsonl, atomic_write_json, atomic_write_text, atomic_write_yaml,
                                         current_metrics, read_json, read_jsonl, read_yaml, write_config)
from hlbench.tracking.tracker import Tracker, wandb_mode

__all__ = ["Tracker", "append_jsonl", "atomic_write_json", "atomic_write_text", "atomic_write_yaml",
           "colorize_hl", "colorize_labels", "current_metrics", "default_palette", "environment_record",
           "hl_panel_figure", "read_json", "read_jsonl", "read_yaml", "save_figure", "wandb_mode",
           "write_config"]
