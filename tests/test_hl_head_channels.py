"""hl.head_channels: a light HL head (the decode head's copy with fewer channels), checked and tagged as custom."""
import pytest
import torch
from hydra import compose

from hlbench.config_checks import ConfigError, check_config
from hlbench.methods import LabelledLoss
from hlbench.models import build_model


def test_light_head_narrows_only_the_hl_copy(hydra_ctx):
    cfg = compose("config", overrides=["model=deeplabv3plus_r50", "model.backbone.pretrained=none",
                                       "model.backbone.depth=18", "model.backbone.width_mult=0.25",
                                       "model.head.channels=32", "hl.head_channels=8"])
    model = build_model(cfg.model, num_classes=5, hl=True, hl_head_channels=cfg.hl.head_channels).train()
    assert model.decode_head.channels == 32 and model.hl_head.channels == 8
    assert type(model.hl_head) is type(model.decode_head) and model.hl_head.c1_bottleneck.conv.out_channels == 48
    out = model(torch.randn(2, 3, 64, 64))
    assert out["hl"].shape[1] == 1 and out["out"].shape[1] == 5
    narrow = sum(p.numel() for p in model.hl_head.parameters())
    assert narrow < sum(p.numel() for p in model.decode_head.parameters()) / 3


def test_head_channels_is_checked_and_makes_the_variant_custom(hydra_ctx):
    for bad in ("0", "true", "1.5"):
        with pytest.raises(ConfigError, match="hl.head_channels"):
            check_config(compose("config", overrides=[f"hl.head_channels={bad}"]))
    paper = ["experiment=fullsup/pspnet_r101_hl"]
    assert LabelledLoss(compose("config", overrides=paper), 8).variant() == "reference"
    assert LabelledLoss(compose("config", overrides=paper + ["hl.head_channels=64"]), 8).variant() == "custom"
