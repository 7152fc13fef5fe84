"""Segmentor: training/eval outputs, HL branch isolation, whole vs sliding-window inference, build_model."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

import hlbench.models
from hlbench.errors import ConfigError
from hlbench.models import build_model
from hlbench.models.heads import CascadeHead, PSPHead
from hlbench.models.segmentor import Segmentor, window_starts

MODEL_CONFIGS = sorted((Path(hlbench.models.__file__).parents[1] / "conf" / "model").glob("*.yaml"))


@pytest.fixture
def tiny_cfg():
    return OmegaConf.load(Path(hlbench.models.__file__).parents[1] / "conf" / "model" / "tiny" / "pspnet_r18.yaml")


def test_training_outputs(tiny_cfg):
    model = build_model(tiny_cfg, num_classes=5, hl={"enabled": True}).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert set(out) == {"out", "aux", "hl"}
    assert out["out"].shape == (2, 5, 8, 8) and out["aux"].shape == (2, 5, 8, 8) and out["hl"].shape == (2, 1, 8, 8)
    assert model.num_classes == 5 and model.align_corners is False


def test_eval_forward_has_only_out(tiny_cfg):
    model = build_model(tiny_cfg, num_classes=5, hl={"enabled": True}).eval()
    assert set(model(torch.randn(1, 3, 64, 64))) == {"out"}


def test_hl_head_is_a_one_channel_copy_of_the_decode_head(tiny_cfg):
    model = build_model(tiny_cfg, num_classes=5, hl={"enabled": True})
    assert type(model.hl_head) is type(model.decode_head) is PSPHead
    assert model.hl_head.conv_seg.out_channels == 1
    hl_keys, decode_keys = model.hl_head.state_dict().keys(), model.decode_head.state_dict().keys()
    assert hl_keys == decode_keys
    assert model.hl_head.bottleneck.conv.weight is not model.decode_head.bottleneck.conv.weight
    assert build_model(tiny_cfg, num_classes=5).hl_head is None


@pytest.mark.parametrize("detach", [True, False])
def test_hl_gradient_reaches_the_backbone_only_without_detach(tiny_cfg, detach):
    model = build_model(tiny_cfg, num_classes=5, hl={"enabled": True, "detach_features": detach}).train()
    model(torch.randn(2, 3, 64, 64))["hl"].sum().backward()
    backbone_grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is None for g in backbone_grads) == detach
    assert all(p.grad is None for p in model.decode_head.parameters())
    assert model.hl_head.conv_seg.weight.grad is not None


def test_predict_and_predict_hl_at_input_size(tiny_cfg):
    model = build_model(tiny_cfg, num_classes=5, hl={"enabled": True}).eval()
    img = torch.randn(1, 3, 60, 76)
    assert model.predict(img).shape == (1, 5, 60, 76)
    assert model.predict_hl(img).shape == (1, 1, 60, 76)
    with pytest.raises(ValueError, match="hl.enabled"):
        build_model(tiny_cfg, num_classes=5).predict_hl(img)
    with pytest.raises(ValueError, match="mode"):
        model.predict(img, mode="tiles")


def test_slide_equals_whole_when_one_window_covers_the_image(tiny_cfg):
    model = build_model(tiny_cfg, num_classes=5).eval()
    img = torch.randn(2, 3, 64, 48)
    torch.testing.assert_close(model.predict(img, "slide", crop=(64, 48), stride=(32, 32)), model.predict(img))


def test_slide_pads_images_smaller_than_the_window(tiny_cfg):
    model = build_model(tiny_cfg, num_classes=5).eval()
    img = torch.randn(1, 3, 40, 56)
    padded = torch.nn.functional.pad(img, (0, 8, 0, 24))
    expected = model.predict(padded)[:, :, :40, :56]
    torch.testing.assert_close(model.predict(img, "slide", crop=64, stride=48), expected)


class _PointwiseBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return (torch.tanh(self.conv(x)),)


class _PointwiseHead(nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)

    def forward(self, feats):
        return self.conv(feats[0])


@pytest.mark.parametrize("window_batch", [1, 3, 16])
def test_slide_equals_whole_for_a_fully_convolutional_model(window_batch):
    torch.manual_seed(0)
    model = Segmentor(_PointwiseBackbone(), _PointwiseHead()).eval()
    img = torch.randn(2, 3, 50, 70)
    slide = model.predict(img, "slide", crop=(24, 32), stride=(16, 20), window_batch=window_batch)
    torch.testing.assert_close(slide, model.predict(img), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, crop, stride", [(1025, 769, 513), (2049, 769, 513), (50, 24, 16), (24, 24, 16),
                                                (10, 24, 16), (97, 10, 7)])
def test_windows_cover_every_pixel_inside_the_image(size, crop, stride):
    starts = window_starts(size, crop, stride)
    covered = torch.zeros(max(size, crop))
    for s in starts:
        assert s >= 0 and (s + crop <= size or s == 0)
        covered[s:s + crop] += 1
    assert (covered[:size] > 0).all()


def test_window_starts_match_the_mmseg_cityscapes_protocol():
    assert window_starts(1025, 769, 513) == [0, 256]
    assert window_starts(2049, 769, 513) == [0, 513, 1026, 1280]


def test_every_model_config_builds():
    assert len(MODEL_CONFIGS) >= 8
    for path in MODEL_CONFIGS:
        cfg = OmegaConf.load(path)
        cfg.backbone.pretrained = "none"  # the architecture, not the ImageNet file
        mask_classification = cfg.head.type == "mask2former"  # no per-pixel HL head: its map is fixed (test_mask2former)
        with torch.device("meta"):
            model = build_model(cfg, num_classes=19, hl={"enabled": not mask_classification})
        assert cfg.name == path.stem
        if mask_classification:
            continue
        stages = list(model.decode_head) if isinstance(model.decode_head, CascadeHead) else [model.decode_head]
        hl_last = model.hl_head[-1] if isinstance(model.hl_head, CascadeHead) else model.hl_head
        in_channels = model.backbone.out_channels
        head = OmegaConf.to_object(cfg.head)
        index = head["in_index"]
        read = [in_channels[i] for i in index] if isinstance(index, list) else in_channels[index]
        # mmseg's resize_concat (HRNet heads) concatenates the stages it reads: its input is their summed width
        assert stages[-1].in_channels == (sum(read) if head.get("input_transform") == "resize_concat" else read)
        if OmegaConf.is_list(cfg.aux):  # mmseg's list of aux heads (BiSeNetV2)
            assert [h.in_channels for h in model.auxiliary_head] == [in_channels[a.in_index] for a in cfg.aux]
        elif cfg.aux.enabled:
            assert model.auxiliary_head.in_channels == in_channels[cfg.aux.in_index]
        assert hl_last.conv_seg.out_channels == 1 and all(s.conv_seg.out_channels == 19 for s in stages)


def test_reference_model_widths():
    scratch = {"backbone": {"pretrained": "none"}}
    with torch.device("meta"):
        psp = build_model(OmegaConf.merge(OmegaConf.load(MODEL_CONFIGS[0].parent / "pspnet_r101.yaml"), scratch), 19)
        dlv3p = build_model(OmegaConf.merge(OmegaConf.load(MODEL_CONFIGS[0].parent / "deeplabv3plus_r50.yaml"),
                                            scratch), 19)
    assert psp.decode_head.bottleneck.conv.weight.shape == (512, 2048 + 4 * 512, 3, 3)
    assert psp.auxiliary_head.convs[0].conv.weight.shape == (256, 1024, 3, 3)
    assert dlv3p.decode_head.c1_bottleneck.conv.weight.shape == (48, 256, 1, 1)


@pytest.mark.parametrize("section, change, error", [
    ("backbone", {"type": "vgg"}, "resnet_v1c"),
    ("head", {"type": "upernet"}, "sep_aspp"),
    ("head", {"pool_scale": [1, 2]}, "pool_scale"),
    ("backbone", {"depth": 42}, "depth"),
])
def test_build_model_config_errors(tiny_cfg, section, change, error):
    cfg = OmegaConf.to_container(tiny_cfg)
    cfg[section].update(change)
    with pytest.raises(ConfigError, match=error):
        build_model(cfg, num_classes=5)
