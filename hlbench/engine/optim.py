"""Optimisers and the per-iteration learning-rate schedule (mmseg poly with optional linear warm-up, as mmseg 0.x's
mmcv hooks or mmseg 1.x's mmengine schedulers apply them)."""
from __future__ import annotations

import torch

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("mmcv", "mmengine")


def build_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """One optimiser over the method's param groups ({"params", "lr_mult", "decay_mult"}; Method.param_groups),
    each group's weight decay optim.weight_decay x its decay_mult.

    The HL branch is an ordinary param group of the same optimiser (as in the authors' hl_encoder_decoder.py).
    """
    groups = [{**g, "weight_decay": cfg.weight_decay * g["decay_mult"]} for g in param_groups]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_at(it: int, total: int, cfg) -> float:
    """Learning rate for iteration `it` (0-based) of `total`, as optim.lr_schedule says (mmcv when absent).

    mmcv (mmseg 0.x's PolyLrUpdaterHook with warmup='linear', by iteration): poly
    (lr - min_lr) * (1 - it/total)^power + min_lr, times 1 - (1 - it/warmup_iters) * (1 - warmup_ratio) during the
    first warmup_iters iterations. mmengine: see _mmengine_lr.
    """
    if cfg.get("lr_schedule") == "mmengine":
        return _mmengine_lr(it, total, cfg)
    lr = (cfg.lr - cfg.min_lr) * (1 - it / total) ** cfg.power + cfg.min_lr
    if it < cfg.warmup_iters:
        lr *= 1 - (1 - it / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
    return lr


def _mmengine_lr(it: int, total: int, cfg) -> float:
    """mmseg 1.x's param_scheduler [LinearLR(start_factor=warmup_ratio, begin=0, end=warmup_iters), PolyLR(eta_min=
    min_lr, power, begin=warmup_iters, end=total)], stepped once per iteration, in closed form. Each mmengine
    scheduler spans end - begin - 1 steps: the warm-up factor reaches 1 at iteration warmup_iters - 1, and the poly
    restarts from lr at warmup_iters and reaches min_lr at iteration total - 1."""
    warmup = int(cfg.warmup_iters)
    if it < warmup:
        return cfg.lr * (cfg.warmup_ratio + (1 - cfg.warmup_ratio) * it / max(warmup - 1, 1))
    return (cfg.lr - cfg.min_lr) * (1 - (it - warmup) / max(total - warmup - 1, 1)) ** cfg.power + cfg.min_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
