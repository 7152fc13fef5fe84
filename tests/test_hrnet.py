"""HRNet: mmseg key names, branch shapes at odd sizes, the fuse step's upsampling, the resize_concat heads, the HL
copy and the light HL head on the HRNet configs, the tiny configs' training step and the ImageNet files' loading.
Logit parity with mmseg itself is analysis/mmseg_parity.py's."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.errors import BadFileError, ConfigError
from hlbench.models import build_model, load_pretrained
from hlbench.models.heads import CascadeHead, FCNHead, OCRHead, ProjectedHead, PSPHead
from hlbench.models.hrnet import HRNet, fuse_upsample
from hlbench.weights import KNOWN_WEIGHTS, OPENMMLAB_BASE_URL

MODELS = ("ocrnet_hr18s", "ocrnet_hr18", "ocrnet_hr48", "fcn_hr18s", "fcn_hr18")
TINY = ("tiny/ocrnet_hrnet", "tiny/fcn_hrnet")
MODEL_DIR = Path(__file__).resolve().parents[1] / "hlbench" / "conf" / "model"


def _model_cfg(name):
    with_defaults = compose([f"model={name}", "model.backbone.pretrained=none"])
    return with_defaults.model


def _tiny_extra():
    return OmegaConf.to_container(OmegaConf.load(MODEL_DIR / "tiny" / "fcn_hrnet.yaml").backbone.extra)


def test_w18_key_names_and_shapes_match_mmseg(hydra_ctx):
    with torch.device("meta"):
        net = HRNet(OmegaConf.to_container(_model_cfg("ocrnet_hr18").backbone.extra))
        sd = net.state_dict()
    # A hand list of mmseg HRNet keys (mmseg/models/backbones/hrnet.py; the same in the MSRA ImageNet files).
    expected = {
        "conv1.weight": (64, 3, 3, 3), "bn2.running_var": (64,), "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.running_mean": (256,),
        "layer1.3.conv3.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (18, 256, 3, 3), "transition1.0.1.bias": (18,),
        "transition1.1.0.0.weight": (36, 256, 3, 3), "transition1.1.0.1.weight": (36,),
        "transition2.2.0.0.weight": (72, 36, 3, 3), "transition3.3.0.0.weight": (144, 72, 3, 3),
        "stage2.0.branches.0.0.conv1.weight": (18, 18, 3, 3), "stage2.0.branches.1.3.bn2.running_var": (36,),
        "stage2.0.fuse_layers.0.1.0.weight": (18, 36, 1, 1), "stage2.0.fuse_layers.0.1.1.running_mean": (18,),
        "stage2.0.fuse_layers.1.0.0.0.weight": (36, 18, 3, 3), "stage2.0.fuse_layers.1.0.0.1.weight": (36,),
        "stage3.3.branches.2.3.conv2.weight": (72, 72, 3, 3),
        "stage4.2.fuse_layers.3.0.0.0.weight": (18, 18, 3, 3), "stage4.2.fuse_layers.3.0.1.1.bias": (18,),
        "stage4.2.fuse_layers.3.0.2.0.weight": (144, 18, 3, 3), "stage4.2.fuse_layers.3.0.2.1.weight": (144,),
        "stage4.2.fuse_layers.0.3.0.weight": (18, 144, 1, 1),
    }
    assert {k: tuple(sd[k].shape) for k in expected if k in sd} == expected
    assert {k.split(".")[0] for k in sd} == {"conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "transition2",
                                            "transition3", "stage2", "stage3", "stage4"}
    # Kept and unchanged branches have no transition; a branch is fused from itself without a layer.
    assert not any(k.startswith(("transition2.0.", "transition2.1.", "transition3.2.")) for k in sd)
    assert not any(k.startswith(("stage2.0.fuse_layers.0.0.", "stage4.2.fuse_layers.3.3.")) for k in sd)
    assert [len(net.stage3), len(net.stage4), len(net.stage4[0].branches[0])] == [4, 3, 4]
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert net.out_channels == [18, 36, 72, 144]


def test_branch_shapes_at_odd_sizes():
    net = HRNet(_tiny_extra()).eval()
    feats = net(torch.randn(1, 3, 33, 47))
    # Each stride-2 3×3 conv gives ceil(side / 2): 33 -> 17 -> 9 -> 5 -> 3 -> 2, 47 -> 24 -> 12 -> 6 -> 3 -> 2.
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 9, 12), (16, 5, 6), (32, 3, 3), (64, 2, 2)]


def test_fuse_upsample_is_mmseg_two_step_bilinear():
    x = torch.randn(1, 2, 13, 7)
    twice = F.interpolate(x, size=(26, 14), mode="bilinear", align_corners=False)
    # Where the stride ratio lands on the target size it is one bilinear upsampling ...
    assert torch.equal(fuse_upsample(x, 2, (26, 14)), twice)
    # ... and on odd sides a second resize to the exact size, which a direct resize does not equal.
    exact = fuse_upsample(x, 2, (25, 13))
    assert torch.equal(exact, F.interpolate(twice, size=(25, 13), mode="bilinear", align_corners=False))
    assert not torch.allclose(exact, F.interpolate(x, size=(25, 13), mode="bilinear", align_corners=False))


def test_multiscale_output_false_fuses_to_branch_0_only():
    net = HRNet(_tiny_extra(), multiscale_output=False).eval()
    assert net.out_channels == [8] and len(net.stage4[-1].fuse_layers) == 1
    feats = net(torch.randn(1, 3, 33, 33))
    assert len(feats) == 1 and feats[0].shape == (1, 8, 9, 9)


@pytest.mark.parametrize("stage1, match", [
    (None, "stage1"),
    ({"num_modules": 1, "num_branches": 1, "block": "BOTTLE", "num_blocks": [1], "num_channels": [8]}, "block"),
    ({"num_modules": 1, "num_branches": 1, "block": "BASIC", "num_blocks": [1, 1], "num_channels": [8]}, "branch"),
    ({"num_modules": 1, "num_branches": 1, "block": "BASIC", "num_blocks": [1], "num_channels": [8], "x": 1}, "keys"),
])
def test_bad_stage_configs_name_the_key(stage1, match):
    extra = {**_tiny_extra(), "stage1": stage1}
    with pytest.raises(ConfigError, match=match):
        HRNet(extra)


def test_resize_concat_reads_every_branch_at_the_first_ones_size():
    feats = [torch.randn(1, 2, 9, 12), torch.randn(1, 3, 5, 6), torch.randn(1, 4, 3, 3)]
    head = FCNHead([2, 3, 4], 9, 5, in_index=[0, 1, 2], input_transform="resize_concat", kernel_size=1, num_convs=1,
                   concat_input=False, dropout=0).eval()
    assert head.in_channels == 9 and head.convs[0].conv.kernel_size == (1, 1)
    concat = torch.cat([F.interpolate(f, size=(9, 12), mode="bilinear", align_corners=False) for f in feats], 1)
    assert torch.allclose(head(feats), head.conv_seg(head.convs(concat)))
    with pytest.raises(ConfigError, match="list in_index"):
        FCNHead(3, 9, 5, in_index=1, input_transform="resize_concat")
    with pytest.raises(ConfigError, match="PSPHead: input_transform"):
        PSPHead([2, 3, 4], 8, 5, in_index=[0, 1, 2], input_transform="resize_concat")


@pytest.mark.parametrize("name", MODELS)
def test_model_configs_build_as_the_authors(hydra_ctx, name):
    cfg = _model_cfg(name)
    assert cfg.smoke in TINY and cfg.smoke.endswith(name.split("_")[0] + "_hrnet")
    with torch.device("meta"):
        model = build_model(cfg, num_classes=19, hl={"enabled": True})
    width = 720 if name.endswith("48") else 270
    stages = model.decode_head if isinstance(model.decode_head, CascadeHead) else [model.decode_head]
    assert stages[0].in_channels == width and stages[0].channels == width and model.auxiliary_head is None
    assert all(isinstance(s.dropout, torch.nn.Identity) for s in stages) and model.align_corners is False
    if name.startswith("ocrnet"):
        assert isinstance(stages[1], OCRHead) and stages[1].in_channels == width
    tiny = _model_cfg(cfg.smoke)
    assert tiny.backbone.type == cfg.backbone.type and tiny.head.type == cfg.head.type
    assert tiny.backbone.pretrained == "none"
    assert OmegaConf.load(MODEL_DIR / f"{name}.yaml").backbone.pretrained in KNOWN_WEIGHTS


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_trains_with_its_hl_copy(hydra_ctx, name):
    torch.manual_seed(0)
    model = build_model(_model_cfg(name), num_classes=3, hl={"enabled": True}).train()
    # The HL head is the decode head built again with one output; a cascade keeps stage 0 at num_classes.
    assert type(model.hl_head) is type(model.decode_head) and model.hl_head.num_classes == 1
    ours, copy = model.decode_head.state_dict(), model.hl_head.state_dict()
    assert ours.keys() == copy.keys()
    assert [k for k in ours if ours[k].shape != copy[k].shape] == [k for k in ours if "conv_seg" in k][-2:]
    out = model(torch.randn(2, 3, 64, 64))
    assert out["out"].shape == (2, 3, 16, 16) and out["hl"].shape == (2, 1, 16, 16)
    assert ("out0" in out) == name.startswith("tiny/ocrnet")
    (out["out"].sum() + out["hl"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    model(torch.randn(2, 3, 64, 64))["hl"].sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())  # the HL head reads detached features


@pytest.mark.parametrize("name", ["ocrnet_hr18", "tiny/fcn_hrnet"])
def test_light_hl_head_projects_the_wide_branches(hydra_ctx, name):
    model = build_model(_model_cfg(name), num_classes=3, hl={"enabled": True, "head_channels": 32}).train()
    assert isinstance(model.hl_head, ProjectedHead)
    widths = model.backbone.out_channels
    kept = [isinstance(p, torch.nn.Identity) for p in model.hl_head.project]
    assert kept == [w <= 32 for w in widths]
    first = model.hl_head.head[0] if isinstance(model.hl_head.head, CascadeHead) else model.hl_head.head
    assert first.in_channels == sum(min(w, 32) for w in widths)
    out = model(torch.randn(1, 3, 33, 47))
    assert out["hl"].shape == (1, 1, 9, 12) and out["out"].shape == (1, 3, 9, 12)


def test_imagenet_files_are_known():
    for name in ("hrnetv2_w18_small-b5a04e21.pth", "hrnetv2_w18-00eb2006.pth", "hrnetv2_w48-d2186c55.pth"):
        known = KNOWN_WEIGHTS[name]
        assert name.endswith(f"-{known.sha256_prefix}.pth") and known.base_url == OPENMMLAB_BASE_URL


def test_imagenet_file_loads_with_a_report(tmp_path, hydra_ctx):
    # An MSRA classifier file: the backbone's keys beside its classification head, which goes unused.
    source = HRNet(_tiny_extra())
    head = {"incre_modules.0.0.conv1.weight": torch.zeros(4, 8, 1, 1), "downsamp_modules.0.0.weight": torch.zeros(2),
            "final_layer.0.weight": torch.zeros(2), "classifier.weight": torch.zeros(10, 2),
            "classifier.bias": torch.zeros(10)}
    torch.save({**source.state_dict(), **head}, tmp_path / "hrnet_tiny.pth")
    report = load_pretrained(HRNet(_tiny_extra()), tmp_path / "hrnet_tiny.pth")
    assert report["missing"] == [] and sorted(report["unexpected"]) == sorted(head)
    cfg = _model_cfg("tiny/ocrnet_hrnet")
    cfg.backbone.pretrained = "hrnet_tiny.pth"
    model = build_model(cfg, num_classes=3, weights_dir=tmp_path)
    assert torch.equal(model.backbone.stage4[0].fuse_layers[3][0][2][0].weight,
                       source.stage4[0].fuse_layers[3][0][2][0].weight)


def test_imagenet_file_of_another_width_is_refused(tmp_path):
    wider = _tiny_extra()
    for stage in ("stage2", "stage3", "stage4"):
        wider[stage]["num_channels"] = [2 * c for c in wider[stage]["num_channels"]]
    torch.save(HRNet(wider).state_dict(), tmp_path / "hrnet_wide.pth")
    with pytest.raises(BadFileError, match="hrnet_wide.pth: .* shape mismatches"):
        load_pretrained(HRNet(_tiny_extra()), tmp_path / "hrnet_wide.pth")
