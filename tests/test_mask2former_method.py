"""The mask2former method (hlbench/methods/mask2former.py) and its configs: the checks that pair it with the head and
the fixed map, what it records, and the input check a suite runs before its first Mask2Former HL run
(hlbench/data/hl_maps.require_hl_maps). The chain from an HL model's export to a trained Mask2Former is in
tests/test_hlmap.py; the criterion's modes in tests/test_mask2former.py."""
import numpy as np
import pytest
from omegaconf import OmegaConf

from hlbench.config_checks import check_config
from hlbench.data.hl_maps import HL_MAP_KEY, UNIFORM, AttachUniformMap, require_hl_maps
from hlbench.errors import ConfigError, MissingInputError
from hlbench.methods.mask2former import Mask2Former
from tests.conftest import TINY, compose_run

M2F = ["experiment=mask2former/swin_t_512"]


def test_the_method_and_the_mask2former_head_go_together():
    with pytest.raises(ConfigError, match="method=supervised with model.head.type=mask2former"):
        check_config(compose_run([*TINY, *M2F, "method=supervised"])[0])
    with pytest.raises(ConfigError, match="method=mask2former with model.head.type=psp"):
        check_config(compose_run([*TINY, "method=mask2former"])[0])


@pytest.mark.parametrize("override, message", [
    ("hl.source=online", "its HL map comes from another model's export"),
    ("hl.fixed_map.mode=off", "hl.fixed_map.mode=off on an HL run"),
    ("hl.fixed_map.mode=weights", "hl.fixed_map.mode must be one of"),
    ("hl.fixed_map.targets=[cls]", "hl.fixed_map.targets for mode point_weights"),
])
def test_an_hl_run_needs_a_fixed_map_and_a_valid_mode(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_run([*TINY, *M2F, "hl.enabled=true", "data.hl_map_dir=uniform", override])[0])


def test_the_baseline_is_plain_mask2former_and_the_hl_run_records_its_variant():
    base = Mask2Former(compose_run([*TINY, *M2F])[0])
    assert base.describe()["hl_fixed_map"]["mode"] == "off" and base.describe()["hl_variant"] == "off"
    hl = Mask2Former(compose_run([*TINY, *M2F, "hl.enabled=true", "hl.fixed_map.normalise=mask"])[0])
    assert hl.describe()["hl_fixed_map"] == {"mode": "point_weights", "targets": ["mask"], "normalise": "mask",
                                             "beta": 1.0, "offset": 0.1}
    assert hl.tags() == ["hl_variant:fixed_map", "hl_fixed_map:point_weights/mask/mask"]


def test_a_suite_refuses_a_missing_map_folder_naming_the_export_command(tmp_path):
    cfg = compose_run([*M2F, "hl.enabled=true", f"data.hl_map_dir={tmp_path / 'none'}"])[0]
    with pytest.raises(MissingInputError, match=r"python -m hlbench.hlmap export experiment=ade20k/pspnet_r101 "
                                                r"hl.enabled=true checkpoint=<its best.pth> out=.*none"):
        require_hl_maps(cfg)
    require_hl_maps(compose_run(M2F)[0])  # the baseline needs no map


def test_profile_smoke_stands_in_a_uniform_map_for_an_export_of_other_images(tmp_path):
    cfg = compose_run([*TINY, *M2F, "hl.enabled=true", f"data.hl_map_dir={tmp_path / 'none'}"])[0]
    require_hl_maps(cfg, "smoke")
    assert cfg.data.hl_map_dir == UNIFORM
    check_config(cfg)
    sample = AttachUniformMap()({"img": np.zeros((6, 9, 3), np.uint8)})
    assert sample[HL_MAP_KEY].shape == (6, 9) and not sample[HL_MAP_KEY].any()


def test_the_recipe_carries_mmseg_mask2former_schedule():
    cfg = compose_run(M2F)[0]
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.power, cfg.optim.warmup_iters) == (1e-4, 0.05, 0.9, 0)
    assert (cfg.train.grad_clip, cfg.train.iters, cfg.train.batch_size, cfg.train.eval_interval) == \
        (0.01, 160000, 16, 5000)
    keys = OmegaConf.to_container(cfg.optim.paramwise.custom_keys)
    assert keys["backbone"] == {"lr_mult": 0.1, "decay_mult": 1.0} and keys["query_feat"]["decay_mult"] == 0.0
    assert "backbone.stages.2.blocks.17.norm" in keys  # Swin-B/L's deepest stage
