"""profile=smoke trains the tiny model of each experiment's family (the model config's `smoke`), a model a file in
hlbench/conf/model/tiny/ describes; every tiny model builds with HL and trains a step at toy size."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.models import build_model

MODELS = Path(__file__).resolve().parents[1] / "hlbench" / "conf" / "model"
FULL = sorted(p.stem for p in MODELS.glob("*.yaml"))
TINY = sorted(f"tiny/{p.stem}" for p in (MODELS / "tiny").glob("*.yaml"))
# Mask2Former has no HL branch (its HL map is fixed, used by its criterion) and no per-pixel logits in training:
# tests/test_mask2former.py trains its tiny model.
PER_PIXEL_TINY = [name for name in TINY if name != "tiny/mask2former"]


def _aux_heads(cfg) -> int:
    aux = cfg.get("aux")
    if OmegaConf.is_list(aux):
        return len(aux)
    return int(bool(aux) and aux.get("enabled", True))


def test_every_full_size_model_names_a_tiny_model_of_its_family():
    for name in FULL:
        cfg = OmegaConf.load(MODELS / f"{name}.yaml")
        assert cfg.get("smoke") in TINY, f"{name}.yaml: smoke={cfg.get('smoke')!r} is not one of {TINY}"
        tiny = OmegaConf.load(MODELS / f"{cfg.smoke}.yaml")
        assert tiny.backbone.type == cfg.backbone.type and tiny.head.type == cfg.head.type, name
        assert _aux_heads(tiny) == _aux_heads(cfg), name
    for name in TINY:
        cfg = OmegaConf.load(MODELS / f"{name}.yaml")
        assert cfg.name == name and cfg.get("smoke") is None and cfg.backbone.pretrained == "none", name


def test_profile_smoke_swaps_in_the_named_tiny_model(hydra_ctx):
    full = compose(["experiment=fullsup/ann_r101"])
    smoke = compose(["experiment=fullsup/ann_r101", "profile=smoke"])
    assert full.model.name == "ann_r101" and smoke.model.name == "tiny/ann_r18"
    named = compose(["experiment=fullsup/ann_r101", "model=tiny/ann_r18"]).model
    assert OmegaConf.to_container(smoke.model) == OmegaConf.to_container(named)  # nothing merged over
    # the user's own model overrides still apply to the tiny model, and a tiny model is its own dry run
    assert compose(["experiment=fullsup/ann_r101", "profile=smoke", "model.head.channels=24"]).model.head.channels == 24
    assert compose(["model=tiny/fcn_r18", "profile=smoke"]).model.name == "tiny/fcn_r18"


@pytest.mark.parametrize("name", PER_PIXEL_TINY)
def test_tiny_model_trains_a_step_with_hl(hydra_ctx, name):
    cfg = compose([f"model={name}", "hl.enabled=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5, hl=cfg.hl).train()
    img = torch.randn(2, 3, 97, 113)  # not a multiple of any stride or window
    out = model(img)
    sum(v.float().mean() for v in out.values()).backward()
    assert out["out"].shape[:2] == (2, 5) and out["hl"].shape[:2] == (2, 1) and torch.isfinite(out["out"]).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.hl_head.parameters())
    assert sum(p.numel() for p in model.parameters()) < 5_000_000  # toy size: seconds per step on a CPU
