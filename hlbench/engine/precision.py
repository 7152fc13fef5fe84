"""Numeric precision of training steps: the reference's fp32 (TF32 allowed on CUDA) or bf16 autocast.

The authors trained and evaluated in fp32 on A100s, where PyTorch 1.8 ran convolutions and matmuls in TF32 by
default; evaluation here is fp32 whatever the training precision (the speed issue measures whether bf16 should
become a training default).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str = "fp32"):
    """bf16 autocast for precision="bf16" (CUDA or CPU: the same number format, so a CPU run shows bf16's effect on
    accuracy); a no-op for fp32."""
    if precision == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def allow_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, as the reference's PyTorch 1.8 did on A100 by default."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)
