"""Optimisers and the per-iteration learning-rate schedule (mmseg poly with optional linear warm-up)."""
from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: torch.nn.Module, cfg, hl_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """One optimiser for the whole model; the HL branch is an ordinary param group (method.md §6)."""
    hl = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("hl_head.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("hl_head.")]
    groups = [{"params": rest, "lr_mult": 1.0}]
    if hl:
        groups.append({"params": hl, "lr_mult": float(hl_lr_mult)})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {cfg.name!r}")


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
