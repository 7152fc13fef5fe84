"""Evaluation with a recipe's test protocol: confusion-matrix metrics, HL-map AUROC and HL-map snapshots."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..data import normalize_batch
from ..data.bad_samples import LeaveOutBad
from ..errors import ConfigError
from ..hardness import hardness_map
from ..labels import IGNORE_INDEX
from ..losses import pixel_cross_entropy
from ..models.heads import resize
from ..metrics import ConfusionMatrix, binary_auroc, declared_metrics

# Pixels per image scored for the AUROC: enough for a stable estimate, cheap to gather across ranks.
_AUROC_PIXELS_PER_IMAGE = 4096


EVAL_MODES = ("whole", "slide", "slide_truncated", "center")



def pad_to_multiple(img: torch.Tensor, divisor: int | None) -> torch.Tensor:
    """img padded bottom/right with 0 (the mean colour once normalised) to a multiple of `divisor` on each side."""
    if not divisor:
        return img
    h, w = img.shape[-2:]
    return torch.nn.functional.pad(img, (0, -w % divisor, 0, -h % divisor))

def protocol_of(eval_cfg) -> dict:
    """The parts of the eval config that define the numbers, recorded next to every result."""
    proto = {"mode": eval_cfg["mode"]}
    if proto["mode"] != "whole":
        proto["crop"] = list(eval_cfg["crop"])
    if proto["mode"].startswith("slide"):
        proto["stride"] = list(eval_cfg["stride"])
    return proto


def center_crop(batch: dict, crop) -> dict:
    """The central crop [h, w] of a val batch's images, labels and hardness masks (U2PL's per-epoch validation)."""
    h, w = batch["label"].shape[-2:]
    ch, cw = min(crop[0], h), min(crop[1], w)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return {**batch, **{k: batch[k][..., y0:y0 + ch, x0:x0 + cw] for k in ("img", "label")},
            "hard": batch["hard"][..., y0:y0 + ch, x0:x0 + cw] if batch["hard"].numel() else batch["hard"]}


def _stack_by_shape(items: list[dict]) -> list[dict]:
    """Group val items into batches of equal image and label size (sizes vary on e.g. ADE20K)."""
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        groups.setdefault((tuple(it["img"].shape), tuple(it["label"].shape)), []).append(it)
    return [{k: torch.stack([torch.as_tensor(g[k]) for g in grp]) for k in ("img", "label", "hard", "index")}
            for grp in groups.values()]


def hardness_kinds(dataset) -> dict:
    """{kind: bit} of the data set's ground-truth hardness mask (synthetic data); {} where it has none."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dict(dataset.hard_bits)


def evaluate(model, dataset, *args, **kwargs) -> dict:
    """Evaluate without touching the caller's RNG streams (see _evaluate for the arguments).

    Data loading draws from torch's global RNG; forking it keeps training results independent of how often
    a run evaluates.
    """
    with torch.random.fork_rng(devices=[]):
        return _evaluate(model, dataset, *args, **kwargs)


@torch.no_grad()
def _evaluate(model, dataset, eval_cfg, data_cfg, device: torch.device, class_names: list[str],
              *, num_panel: int = 0, hl_offset: float = 0.1) -> dict:
    """Evaluate `model` (unwrapped Segmentor) on `dataset` with the recipe's protocol, in fp32.

    The HL branch, which inference never needs, runs only where it can be scored (a data set with a hardness
    mask, for the AUROC) and for the first `num_panel` images (the HL-map panel).

    Returns {"metrics": mmseg-style dict, "hl_auroc": float|None, "hl_auroc_kinds": {"hl_auroc.<kind>": ...},
    "panel": dict of the first images or None, "confusion": the summed confusion matrix (CPU)}.
    Under DDP every rank scores its shard; the confusion matrix and AUROC samples are reduced over ranks.
    """
    was_training = model.training
    model.eval()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    # data.on_bad_sample=skip: a bad file's item is None and left out (a substitute would score an image twice).
    shard = Subset(LeaveOutBad(dataset), list(range(rank, len(dataset), world)))
    loader = DataLoader(shard, batch_size=eval_cfg.batch_size, collate_fn=list, num_workers=0)
    cm = ConfusionMatrix(len(class_names), IGNORE_INDEX, device=device)
    has_hl = getattr(model, "hl_head", None) is not None
    bits = hardness_kinds(dataset)
    score_hl = has_hl and eval_cfg.hl_auroc and bool(bits)
    scores, targets, panel = [], [], None
    # Shown only once an evaluation has taken `delay` seconds: a sliding-window pass over full-size images on a CPU
    # takes minutes per image.
    progress = tqdm(total=len(shard), desc="evaluation", unit="image", disable=rank != 0, delay=10, leave=False,
                    dynamic_ncols=True)
    for items in loader:
        for batch in _stack_by_shape([item for item in items if item is not None]):
            if eval_cfg.mode == "center":
                batch = center_crop(batch, eval_cfg.crop)
            img = normalize_batch(batch["img"].to(device), data_cfg.mean, data_cfg.std)
            label = batch["label"].to(device)
            logits = model.predict(pad_to_multiple(img, eval_cfg.get("size_divisor")),
                                   mode="whole" if eval_cfg.mode == "center" else eval_cfg.mode,
                                   crop=eval_cfg.crop, stride=eval_cfg.stride, window_batch=eval_cfg.window_batch)
            logits = logits[..., :img.shape[-2], :img.shape[-1]]  # the padding's logits go
            logits = resize(logits.float(), label.shape[-2:], model.align_corners)
            pred = logits.argmax(1)
            cm.update(pred, label)
            k = min(num_panel, img.shape[0]) if panel is None and rank == 0 else 0
            hl_images = img.shape[0] if score_hl else k
            hl = None
            if has_hl and hl_images:
                hl = hardness_map(resize(model.predict_hl(img[:hl_images]).float(), label.shape[-2:],
                                         model.align_corners), hl_offset)
            if score_hl and batch["hard"].numel():
                _sample_auroc_pixels(hl, batch["hard"].to(device), label, batch["index"], IGNORE_INDEX,
                                     scores, targets)
            if k:
                panel = {"images": batch["img"][:k], "labels": label[:k].cpu(), "preds": pred[:k].cpu(),
                         "hl": hl[:k].cpu() if hl is not None else None, "hard": batch["hard"][:k],
                         "loss": pixel_cross_entropy(logits[:k], label[:k], IGNORE_INDEX).cpu()}
        progress.update(len(items))
    progress.close()
    cm.all_reduce()
    metrics = cm.compute(class_names)
    metrics.update(declared_metrics(metrics, data_cfg.get("metric", "mIoU"), class_names))
    auroc = _hardness_aurocs(scores, targets, bits, data_cfg.get("hard_kinds")) if score_hl else {}
    model.train(was_training)
    return {"metrics": metrics, "hl_auroc": auroc.get("hl_auroc"), "hl_auroc_kinds": auroc, "panel": panel,
            "confusion": cm.mat.cpu()}


def _sample_auroc_pixels(hl, hard, label, index, ignore_index, scores, targets) -> None:
    """A fixed random subset of labelled pixels per image (seeded by the image index, so reproducible)."""
    for i in range(hl.shape[0]):
        valid = (label[i] != ignore_index).flatten().nonzero().squeeze(1)
        if valid.numel() == 0:
            continue
        g = torch.Generator().manual_seed(int(index[i]))
        pick = valid[torch.randperm(valid.numel(), generator=g)[:_AUROC_PIXELS_PER_IMAGE].to(valid.device)]
        scores.append(hl[i].flatten()[pick].cpu())
        targets.append(hard[i].flatten()[pick].cpu())


def _hardness_aurocs(scores, hard_values, bits: dict, hard_kinds) -> dict:
    """AUROC of the HL map for "hard" pixels (any of `hard_kinds`) vs pixels of no kind, and per kind.

    Pixels of other kinds only are left out of the headline value: they are neither hard nor easy by definition.
    """
    local = (torch.cat(scores), torch.cat(hard_values)) if scores else (torch.empty(0), torch.empty(0, dtype=torch.uint8))
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = (torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]))
    score, hard = local[0], local[1].to(torch.int64)
    if score.numel() == 0 or not bits:
        return {}
    unknown = set(hard_kinds or []) - set(bits)
    if unknown:
        raise ConfigError(f"data.hard_kinds has {sorted(unknown)}; the data set's kinds are {sorted(bits)}")
    easy = hard == 0

    def auroc(mask_bits: int):
        positive = (hard & mask_bits) > 0
        keep = positive | easy
        value = binary_auroc(score[keep], positive[keep])
        return None if math.isnan(value) else value

    out = {f"hl_auroc.{kind}": auroc(bit) for kind, bit in bits.items()}
    kinds = hard_kinds or list(bits)
    out["hl_auroc"] = auroc(sum(bits[k] for k in kinds))
    return out
