"""hl.head_channels: a light HL head (the decode head's copy at fewer channels on projected inputs), checked and
tagged as custom."""
import pytest
import torch

from hlbench.compose import compose
from hlbench.config_checks import ConfigError, check_config
from hlbench.methods import LabelledLoss
from hlbench.models import build_model


SMALL = ["model.backbone.pretrained=none", "model.backbone.depth=18", "model.backbone.width_mult=0.25",
         "model.head.channels=32", "hl.enabled=true"]


def test_light_head_narrows_only_the_hl_copy(hydra_ctx):
    cfg = compose(["model=deeplabv3plus_r50", *SMALL, "hl.head_channels=8"])
    model = build_model(cfg.model, num_classes=5, hl=cfg.hl).train()
    assert model.decode_head.channels == 32 and model.hl_head.channels == 8
    head = model.hl_head.head
    assert type(head) is type(model.decode_head) and head.c1_bottleneck.conv.out_channels == 48
    # Stages 16/32/64/128 wide: the skip (stage 0) and the ASPP input (stage 3) are projected to 8, so the ASPP's
    # depthwise convs work on 8 channels, not on the backbone's 128.
    assert [type(p).__name__ for p in model.hl_head.project] == ["ConvBNReLU", "Identity", "Identity", "ConvBNReLU"]
    aspp = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.dilation[0] > 1]
    assert len(aspp) == 3 and all(m.in_channels == 8 for m in aspp)  # the three dilated depthwise convs
    out = model(torch.randn(2, 3, 64, 64))
    assert out["hl"].shape[1] == 1 and out["out"].shape[1] == 5
    assert model.eval().predict_hl(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    narrow = sum(p.numel() for p in model.hl_head.parameters())
    assert narrow < sum(p.numel() for p in model.decode_head.parameters()) / 3


@pytest.mark.parametrize("name, read", [("pspnet_r50", {3}), ("upernet_r50", {0, 1, 2, 3}), ("fcn_r101", {3}),
                                        ("deeplabv3_r101", {3}), ("ocrnet_r101", {2, 3})])  # OCR: stage 0 reads 2
def test_light_head_reads_projected_stages_for_every_head_type(hydra_ctx, name, read):
    cfg = compose([f"model={name}", *SMALL, "hl.head_channels=4"])
    model = build_model(cfg.model, num_classes=3, hl=cfg.hl).train()
    assert {i for i, p in enumerate(model.hl_head.project) if not isinstance(p, torch.nn.Identity)} == read
    out = model(torch.randn(2, 3, 64, 64))
    assert out["hl"].shape == (2, 1, *out["out"].shape[2:])
    assert model.eval().predict_hl(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_head_channels_is_checked_and_makes_the_variant_custom(hydra_ctx):
    for bad in ("0", "true", "1.5"):
        with pytest.raises(ConfigError, match="hl.head_channels"):
            check_config(compose([f"hl.head_channels={bad}"]))
    paper = ["experiment=fullsup/pspnet_r101", "hl.enabled=true"]
    assert LabelledLoss(compose(paper), 8).variant() == "reference"
    assert LabelledLoss(compose(paper + ["hl.head_channels=64"]), 8).variant() == "custom"
