"""FLOPs of a training step (PyTorch's flop counter, depthwise-corrected), device peaks and the compute floor.

The counter counts convolutions and matmuls at 2 FLOP per multiply-add. Its convolution-backward formula ignores
`groups` in the weight-gradient term (torch.utils.flop_counter.conv_backward_flop), so a depthwise conv's weight
gradient comes out `groups` times too large; DeepLabV3+'s separable ASPP doubles the step's count that way.
`flop_counter()` swaps in a formula where the input-gradient and the weight-gradient term each cost exactly the
forward's multiply-adds (which do divide by `groups`), each counted only when that gradient is requested.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode with the grouped-convolution backward fixed (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward_flop})


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of calling fn once, e.g. a forward + loss + backward; on the `meta` device a full-size step is
    counted in about a second, since shapes are all the counter needs."""
    counter = flop_counter()
    with counter:
        fn()
    return counter.get_total_flops()


def forward_flops_by_module(fn: Callable[[], object]) -> dict[str, int]:
    """{top-level submodule name: FLOPs} of a forward pass fn (backbone, decode_head, hl_head, ...).

    Forward only: in backward the counter's module tracker credits ops to more than their own module.
    """
    counter = flop_counter()
    with counter:
        fn()
    return {name.split(".")[1]: sum(counts.values()) for name, counts in counter.get_flop_counts().items()
            if name.count(".") == 1}


# Dense (no sparsity) tensor-core peaks in FLOP/s from NVIDIA's H100, H200 and A100 datasheets, keyed by a
# substring of torch.cuda.get_device_name(); "tf32" is fp32 training with TF32 convolutions/matmuls, "fp32" without.
# More specific names come first ("H100 PCIe" before "H100").
DEVICE_PEAKS = {
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "tf32": 417e12, "fp32": 60e12},
    "H100": {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def device_peak(name: str, precision: str) -> float | None:
    """Datasheet peak FLOP/s of a device for precision fp32 | tf32 | bf16, None when the device is not listed."""
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks[precision]
    return None
