"""Hydra search-path plugin: adds hlbench's experiments folder (experiment/, suites/) to hlbench's config search path.

Hydra discovers it in the hydra_plugins namespace package, so nothing has to be set when hlbench is imported.
"""
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

import hlbench
from hlbench.paths import experiments_dir

CONF_DIR = Path(hlbench.__file__).resolve().parent / "conf"


def is_hlbench_config(path: str) -> bool:
    """Whether a search-path entry is hlbench's config package, in the forms Hydra gives it: pkg://hlbench.conf
    (compose API), pkg://hlbench/conf (@hydra.main, imported) or its folder (`python -m hlbench.run`)."""
    if path.startswith("pkg://"):
        return path[len("pkg://"):].replace("/", ".") == "hlbench.conf"
    return Path(path.removeprefix("file://")).resolve() == CONF_DIR


class HlbenchExperimentsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Hydra calls every installed search-path plugin for every Hydra app: leave the other apps alone.
        if any(is_hlbench_config(element.path) for element in search_path.get_path()):
            search_path.append(provider="hlbench-experiments", path=f"file://{experiments_dir()}")
