"""Optimisers and the per-iteration learning-rate schedule (mmseg poly with optional linear warm-up)."""
from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """One optimiser over the method's param groups ({"params", "lr_mult"}; Method.param_groups).

    The HL branch is an ordinary param group of the same optimiser (method.md §6).
    """
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_at(it: int, total: int, cfg) -> float:
    """Learning rate for iteration `it` (0-based) of `total`.

    Poly: (lr - min_lr) * (1 - it/total)^power + min_lr. Warm-up (mmseg 'linear'): the poly value times
    1 - (1 - it/warmup_iters) * (1 - warmup_ratio) during the first warmup_iters iterations.
    """
    lr = (cfg.lr - cfg.min_lr) * (1 - it / total) ** cfg.power + cfg.min_lr
    if it < cfg.warmup_iters:
        lr *= 1 - (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
