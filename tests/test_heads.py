"""Decode heads: output shapes, mmseg key names, the DeepLabV3+ skip, classifier init."""

import pytest
import torch

from hlbench.errors import ConfigError
from hlbench.models.heads import (ASPPHead, CascadeHead, DepthwiseSeparableASPPHead, FCNHead, OCRHead, PSPHead,
                                  UPerHead)

CHANNELS = [16, 32, 64, 128]


def _features(batch=2):
    """An OS8 backbone tuple for a 64×64 input."""
    sizes = [16, 8, 8, 8]
    return tuple(torch.randn(batch, c, s, s) for c, s in zip(CHANNELS, sizes))


HEADS = {
    "fcn": lambda n: FCNHead(128, 16, n, num_convs=2, concat_input=True),
    "psp": lambda n: PSPHead(128, 16, n, pool_scales=(1, 2, 3, 6)),
    "aspp": lambda n: ASPPHead(128, 16, n, dilations=(1, 12, 24, 36)),
    "sep_aspp": lambda n: DepthwiseSeparableASPPHead(128, 16, n, c1_in_channels=16, c1_channels=8,
                                                     dilations=(1, 12, 24, 36)),
}


@pytest.mark.parametrize("name, size", [("fcn", 8), ("psp", 8), ("aspp", 8), ("sep_aspp", 16)])
def test_head_output_shape(name, size):
    head = HEADS[name](5)
    assert head(_features()).shape == (2, 5, size, size)
    head.eval()
    assert head(_features(batch=1)).shape == (1, 5, size, size)


@pytest.mark.parametrize("name, keys", [
    ("fcn", ["convs.0.conv.weight", "convs.1.bn.running_var", "conv_cat.conv.weight", "conv_seg.bias"]),
    ("psp", ["psp_modules.0.1.conv.weight", "psp_modules.3.1.bn.running_mean", "bottleneck.conv.weight",
             "bottleneck.bn.weight", "conv_seg.weight"]),
    ("aspp", ["image_pool.1.conv.weight", "image_pool.1.bn.bias", "aspp_modules.0.conv.weight",
              "aspp_modules.3.conv.weight", "bottleneck.conv.weight"]),
    ("sep_aspp", ["image_pool.1.conv.weight", "aspp_modules.0.conv.weight",
                  "aspp_modules.1.depthwise_conv.conv.weight", "aspp_modules.1.depthwise_conv.bn.weight",
                  "aspp_modules.3.pointwise_conv.conv.weight", "c1_bottleneck.conv.weight",
                  "sep_bottleneck.0.depthwise_conv.conv.weight", "sep_bottleneck.1.pointwise_conv.bn.running_var"]),
])
def test_head_key_names_match_mmseg(name, keys):
    state = HEADS[name](5).state_dict()
    assert all(k in state for k in keys), [k for k in keys if k not in state]
    assert not any(k.startswith("dropout") for k in state)


def test_head_layer_shapes():
    psp = HEADS["psp"](5)
    assert psp.bottleneck.conv.weight.shape == (16, 128 + 4 * 16, 3, 3)
    aspp = HEADS["aspp"](5)
    assert aspp.aspp_modules[0].conv.kernel_size == (1, 1)
    assert [m.conv.dilation[0] for m in aspp.aspp_modules[1:]] == [12, 24, 36]
    assert aspp.bottleneck.conv.in_channels == 5 * 16
    sep = HEADS["sep_aspp"](5)
    depthwise = sep.aspp_modules[2].depthwise_conv.conv
    assert depthwise.groups == 128 and depthwise.dilation == (24, 24)
    assert sep.sep_bottleneck[0].depthwise_conv.conv.in_channels == 16 + 8
    fcn = HEADS["fcn"](5)
    assert fcn.conv_cat.conv.in_channels == 128 + 16


def test_sep_aspp_uses_the_c1_skip():
    head = HEADS["sep_aspp"](5).eval()
    feats = _features()
    c1 = feats[0].clone().requires_grad_(True)
    out = head((c1, *feats[1:]))
    out.sum().backward()
    assert c1.grad is not None and c1.grad.abs().sum() > 0
    changed = head((feats[0] + 1.0, *feats[1:]))
    assert not torch.allclose(changed, head(feats))


def test_in_index_selects_the_stage():
    head = FCNHead(64, 16, 3, num_convs=1, concat_input=False, in_index=2)
    assert head(_features()).shape == (2, 3, 8, 8)


def test_classifier_init_gives_near_zero_logits():
    head = HEADS["psp"](1)
    assert head.conv_seg.bias.abs().max() == 0
    assert 0.005 < head.conv_seg.weight.std() < 0.02
    assert head.eval()(_features()).abs().max() < 1.0


def test_fcn_without_convs_needs_matching_channels():
    with pytest.raises(ConfigError, match="in_channels == channels"):
        FCNHead(128, 16, 3, num_convs=0)


def _pyramid(batch=2):
    """An OS32 backbone tuple for a 64×64 input (UPerNet)."""
    return tuple(torch.randn(batch, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(CHANNELS))


def test_uper_head_shape_and_mmseg_keys():
    head = UPerHead(CHANNELS, 16, 5, pool_scales=(1, 2, 3, 6), in_index=[0, 1, 2, 3])
    assert head(_pyramid()).shape == (2, 5, 16, 16)
    state = head.state_dict()
    keys = ["psp_modules.3.1.conv.weight", "bottleneck.conv.weight", "lateral_convs.2.conv.weight",
            "lateral_convs.0.bn.running_mean", "fpn_convs.2.conv.weight", "fpn_bottleneck.conv.weight",
            "conv_seg.weight"]
    assert all(k in state for k in keys), [k for k in keys if k not in state]
    assert "lateral_convs.3.conv.weight" not in state and "fpn_convs.3.conv.weight" not in state
    assert head.bottleneck.conv.weight.shape == (16, 128 + 4 * 16, 3, 3)
    assert head.fpn_bottleneck.conv.weight.shape == (16, 4 * 16, 3, 3)
    with pytest.raises(ConfigError, match="in_index"):
        UPerHead(CHANNELS[:3], 16, 5, in_index=[0, 1, 2, 3])


def _ocr_cascade(n_out=5):
    return CascadeHead([FCNHead(64, 8, 5, num_convs=1, concat_input=False, in_index=2),
                        OCRHead(128, 16, n_out, ocr_channels=8, in_index=3)])


def test_ocr_cascade_shapes_and_mmseg_keys():
    cascade = _ocr_cascade()
    stage0, out = cascade.stages(_features())
    assert stage0.shape == out.shape == (2, 5, 8, 8) and cascade.num_classes == 5
    cascade.eval()
    feats = _features()
    assert torch.equal(cascade(feats), cascade.stages(feats)[1])
    state = cascade.state_dict()
    keys = ["0.convs.0.conv.weight", "0.conv_seg.weight", "1.bottleneck.conv.weight",
            "1.object_context_block.query_project.1.conv.weight", "1.object_context_block.key_project.0.bn.weight",
            "1.object_context_block.value_project.conv.weight", "1.object_context_block.out_project.conv.weight",
            "1.object_context_block.bottleneck.conv.weight", "1.conv_seg.bias"]
    assert all(k in state for k in keys), [k for k in keys if k not in state]
    assert not any("spatial_gather_module" in k for k in state)  # parameter-free, as in mmseg
    assert cascade[1].object_context_block.bottleneck.conv.weight.shape == (16, 32, 1, 1)


def test_ocr_stage1_depends_on_stage0_logits():
    head = _ocr_cascade()[1].eval()
    feats = _features()
    a = head(feats, torch.zeros(2, 5, 8, 8))
    b = head(feats, torch.randn(2, 5, 8, 8) * 5)
    assert not torch.allclose(a, b)
