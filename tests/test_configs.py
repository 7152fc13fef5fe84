"""Every config in the tree composes, alone and under profile=smoke; suites name existing experiments."""
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from hlbench.config_checks import check_config
from hlbench.errors import ConfigError
from hlbench.suites import load_suite
from tests.conftest import EXPERIMENTS

CONF = Path(__file__).resolve().parents[1] / "hlbench" / "conf"
EXPERIMENT_NAMES = sorted(str(p.relative_to(EXPERIMENTS / "experiment").with_suffix(""))
                          for p in (EXPERIMENTS / "experiment").rglob("*.yaml"))
SUITE_NAMES = sorted(p.stem for p in (EXPERIMENTS / "suites").glob("*.yaml"))
# Options in subfolders too (model=tiny/<family>, the smoke models).
GROUP_OPTIONS = sorted((d.name, p.relative_to(d).with_suffix("").as_posix()) for d in CONF.iterdir()
                       if d.is_dir() and not d.name.startswith("_") for p in d.rglob("*.yaml"))


def test_configs_were_found():
    assert len(EXPERIMENT_NAMES) >= 2 and "smoke" in SUITE_NAMES and len(GROUP_OPTIONS) >= 8


@pytest.mark.parametrize("name", EXPERIMENT_NAMES)
@pytest.mark.parametrize("profile", [[], ["profile=smoke"]])
def test_experiment_composes(hydra_ctx, name, profile):
    cfg = compose("config", overrides=[f"experiment={name}"] + profile)
    OmegaConf.to_container(cfg, resolve=True)
    check_config(cfg)
    if profile:
        assert cfg.data.name == "synthetic" and cfg.model.backbone.width_mult < 1


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_group_option_composes(hydra_ctx, group, option):
    cfg = compose("config", overrides=[f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)
    check_config(cfg)


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_suite_lists_existing_experiments(suite):
    names = load_suite(suite).experiments
    assert names and all(n in EXPERIMENT_NAMES for n in names)


def test_cli_override_beats_experiment(hydra_ctx):
    cfg = compose("config", overrides=["experiment=smoke/hl", "hl.enabled=false", "model=pspnet_r50"])
    assert cfg.hl.enabled is False and cfg.model.name == "pspnet_r50"


def test_unknown_key_rejected(hydra_ctx):
    with pytest.raises(Exception, match="train.itres"):
        compose("config", overrides=["train.itres=5"])


@pytest.mark.parametrize("override,key", [("hl.scope=pixel", "hl.scope"), ("train.iters=0", "train.iters"),
                                          ("optim.name=rmsprop", "optim.name"), ("eval.mode=slide", "eval.mode")])
def test_bad_value_names_the_key(hydra_ctx, override, key):
    cfg = compose("config", overrides=[override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(cfg)


def test_hl_variant_tag(hydra_ctx):
    from hlbench.methods import LabelledLoss

    def variant(overrides, per_device=8):
        return LabelledLoss(compose("config", overrides=overrides), per_device).variant()

    paper = ["experiment=fullsup/pspnet_r101_hl"]
    assert variant(paper) == "reference"           # one GPU x 8 = 4 groups of 2, as 4 GPUs x 2
    assert variant(paper, per_device=2) == "reference"
    assert variant(paper, per_device=1) == "custom"  # 8 x 1 cannot see the other image of a reference GPU
    assert variant(paper + ["hl.scope=batch"]) == "custom"
    assert variant(paper + ["hl.scope=image"]) == "custom"
    assert variant(paper + ["hl.scope=group", "hl.group_size=2"]) == "reference"
    assert variant(["experiment=ade20k/pspnet_r50_hl"], per_device=16) == "reference"
    assert variant(["experiment=ade20k/pspnet_r50_hl", "hl.scope=group", "hl.group_size=2"], 16) == "custom"
    assert variant(["experiment=smoke/hl"]) == "custom"  # hl.lr_mult=10
    assert variant(["experiment=smoke/baseline"]) == "off"


CPU_STUDIES = ("smoke/", "semisup_synthetic/", "hl_study/")  # the CPU studies' own layouts, not a paper recipe's


@pytest.mark.parametrize("name", [n for n in EXPERIMENT_NAMES if not n.startswith(CPU_STUDIES)])
def test_paper_recipes_state_the_reference_layout_and_train_in_fp32(hydra_ctx, name):
    cfg = compose("config", overrides=[f"experiment={name}"])
    ref = cfg.train.reference
    layouts = {"ade20k/": (4, 4), "semisup/suponly": (4, 4), "semisup/u2pl": (8, 2), "semisup/unimatch": (8, 1)}
    expected = next((v for prefix, v in layouts.items() if name.startswith(prefix)), (4, 2))
    assert (ref.gpus, ref.per_gpu) == expected and ref.gpus * ref.per_gpu == cfg.train.batch_size
    assert cfg.train.precision == "fp32" and cfg.hl.scope == "reference"


def test_each_paper_number_has_one_place_the_suite_cell():
    # Experiment files name their parts; the paper's numbers live in the suite that is the paper's table.
    assert not [n for n in EXPERIMENT_NAMES
                if OmegaConf.load(EXPERIMENTS / "experiment" / f"{n}.yaml").get("paper") is not None]
    cells = [e for s in SUITE_NAMES for e in (load_suite(s).experiments if load_suite(s).get("cells") else [])]
    assert len(cells) == len(set(cells))  # no experiment fills two cells
    paper_settings = [n for n in EXPERIMENT_NAMES if not n.startswith(CPU_STUDIES)]
    assert sorted(cells) == sorted(paper_settings)
