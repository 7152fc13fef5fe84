"""Every config in the tree composes, alone and under profile=smoke; suites name existing experiments."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.config_checks import check_config
from hlbench.errors import ConfigError
from hlbench.suites import load_suite, suite_cards
from tests.conftest import EXPERIMENTS, SMOKE_HL

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
    cfg = compose([f"experiment={name}"] + profile)  # profile=smoke: the family's tiny model
    OmegaConf.to_container(cfg, resolve=True)
    check_config(cfg)
    if profile:
        assert cfg.data.name == "synthetic" and cfg.model.name.startswith("tiny/")


def companions(group, option) -> list[str]:
    """The overrides an option trains with: a Mask2Former model and the mask2former method only go together."""
    if group == "method" and option == "mask2former":
        return ["model=tiny/mask2former"]
    if group == "model" and OmegaConf.load(CONF / "model" / f"{option}.yaml").head.get("type") == "mask2former":
        return ["method=mask2former"]
    return []


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_group_option_composes(hydra_ctx, group, option):
    cfg = compose([f"{group}={option}", *companions(group, option)])
    if cfg.train.epochs is not None:  # a schedule in epochs needs a data set with a labeled / unlabeled split
        with pytest.raises(ConfigError, match=r"^train.iters: data.name='synthetic' has no labeled / unlabeled"):
            check_config(cfg)
        cfg = compose([f"{group}={option}", "data=cityscapes_semisup_769"])
    OmegaConf.to_container(cfg, resolve=True)
    check_config(cfg)


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_suite_lists_existing_experiments(suite):
    runs = load_suite(suite).runs
    assert runs and all(r.experiment in EXPERIMENT_NAMES for r in runs)
    assert [r.name for r in runs] == [r.experiment + ("+hl" if r.hl else "") for r in runs]


def test_experiment_files_are_baselines():
    # The HL row of a paper row is its experiment with hl.enabled=true (a suite cell's `hl: true`), not a twin file.
    assert not [n for n in EXPERIMENT_NAMES
                if OmegaConf.select(OmegaConf.load(EXPERIMENTS / "experiment" / f"{n}.yaml"), "hl.enabled") is not None]


def test_cli_override_beats_experiment(hydra_ctx):
    cfg = compose(["experiment=smoke/pspnet_r18_tiny", "optim.lr=0.02", "model=pspnet_r50"])
    assert cfg.optim.lr == 0.02 and cfg.model.name == "pspnet_r50" and cfg.hl.lr_mult == 10


def test_unknown_key_rejected(hydra_ctx):
    with pytest.raises(Exception, match="train.itres"):
        compose(["train.itres=5"])


@pytest.mark.parametrize("override,key", [("hl.scope=pixel", "hl.scope"), ("train.iters=0", "train.iters"),
                                          ("optim.name=rmsprop", "optim.name"), ("eval.mode=slide", "eval.mode"),
                                          ("eval.size_divisor=0", "eval.size_divisor")])
def test_bad_value_names_the_key(hydra_ctx, override, key):
    cfg = compose([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(cfg)


def test_hl_variant_tag(hydra_ctx):
    from hlbench.methods import LabelledLoss

    def variant(overrides, per_device=8):
        return LabelledLoss(compose(overrides), per_device).variant()

    paper = ["experiment=fullsup/pspnet_r101", "hl.enabled=true"]
    assert variant(paper) == "reference"           # one GPU x 8 = 4 groups of 2, as 4 GPUs x 2
    assert variant(paper, per_device=2) == "reference"
    assert variant(paper, per_device=1) == "custom"  # 8 x 1 cannot see the other image of a reference GPU
    assert variant(paper + ["hl.scope=batch"]) == "custom"
    assert variant(paper + ["hl.scope=image"]) == "custom"
    assert variant(paper + ["hl.scope=group", "hl.group_size=2"]) == "reference"
    assert variant(["experiment=ade20k/pspnet_r50", "hl.enabled=true"], per_device=16) == "reference"
    assert variant(["experiment=ade20k/pspnet_r50", "hl.enabled=true", "hl.scope=group", "hl.group_size=2"],
                   16) == "custom"
    assert variant([*SMOKE_HL]) == "custom"  # hl.lr_mult=10
    assert variant(["experiment=smoke/pspnet_r18_tiny"]) == "off"


CPU_STUDIES = ("smoke/", "semisup_synthetic/", "hl_study/")  # the CPU studies' own layouts, not a paper recipe's


@pytest.mark.parametrize("name", [n for n in EXPERIMENT_NAMES if not n.startswith(CPU_STUDIES)])
def test_paper_recipes_state_the_reference_layout_and_train_in_fp32(hydra_ctx, name):
    cfg = compose([f"experiment={name}"])
    ref = cfg.train.reference
    # The first matching prefix wins: the ADE20K ConvNeXt / Swin rows before the other ADE20K rows.
    layouts = {"ade20k/upernet_convnext_b": (8, 2), "ade20k/upernet_swin_b": (8, 2), "ade20k/": (4, 4),
               "segformer/": (4, 4), "mask2former/": (4, 4), "backbones/lraspp_mobilenetv3": (4, 4),
               "backbones/bisenetv2": (4, 4), "isaid/": (4, 4), "totaltext/": (4, 4), "semisup/suponly": (4, 4), "semisup/u2pl": (8, 2),
               "semisup/unimatch": (8, 1)}
    expected = next((v for prefix, v in layouts.items() if name.startswith(prefix)), (4, 2))
    assert (ref.gpus, ref.per_gpu) == expected and ref.gpus * ref.per_gpu == cfg.train.batch_size
    fp16 = "convnext" in name  # the authors trained ConvNeXt with mmcv's Fp16OptimizerHook, every other row in fp32
    assert cfg.train.precision == ("fp16" if fp16 else "fp32") and cfg.hl.scope == "reference"


def test_each_paper_number_has_one_place_the_suite_cell():
    # Experiment files name their parts; the paper's numbers live in the suite that is the paper's table.
    assert not [n for n in EXPERIMENT_NAMES
                if OmegaConf.load(EXPERIMENTS / "experiment" / f"{n}.yaml").get("paper") is not None]
    cells = [r for s in SUITE_NAMES if load_suite(s).get("cells") for r in load_suite(s).runs]
    for suite in SUITE_NAMES:  # within a table, a run fills one cell
        names = [r.name for r in load_suite(suite).get("runs")]
        assert len(names) == len(set(names)), suite
    # Across tables, a run fills two cells only where both tables report the same run (UPerNet-R101 in the
    # architecture and backbone tables), with one number.
    values = {}
    for suite in SUITE_NAMES:
        for name, card in (suite_cards(load_suite(suite)) if load_suite(suite).get("cells") else {}).items():
            values.setdefault(name, set()).add(card.get("value"))
    assert all(len(v) == 1 for v in values.values()), {k: v for k, v in values.items() if len(v) > 1}
    paper_settings = [n for n in EXPERIMENT_NAMES if not n.startswith(CPU_STUDIES)]
    assert sorted({r.experiment for r in cells}) == sorted(paper_settings)
