"""Numeric precision of training steps: the reference's fp32 (TF32 allowed on CUDA), bf16 autocast, or fp16
autocast with dynamic loss scaling.

The authors trained and evaluated in fp32 on A100s, where PyTorch 1.8 ran convolutions and matmuls in TF32 by
default, except the ConvNeXt rows, which used mmcv's Fp16OptimizerHook(loss_scale='dynamic'): autocast fp16 and
torch's GradScaler with its defaults. Evaluation here is fp32 whatever the training precision (the speed issue
measures whether bf16 should become a training default).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str = "fp32"):
    """bf16 or fp16 autocast (CUDA or CPU: the same number formats, so a CPU run shows their effect on accuracy); a
    no-op for fp32."""
    if precision in _AUTOCAST_DTYPES and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])
    return nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16: dynamic loss scaling with torch's defaults, as mmcv's Fp16OptimizerHook(loss_scale='dynamic') built it
    (scale 2^16, halved on a step with inf/NaN gradients, which it skips, doubled after 2000 clean steps). Otherwise
    a disabled scaler, whose scale/unscale_/step/update pass straight through to the plain backward and step."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def allow_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, as the reference's PyTorch 1.8 did on A100 by default."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
