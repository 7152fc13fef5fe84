"""FLOP counting: torch's counter with the grouped-convolution backward fixed, checked against torchvision's
published metadata; the light HL head's train-step overhead; device peaks."""
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from hlbench.bench import bench_config, build_bench_model
from hlbench.flops import count_flops, device_peak, forward_flops_by_module


def _conv_step(conv, x):
    def step():
        conv(x).sum().backward()
    return step


def test_depthwise_train_step_costs_three_forwards():
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    forward = count_flops(lambda: conv(x))
    assert forward == 2 * 9 * 64 * 16 * 16 * 2  # one multiply-add per weight tap and output element
    assert count_flops(_conv_step(conv, x)) == 3 * forward  # forward + input gradient + weight gradient
    assert count_flops(_conv_step(conv, x.detach())) == 2 * forward  # no input gradient requested
    with FlopCounterMode(display=False) as stock:  # the uncorrected counter: the weight gradient x groups
        _conv_step(conv, x)()
    assert stock.get_total_flops() == (2 + 64) * forward


def test_dense_convolutions_count_as_torch_does():
    conv = nn.Conv2d(8, 16, 3, stride=2, dilation=2, padding=2)
    x = torch.randn(2, 8, 15, 15, requires_grad=True)
    with FlopCounterMode(display=False) as stock:
        _conv_step(conv, x)()
    assert count_flops(_conv_step(conv, x)) == stock.get_total_flops()


def test_counter_reproduces_torchvision_metadata():
    # torchvision's "GFLOPS" field for its segmentation weights is in multiply-adds (the counter counts 2 each).
    from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights, deeplabv3_resnet101
    weights = DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1
    with torch.device("meta"):
        model = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=len(weights.meta["categories"]),
                                    aux_loss=True).eval()
    flops = count_flops(lambda: model(torch.empty(1, 3, 520, 520, device="meta")))
    assert flops / 2e9 == pytest.approx(weights.meta["_ops"], abs=1e-3)


def _train_flops(model_name, hl, channels=None, size=769):
    cfg = bench_config(model_name, hl, (f"hl.head_channels={'null' if channels is None else channels}",))
    model, method = build_bench_model(cfg, 2, torch.device("meta"))
    batch = {"img": torch.empty(2, 3, size, size, device="meta"),
             "label": torch.zeros(2, size, size, dtype=torch.long, device="meta")}

    def step():
        loss, _ = method.step(model, {"labeled": batch}, 0)
        loss.backward()
    return count_flops(step), model, batch


@pytest.mark.slow
def test_light_hl_head_costs_under_5_percent_and_the_copy_its_flop_share():
    model_name = "pspnet_r50"  # the largest HL share of the light heads (R50 backbone, PSP's 4096-channel input)
    base, _, _ = _train_flops(model_name, False)
    copy, model, batch = _train_flops(model_name, True)
    light, _, _ = _train_flops(model_name, True, 64)
    assert light / base < 1.05 < copy / base
    # The copy's step overhead: its forward, weight gradients and internal input gradients, at most 3x its
    # forward, and no backbone backward (the features are detached).
    parts = forward_flops_by_module(lambda: model(batch["img"]))
    assert parts["hl_head"] == pytest.approx(parts["decode_head"], rel=0.01)
    assert 2 * parts["hl_head"] < copy - base <= 3 * parts["hl_head"]


def test_device_peaks_take_the_most_specific_name():
    assert device_peak("NVIDIA H100 PCIe", "bf16") < device_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert device_peak("NVIDIA A100-SXM4-80GB", "fp32") < device_peak("NVIDIA A100-SXM4-80GB", "tf32")
    assert device_peak("cpu (2 threads)", "fp32") is None
