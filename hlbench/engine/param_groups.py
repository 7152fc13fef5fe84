"""Each parameter's learning-rate and weight-decay multipliers, decided in one place, and the optimiser's param
groups built from them.

A parameter's lr is optim.lr x its paramwise lr multiplier x its method multiplier; its weight decay is
optim.weight_decay x its paramwise decay multiplier.
- paramwise (optim.paramwise), the recipe's rule as mmseg builds its optimiser:
  - custom_keys, norm_decay_mult, bias_decay_mult: mmengine's DefaultOptimWrapperConstructor (mmcv 1.x's
    DefaultOptimizerConstructor has the same rule), as the Swin and SegFormer recipes use it;
  - layer_decay: mmseg's LearningRateDecayOptimizerConstructor (ConvNeXt's recipe), which replaces the rules above.
- method (Method.lr_multipliers): {parameter-name prefix: lr multiplier}, the first matching prefix; the HL branch's
  hl.lr_mult and method.lr_mult, hlbench's own settings on top of the recipe's (1 in the authors' recipes).
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError

# mmengine's "norm layer" test for norm_decay_mult (SyncBatchNorm is a _BatchNorm).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
LAYER_DECAY_TYPES = ("stage_wise",)  # mmseg's decay_type values hlbench implements


def param_groups(model: nn.Module, paramwise, prefix_mults: dict[str, float]) -> list[dict]:
    """Optimiser param groups [{"params", "lr_mult", "decay_mult"}], one per distinct (lr, decay) pair, in the order
    of model.named_parameters(); frozen parameters are left out.

    Args:
        paramwise: optim.paramwise ({custom_keys, norm_decay_mult, bias_decay_mult, layer_decay}), or None.
        prefix_mults: the method's {parameter-name prefix: lr multiplier}.
    """
    rule = _paramwise_rule(model, paramwise)
    groups: dict[tuple[float, float], list] = {}
    for name, module, param_name, param in _trainable(model):
        lr_mult, decay_mult = rule(name, module, param_name, param)
        lr_mult *= next((m for prefix, m in prefix_mults.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((lr_mult, decay_mult), []).append(param)
    return [{"params": params, "lr_mult": lr, "decay_mult": decay} for (lr, decay), params in groups.items()]


def _paramwise_rule(model: nn.Module, paramwise):
    """rule(name, module, param_name, param) -> (lr multiplier, decay multiplier) of optim.paramwise."""
    paramwise = paramwise or {}
    if paramwise.get("layer_decay"):
        return _layer_decay_rule(model, paramwise["layer_decay"])
    return _default_rule(paramwise)


def _trainable(model: nn.Module):
    """(name, owning module, name in the module, parameter) of each trainable parameter, in named_parameters()
    order (a parameter shared by two modules counts once, with the first)."""
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                yield f"{module_name}.{param_name}" if module_name else param_name, module, param_name, param


def _default_rule(paramwise):
    """mmengine DefaultOptimWrapperConstructor.add_params: the first custom key (longest first, ties alphabetical)
    that is a substring of "<module path>.<param name>" sets both multipliers (a missing one is 1) and no other rule
    applies; otherwise norm-layer parameters take norm_decay_mult and other biases bias_decay_mult, where set."""
    custom = {str(k): v for k, v in (paramwise.get("custom_keys") or {}).items()}
    keys = sorted(sorted(custom), key=len, reverse=True)
    norm_decay, bias_decay = paramwise.get("norm_decay_mult"), paramwise.get("bias_decay_mult")

    def rule(name, module, param_name, param):
        # mmengine matches f"{module path}.{param name}": a top-level parameter reads ".<name>".
        where = name if "." in name else f".{name}"
        key = next((k for k in keys if k in where), None)
        if key is not None:
            return float(custom[key].get("lr_mult", 1.0)), float(custom[key].get("decay_mult", 1.0))
        if isinstance(module, NORM_TYPES) and norm_decay is not None:
            return 1.0, float(norm_decay)
        if param_name == "bias" and bias_decay is not None:
            return 1.0, float(bias_decay)
        return 1.0, 1.0
    return rule


def _layer_decay_rule(model: nn.Module, layer_decay):
    """mmseg LearningRateDecayOptimizerConstructor, decay_type stage_wise, on mmpretrain ConvNeXt names: with
    n = num_layers + 2, the stem and downsampling layers have id 0, backbone.stages.<s> id s + 1 and everything
    else (the output norms, every head, the HL branch) id n - 1; the lr multiplier is rate ** (n - 1 - id).
    1-D parameters and biases have no weight decay."""
    if not any(name.startswith("backbone.downsample_layers.") for name, *_ in _trainable(model)):
        raise ConfigError("optim.paramwise.layer_decay (stage_wise) is mmseg's rule for ConvNeXt's parameter names "
                          "(backbone.downsample_layers.<i>, backbone.stages.<s>); this model's backbone has none")
    last = int(layer_decay["num_layers"]) + 1
    rate = float(layer_decay["rate"])

    def rule(name, module, param_name, param):
        if name.startswith("backbone.downsample_layers."):
            layer = 0
        elif name.startswith("backbone.stages."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = last
        no_decay = param.ndim == 1 or name.endswith(".bias")
        return rate ** (last - layer), 0.0 if no_decay else 1.0
    return rule


def describe_groups(groups: list[dict]) -> str:
    """One line for the start-up log: each group's multipliers and size."""
    return "; ".join(f"lr x{g['lr_mult']:.4g} wd x{g['decay_mult']:g}: {len(g['params'])} tensors "
                     f"({sum(p.numel() for p in g['params']) / 1e6:.2f}M)" for g in groups)

