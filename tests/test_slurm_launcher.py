"""The README's SLURM command composes: Hydra's submitit launcher with hlbench's config and an experiment."""
import shlex

from hydra.utils import get_class

from hlbench.compose import compose
from tests.conftest import REPO


def _readme_slurm_overrides() -> list[str]:
    (line,) = [ln for ln in (REPO / "README.md").read_text().splitlines()
               if ln.startswith("python -m hlbench.run -m hydra/launcher=submitit_slurm")]
    args = shlex.split(line)[3:]
    assert args[0] == "-m"
    # One job of the sweep: the first value of each swept key.
    return [a.split(",")[0] for a in args[1:]]


def test_readme_submitit_slurm_command_composes(hydra_ctx):
    overrides = _readme_slurm_overrides()
    assert "hydra/launcher=submitit_slurm" in overrides and "resume=true" in overrides
    cfg = compose(overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.max_num_timeout == 3
    assert cfg.model.name == "pspnet_r101" and cfg.hl.enabled is False and cfg.resume is True
