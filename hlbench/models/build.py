"""build_model: a Segmentor from the `model` config group (hlbench/conf/model/*.yaml)."""

import inspect

import torch.nn as nn
from omegaconf import DictConfig, ListConfig, OmegaConf

from hlbench.errors import ConfigError
from hlbench.models.attention_heads import ANNHead, CCHead, EMAHead, GCHead, ISAHead, NLHead, PSAHead
from hlbench.models.bisenetv2 import BiSeNetV2
from hlbench.models.convnext import ConvNeXt
from hlbench.models.heads import (ASPPHead, ASPPPlusHead, CascadeHead, ConvBNReLU, DepthwiseSeparableASPPHead,
                                  FCNHead, OCRHead, ProjectedHead, PSPHead, UPerHead)
from hlbench.models.hrnet import HRNet
from hlbench.models.lraspp_head import LRASPPHead
from hlbench.models.mask2former import Mask2FormerHead, Mask2FormerSegmentor
from hlbench.models.mit import MixVisionTransformer
from hlbench.models.mobilenet import MobileNetV2, MobileNetV3
from hlbench.models.pretrained import load_pretrained
from hlbench.models.resnest import ResNeSt
from hlbench.models.resnet import ResNetV1c, ResNetV1s, ResNeXt, TorchvisionResNet
from hlbench.models.segformer_head import SegformerHead
from hlbench.models.segmentor import AuxiliaryHeads, CascadeSegmentor, Segmentor
from hlbench.models.swin import SwinTransformer
from hlbench.weights import resolve_pretrained

BACKBONES = {"resnet_v1c": ResNetV1c, "resnet_v1s": ResNetV1s, "torchvision_resnet": TorchvisionResNet,
             "resnext": ResNeXt, "resnest": ResNeSt,
             "mobilenet_v2": MobileNetV2, "mobilenet_v3": MobileNetV3, "hrnet": HRNet,
             "bisenetv2": BiSeNetV2, "convnext": ConvNeXt, "swin": SwinTransformer, "mit": MixVisionTransformer}
HEADS = {"fcn": FCNHead, "psp": PSPHead, "aspp": ASPPHead, "sep_aspp": DepthwiseSeparableASPPHead,
         "aspp_plus": ASPPPlusHead, "uper": UPerHead, "ocr": OCRHead, "ann": ANNHead, "cc": CCHead, "ema": EMAHead,
         "gc": GCHead, "isa": ISAHead, "nl": NLHead, "psa": PSAHead, "lraspp": LRASPPHead,
         "segformer": SegformerHead, "mask2former": Mask2FormerHead}
# Heads with a low-level skip; build_model derives its input width from c1_in_index.
C1_HEADS = (DepthwiseSeparableASPPHead, ASPPPlusHead)
# Heads that refine a previous stage's logits; their config holds that stage under `stage0` (OCRNet: an FCN head).
CASCADE_HEADS = (OCRHead,)


def _lookup(table, cfg, section):
    if "type" not in cfg:
        raise ConfigError(f"model.{section}.type is required; one of {sorted(table)}")
    if cfg["type"] not in table:
        raise ConfigError(f"unknown model.{section}.type {cfg['type']!r}; valid: {sorted(table)}")
    return table[cfg["type"]]


def _init_parameters(cls):
    """Constructor argument names of cls and of the hlbench base classes it forwards **kwargs to."""
    names = set()
    for c in cls.__mro__[:cls.__mro__.index(nn.Module)]:
        names |= set(inspect.signature(c.__init__).parameters)
    return names - {"self", "args", "kwargs"}


def _construct(cls, section, options, **derived):
    """cls(**options, **derived) with a clear error naming config keys that cls does not take."""
    accepted = _init_parameters(cls) - set(derived)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"model.{section}: {cls.__name__} does not take {unknown}; accepted: {sorted(accepted)}")
    return cls(**options, **derived)


def _build_head(cfg, stage_channels, num_classes, align_corners, section="head"):
    cls = _lookup(HEADS, cfg, section)
    options = {k: v for k, v in cfg.items() if k != "type"}
    in_index = options.get("in_index", -1)
    in_channels = [stage_channels[i] for i in in_index] if isinstance(in_index, list) else stage_channels[in_index]
    derived = {"in_channels": in_channels, "num_classes": num_classes, "align_corners": align_corners}
    if cls in C1_HEADS:
        derived["c1_in_channels"] = stage_channels[options.get("c1_in_index", 0)]
    return _construct(cls, section, options, **derived)


def _stages_read(head_cfgs, num_stages) -> set[int]:
    """Indices of the backbone stages that heads with these configs read (in_index, and c1_in_index for a skip)."""
    read = set()
    for cfg in head_cfgs:
        index = cfg.get("in_index", -1)
        read.update(index if isinstance(index, list) else [index])
        if _lookup(HEADS, cfg, "head") in C1_HEADS:
            read.add(cfg.get("c1_in_index", 0))
    return {i % num_stages for i in read}


def aux_head_configs(model_cfg) -> dict[str, dict]:
    """{config section: head config} of the auxiliary heads a model config declares. `aux` is one head (a mapping;
    none when empty or `enabled: false`) or, as mmseg's `auxiliary_head` list, several (sections aux.0, aux.1, ...).
    Each is an FCN head without input concatenation unless it says otherwise. A head's `loss_weight` is the loss's,
    not the head's (aux_loss_weights)."""
    aux = model_cfg.get("aux") or {}
    if isinstance(aux, (list, ListConfig)):
        heads = {f"aux.{i}": dict(head) for i, head in enumerate(aux)}
    else:
        aux = dict(aux)
        heads = {"aux": aux} if aux.pop("enabled", bool(aux)) else {}
    return {section: {"type": "fcn", "concat_input": False, **head} for section, head in heads.items()}


def aux_loss_weights(model_cfg, default: float) -> dict[str, float]:
    """{model output key: loss weight} of the auxiliary heads: "aux" for one head, "aux_<i>" for head i of a list
    (AuxiliaryHeads), weighted by their `loss_weight`, else by `default` (loss.aux_weight)."""
    return {section.replace(".", "_"): float(head.get("loss_weight", default))
            for section, head in aux_head_configs(model_cfg).items()}


def build_model(model_cfg, num_classes, hl=None, *, weights_dir=None):
    """Segmentor from a model config; with hl.enabled, plus the HL head: a fresh copy of the decode head with one
    output.

    Args:
        model_cfg: dict/DictConfig with backbone, head, aux (one head or a list: aux_head_configs) and
            align_corners (see hlbench/conf/model/).
        hl: the run config's `hl` node, or None for a model without the HL head. Read here: enabled,
            detach_features (default true) and head_channels (default null). head_channels N makes the light HL
            head: the copy with N channels, reading the backbone stages it uses through 1×1 projections to N
            channels (ProjectedHead); null keeps the decode head's exact copy, as the authors do.
        weights_dir: the folder where a bare `backbone.pretrained` file name is looked up (hlbench.weights).
    """
    hl = hl if hl is not None else {}
    # Defaults as hlbench/conf/config.yaml's, for callers that pass a partial node (tests, notebooks).
    # hl.source=fixed takes H from stored maps (hlbench/data/hl_maps.py): no HL branch to build.
    with_hl = bool(hl.get("enabled", False)) and hl.get("source", "online") == "online"
    detach_hl_features = bool(hl.get("detach_features", True))
    hl_head_channels = hl.get("head_channels")
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    for key in ("backbone", "head"):
        if key not in cfg:
            raise ConfigError(f"model.{key} is required")
    align_corners = cfg.get("align_corners", False)

    pretrained = resolve_pretrained(cfg, weights_dir)  # before building, so a missing file fails at once
    backbone_cfg = dict(cfg["backbone"])
    backbone_cfg.pop("pretrained", None)
    backbone_cls = _lookup(BACKBONES, backbone_cfg, "backbone")
    backbone = _construct(backbone_cls, "backbone", {k: v for k, v in backbone_cfg.items() if k != "type"})
    if pretrained is not None:
        load_pretrained(backbone, pretrained)
    channels = backbone.out_channels

    head_cfg = dict(cfg["head"])
    stage0_cfg = dict(head_cfg.pop("stage0", None) or {})
    if (_lookup(HEADS, head_cfg, "head") in CASCADE_HEADS) != bool(stage0_cfg):
        raise ConfigError(f"model.head.stage0 is required exactly for the cascade head types "
                          f"{sorted(k for k, v in HEADS.items() if v in CASCADE_HEADS)}")

    def decode(n_out, cfg=head_cfg, stage_channels=channels):
        head = _build_head(cfg, stage_channels, n_out, align_corners)
        if not stage0_cfg:
            return head
        # The HL copy keeps stage 0 at num_classes outputs, the soft object regions its stage 1 gathers over
        # (authors' hl_cascade_encoder_decoder.py).
        return CascadeHead([_build_head(stage0_cfg, stage_channels, num_classes, align_corners, "head.stage0"), head])

    decode_head = decode(num_classes)
    aux_heads = [_build_head({k: v for k, v in aux_cfg.items() if k != "loss_weight"}, channels, num_classes,
                             align_corners, section) for section, aux_cfg in aux_head_configs(cfg).items()]
    if isinstance(cfg.get("aux"), list):
        auxiliary_head = AuxiliaryHeads(aux_heads)
    else:
        auxiliary_head = aux_heads[0] if aux_heads else None
    # As the authors' hl_encoder_decoder.py: the HL branch copies the decode-head config with num_classes=1;
    # the aux head is not copied. A cascade copies every stage. U2PL's representation head is not part of the
    # segmentation path either, so the copy goes without it.
    hl_cfg = {**head_cfg, "rep_channels": 0} if "rep_channels" in head_cfg else head_cfg
    hl_head = None
    if with_hl and hl_head_channels is None:
        hl_head = decode(1, hl_cfg)
    elif with_hl:  # the light head: the copy at N channels, on the stages it reads projected to N
        n = int(hl_head_channels)
        read = _stages_read([hl_cfg, *([stage0_cfg] if stage0_cfg else [])], len(channels))
        project = nn.ModuleList(ConvBNReLU(c, n) if i in read and c > n else nn.Identity()
                                for i, c in enumerate(channels))
        narrow = [n if isinstance(p, ConvBNReLU) else c for p, c in zip(project, channels)]
        hl_head = ProjectedHead(project, decode(1, {**hl_cfg, "channels": n}, narrow))
    segmentor = CascadeSegmentor if stage0_cfg else Segmentor
    if isinstance(decode_head, Mask2FormerHead):  # per-query class + mask outputs, its own semantic inference
        segmentor = Mask2FormerSegmentor
    return segmentor(backbone, decode_head, auxiliary_head, hl_head, align_corners, detach_hl_features)


def trained_model(cfg, checkpoint, num_classes: int):
    """(model, load report) of a trained run: built from the run config's own model and hl nodes (so a light HL head
    comes back light) without the ImageNet file the recipe names, every tensor from `checkpoint`. A tensor left at
    its random init would be scored as if trained (the HL map's AUROC above all), so a partial file is refused."""
    from hlbench.models.checkpoints import load_checkpoint

    model = build_model(OmegaConf.merge(cfg.model, {"backbone": {"pretrained": "none"}}), num_classes, hl=cfg.hl)
    return model, load_checkpoint(model, checkpoint, require_all=True)
