"""Parity of hlbench's optimiser recipes with mmengine / mmseg 1.2.2: per-parameter lr and weight decay, and the
mmengine lr schedule.

Runs in the scratch environment of analysis/mmseg_parity.py (plus mmpretrain 1.2.0 for ConvNeXt); not imported by the
tests:
    PYTHONPATH=. /tmp/mmseg-venv/bin/python analysis/mmseg_optim_parity.py [--models ...] [--iters 160000]
For each transformer row, mmseg builds the real model (analysis/mmseg_parity.py's MMSEG_MODELS) with a copy of its
decode head named hl_head, as hlbench names the HL branch; the authors' optimiser config then goes through mmengine's
DefaultOptimWrapperConstructor (Swin, SegFormer) or mmseg's LearningRateDecayOptimizerConstructor (ConvNeXt), and the
hlbench recipe's optim node through hlbench's param groups, on that same module and on hlbench's own model of the row
(built with its HL branch, through Method.param_groups). Every trainable parameter's lr and weight decay must agree,
name by name. Then mmengine's LinearLR + PolyLR, stepped once per iteration over a whole schedule, are
compared with hlbench's lr_schedule=mmengine for a x1 and a x10 group.
"""
import argparse
import contextlib
import copy
import io
import logging
import sys

import torch

from mmseg_parity import MMSEG_MODELS, NUM_CLASSES, _stub_mmcv_ops, build_mmseg  # this script's folder is on sys.path
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.engine.optim import build_optimizer, lr_at, set_lr
from hlbench.engine.param_groups import param_groups
from hlbench.methods import build_method
from hlbench.models import build_model

ADAMW = dict(type="AdamW", betas=(0.9, 0.999))
# model config -> (hlbench recipe, the authors' mmseg optimiser: constructor, optimizer, paramwise_cfg), as the config
# in their logs prints it (Menoly-xin/Hardness-Level-Learning logs/: mmseg 0.x headers; the SegFormer mmengine logs).
ROWS = {
    "upernet_convnext_b": ("cityscapes_convnext_40k", "LearningRateDecayOptimizerConstructor",
                           dict(ADAMW, lr=1e-4, weight_decay=0.05),
                           dict(decay_rate=0.9, decay_type="stage_wise", num_layers=12)),
    "upernet_swin_b": ("ade20k_swin_160k", "DefaultOptimWrapperConstructor", dict(ADAMW, lr=6e-5, weight_decay=0.01),
                       dict(custom_keys=dict(absolute_pos_embed=dict(decay_mult=0.0),
                                             relative_position_bias_table=dict(decay_mult=0.0),
                                             norm=dict(decay_mult=0.0)))),
    **{name: ("ade20k_segformer_160k", "DefaultOptimWrapperConstructor", dict(ADAMW, lr=6e-5, weight_decay=0.01),
              dict(custom_keys=dict(pos_block=dict(decay_mult=0.0), norm=dict(decay_mult=0.0),
                                    head=dict(lr_mult=10.0))))
       for name in ("segformer_mit_b0", "segformer_mit_b3", "segformer_mit_b5")},
}


def recipe_optim(recipe: str):
    """The optim node of a run composed with `recipe=<recipe>`."""
    return compose([f"recipe={recipe}"]).optim


def _with_hl_head(model):
    """The mmseg model with the HL branch hlbench builds: the decode head's copy with one output, named hl_head."""
    hl = copy.deepcopy(model.decode_head)
    hl.conv_seg = torch.nn.Conv2d(hl.conv_seg.in_channels, 1, 1)
    model.hl_head = hl
    return model


def _per_param(model, optimizer) -> dict[str, tuple[float, float]]:
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def compare_groups(name: str) -> bool:
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmseg.engine.optimizers import LearningRateDecayOptimizerConstructor

    recipe, constructor, optimizer, paramwise = ROWS[name]
    torch.manual_seed(0)
    model = _with_hl_head(build_mmseg(MMSEG_MODELS[name]))
    build = {"DefaultOptimWrapperConstructor": DefaultOptimWrapperConstructor,
             "LearningRateDecayOptimizerConstructor": LearningRateDecayOptimizerConstructor}[constructor]
    with contextlib.redirect_stdout(io.StringIO()):  # mmseg's constructor prints its groups as JSON
        wrapper = build(dict(type="OptimWrapper", optimizer=optimizer), paramwise)(model)
    theirs = _per_param(model, wrapper.optimizer)

    cfg = compose([f"recipe={recipe}", f"model={name}", "hl.enabled=true"])
    ok = _agrees(f"{name} mmseg model ({constructor} vs recipe={recipe})", theirs, cfg.optim,
                 _per_param(model, _hlbench_optimizer(param_groups(model, cfg.optim.paramwise, {"hl_head.": 1.0}),
                                                      cfg.optim)))
    # hlbench's own model (its HL copy of the decode head included) through the run's Method.param_groups.
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["backbone"]["pretrained"] = "none"
    net = build_model(model_cfg, NUM_CLASSES, hl=cfg.hl)
    return ok and _agrees(f"{name} hlbench model (Method.param_groups)", theirs, cfg.optim,
                          _per_param(net, _hlbench_optimizer(build_method(cfg).param_groups(net), cfg.optim)))


def _hlbench_optimizer(groups, optim):
    optimizer = build_optimizer(groups, optim)
    set_lr(optimizer, optim.lr)
    return optimizer


def _agrees(what, theirs, optim, ours) -> bool:
    lr_diff = max(abs(ours[n][0] - theirs[n][0]) / theirs[n][0] for n in theirs.keys() & ours.keys())
    wd_diff = [n for n in theirs.keys() & ours.keys() if ours[n][1] != theirs[n][1]]
    names = sorted(theirs.keys() ^ ours.keys())
    combos = sorted({(round(lr / optim.lr, 6), wd) for lr, wd in theirs.values()}, reverse=True)
    ok = not names and lr_diff < 1e-12 and not wd_diff
    print(f"{what}: {len(theirs)} parameters, {len(combos)} (lr x, wd) settings {combos}; names in one only: "
          f"{len(names)} {names[:3]}, max relative lr difference {lr_diff:.1e}, weight decays differing: "
          f"{len(wd_diff)} {wd_diff[:3]} -> {'OK' if ok else 'MISMATCH'}")
    return ok


def compare_schedule(iters: int) -> bool:
    """mmengine's [LinearLR(1e-6, 0-1500), PolyLR(1.0, 1500-iters)] (the SegFormer recipe's) vs lr_at."""
    from mmengine.optim.scheduler import LinearLR, PolyLR

    cfg = recipe_optim("ade20k_segformer_160k")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": cfg.lr}, {"params": [params[1]], "lr": cfg.lr * 10}],
                                lr=cfg.lr)
    schedulers = [LinearLR(optimizer, start_factor=cfg.warmup_ratio, by_epoch=False, begin=0, end=cfg.warmup_iters),
                  PolyLR(optimizer, eta_min=cfg.min_lr, power=cfg.power, by_epoch=False, begin=cfg.warmup_iters,
                         end=iters)]
    worst = 0.0
    for it in range(iters):
        ours = lr_at(it, iters, cfg)
        for group, mult in zip(optimizer.param_groups, (1.0, 10.0)):
            worst = max(worst, abs(group["lr"] - ours * mult) / (cfg.lr * mult))
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    print(f"mmengine LinearLR + PolyLR over {iters} iterations vs lr_schedule=mmengine: max |difference| "
          f"{worst:.1e} of the base lr")
    return worst < 1e-9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ROWS))
    parser.add_argument("--iters", type=int, default=160000, help="schedule length for the lr comparison")
    args = parser.parse_args()
    _stub_mmcv_ops()
    from mmengine.logging import MMLogger
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # the constructors log every parameter's setting
    results = [compare_groups(name) for name in args.models] + [compare_schedule(args.iters)]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
