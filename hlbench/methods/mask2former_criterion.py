"""Mask2Former's training loss (Cheng et al. 2022, §3.3 and §4 "Training"), as mmdet 3.x's Mask2FormerHead
computes it for mmseg's configs, and the options for a fixed HL map inside it.

Per prediction stage (the initial queries and each decoder layer, "deep supervision"):
  1. Hungarian matching of queries to the image's ground-truth masks (one per class present), on
     `num_points` uniform random points shared by all pairs: cost = 2·(−softmax prob of the GT class)
     + 5·mean point BCE + 5·naive dice (eps 1).
  2. Point sampling for the matched pairs (PointRend, Kirillov et al. 2020): 3·P uniform candidates, the 0.75·P
     most uncertain (−|logit|) plus 0.25·P uniform points.
  3. Losses: class CE over all queries (no-object class weight 0.1, normalised by the summed class weights),
     point BCE ÷ (num_masks·P) and naive dice ÷ num_masks, weighted 2 / 5 / 5.
The loss dict uses mmseg's log keys: loss_cls, loss_mask, loss_dice for the last stage and d<k>.loss_* for
stage k of the others. The random draws come in mmdet's order (stage after stage; per image the matching
points, then the sampling points of the whole batch), so a seeded run draws the same points as mmdet.

A fixed HL map (the hardness of a trained per-pixel HL model, h = sigmoid(D) + offset, hlbench.hardness) can
enter the loss in one of these modes (`FixedMapOptions.mode`), none of which the authors' logs pin down:
  point_weights    each sampled point's BCE (and optionally dice) term is weighted by h at that point;
  point_selection  the importance score becomes −|logit| + beta·(h − min h over the candidates);
  query_weights    each matched query's losses are weighted by the mean h over its GT mask, normalised to mean 1
                   over the matched queries of the batch.
A uniform map gives plain Mask2Former in each mode (tests/test_mask2former.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from hlbench.engine.distributed import all_reduce_mean
from hlbench.errors import ConfigError
from hlbench.hardness import hardness_map

MODES = ("off", "point_weights", "point_selection", "query_weights")
NORMALISE = ("none", "mask", "batch")
POINT_TARGETS = ("mask", "dice")
QUERY_TARGETS = ("cls", "mask", "dice")
# mmdet's weight_reduce_loss adds float32 eps to every avg_factor, so an empty normaliser gives 0, not NaN.
EPS = torch.finfo(torch.float32).eps


@dataclass
class FixedMapOptions:
    """How a fixed HL map enters the criterion (config node `hl.fixed_map`).

    Args:
        mode: one of MODES; "off" ignores any map.
        targets: the losses it weights: for point_weights a subset of ("mask", "dice"), for query_weights of
            ("cls", "mask", "dice"). Default: mask BCE only, the reading of the authors' logs in which only
            loss_mask is below a stock run's.
        normalise: point_weights only: "none" uses h as is (mean below 1, lowering the BCE scale), "mask" divides
            by its mean over each mask's points, "batch" by its mean over all sampled points. Dice needs "mask" to
            reduce to plain dice under a constant map (its +1 smoothing is not scale-free).
        beta: point_selection only: weight of h in the importance score.
        offset: c in h = sigmoid(D) + c (hl.offset).
    """

    mode: str = "off"
    targets: list = field(default_factory=lambda: ["mask"])
    normalise: str = "none"
    beta: float = 1.0
    offset: float = 0.1

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"hl.fixed_map.mode must be one of {MODES}, got {self.mode!r}")
        if self.normalise not in NORMALISE:
            raise ConfigError(f"hl.fixed_map.normalise must be one of {NORMALISE}, got {self.normalise!r}")
        allowed = QUERY_TARGETS if self.mode == "query_weights" else POINT_TARGETS
        bad = sorted(set(self.targets) - set(allowed))
        if self.mode in ("point_weights", "query_weights") and (bad or not self.targets):
            raise ConfigError(f"hl.fixed_map.targets for mode {self.mode} must be a non-empty subset of {allowed}, "
                              f"got {list(self.targets)}")
        self.targets = list(self.targets)


def point_sample(x, coords, padding="zeros"):
    """Values of (N, C, H, W) maps at (N, P, 2) points (x, y) in [0, 1] (bilinear, pixel centres at
    (i + 0.5)/size): (N, C, P). Within half a pixel of the border the map is blended with zeros (mmcv's
    point_sample, used for logits and GT masks), or with padding="border" with its edge values, which keeps a
    constant HL map constant at every point."""
    return F.grid_sample(x, 2 * coords[:, :, None] - 1, mode="bilinear", padding_mode=padding,
                         align_corners=False)[..., 0]


def uncertain_points(mask_logits, num_points, oversample_ratio, importance_ratio, hardness=None, beta=0.0):
    """(N, P, 2) training points per mask: of int(P·oversample) uniform candidates, the int(importance·P) with
    the highest score (−|logit|, plus beta·(h − min h) with an HL map `hardness` (N, 1, H', W')), then uniform
    points for the rest. The draws and the top-k match mmdet's get_uncertain_point_coords_with_randomness."""
    n = mask_logits.shape[0]
    candidates = torch.rand(n, int(num_points * oversample_ratio), 2, device=mask_logits.device)
    score = -point_sample(mask_logits, candidates)[:, 0].abs()
    if hardness is not None:
        h = point_sample(hardness.to(score.dtype), candidates, "border")[:, 0]
        # Subtracting the minimum keeps a constant map from moving any score (top-k is shift-invariant, but float
        # addition of a constant can still merge near-equal scores).
        score = score + beta * (h - h.amin(1, keepdim=True))
    num_uncertain = int(importance_ratio * num_points)
    top = score.topk(num_uncertain, dim=1)[1]
    points = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    if num_points > num_uncertain:
        points = torch.cat([points, torch.rand(n, num_points - num_uncertain, 2, device=mask_logits.device)], 1)
    return points


def linear_assignment(cost):
    """Exact minimum-cost assignment of the smaller side of a (rows, cols) cost matrix (the Hungarian method
    with potentials, Jonker-Volgenant's shortest augmenting paths; O(n²·m), vectorised over the larger side).
    Returns (row indices, col indices) of the assigned pairs, sorted by row."""
    c = np.asarray(cost, dtype=np.float64)
    transposed = c.shape[0] > c.shape[1]
    a = c.T if transposed else c  # n <= m: every row of `a` gets a column
    n, m = a.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: 1-based row holding column j (0: free); column 0 is virtual
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        min_slack = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:  # grow the alternating tree from row i until it reaches a free column
            used[j0] = True
            row = owner[j0]
            slack = a[row - 1] - u[row] - v[1:]
            better = ~used[1:] & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            way[1:][better] = j0
            free_slack = np.where(used[1:], np.inf, min_slack[1:])
            j1 = int(free_slack.argmin()) + 1
            delta = free_slack[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            min_slack[~used] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.nonzero(owner[1:])[0]
    rows = owner[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


def semantic_targets(label, ignore_index=255):
    """Per image, mmseg's semantic-to-instance conversion: the classes present (ignore_index dropped, ascending)
    and one binary mask per class: [(classes (G,), masks (G, H, W) float)]."""
    out = []
    for lab in label:
        classes = torch.unique(lab)
        classes = classes[classes != ignore_index]
        out.append((classes.long(), (lab[None] == classes[:, None, None]).float()))
    return out


def _bce_cost(pred, gt):
    """(Q, G) mean over points of BCE(pred_q, gt_g): pred logits (Q, P), gt (G, P) in {0, 1}."""
    pos = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
    return (pos @ gt.T + neg @ (1 - gt).T) / pred.shape[1]


def _dice_cost(pred, gt, eps=1.0):
    """(Q, G) naive dice loss 1 − (2·Σσt + eps)/(Σσ + Σt + eps)."""
    p = pred.sigmoid()
    return 1 - (2 * p @ gt.T + eps) / (p.sum(1)[:, None] + gt.sum(1)[None, :] + eps)


class Mask2FormerCriterion:
    """The loss of the mmseg 1.x Mask2Former configs (defaults), with an optional fixed HL map.

    Args:
        num_classes: semantic classes; the class logits have one more, no-object.
        num_points, oversample_ratio, importance_ratio: the point sampling (12544, 3.0, 0.75).
        cls_weight, mask_weight, dice_weight: loss weights (2, 5, 5); match_* the matching cost weights (2, 5, 5).
        no_object_weight: CE class weight of no-object (0.1).
        group_size: normalise the class CE per group of this many images and average the groups, as mmdet does per
            GPU (the mask losses' normaliser is averaged over GPUs, so the whole batch is exact for them); None:
            the whole batch.
        fixed_map: FixedMapOptions or its dict (hl.fixed_map).
    """

    def __init__(self, num_classes, num_points=12544, oversample_ratio=3.0, importance_ratio=0.75, cls_weight=2.0,
                 mask_weight=5.0, dice_weight=5.0, match_cls=2.0, match_mask=5.0, match_dice=5.0,
                 no_object_weight=0.1, ignore_index=255, group_size=None, fixed_map=None):
        self.num_classes, self.num_points = num_classes, num_points
        self.oversample_ratio, self.importance_ratio = oversample_ratio, importance_ratio
        self.cls_weight, self.mask_weight, self.dice_weight = cls_weight, mask_weight, dice_weight
        self.match_cls, self.match_mask, self.match_dice = match_cls, match_mask, match_dice
        self.ignore_index, self.group_size = ignore_index, group_size
        self.class_weight = torch.ones(num_classes + 1)
        self.class_weight[-1] = no_object_weight
        self.fixed_map = fixed_map if isinstance(fixed_map, FixedMapOptions) else FixedMapOptions(**(fixed_map or {}))

    def __call__(self, all_cls, all_masks, label, hl_map=None):
        """Loss dict (mmseg keys) of the per-stage class logits [(B, Q, C+1)] and mask logits [(B, Q, h, w)]
        against the (B, H, W) label; `hl_map`: (B, H', W') or (B, 1, H', W') stored HL logits aligned to the
        crop, needed unless fixed_map.mode is "off"."""
        targets = semantic_targets(label, self.ignore_index)
        hardness = None
        if self.fixed_map.mode != "off":
            if hl_map is None:
                raise ConfigError(f"hl.fixed_map.mode={self.fixed_map.mode} needs the batch's hl_map (data.hl_map_dir)")
            hardness = hardness_map(hl_map, self.fixed_map.offset)[:, None]  # (B, 1, H', W')
        losses = [self.stage_losses(c, m, targets, hardness) for c, m in zip(all_cls, all_masks)]
        out = {}
        for k, stage in enumerate(losses):
            prefix = "" if k == len(losses) - 1 else f"d{k}."
            out.update({f"{prefix}{name}": value for name, value in stage.items()})
        return out

    @torch.no_grad()
    def match(self, cls, masks, classes, gt_masks):
        """(query indices, GT indices) of one image's optimal matching, on num_points shared uniform points."""
        points = torch.rand(1, self.num_points, 2, device=cls.device)  # drawn even without GT, as mmdet
        if gt_masks.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        pred = point_sample(masks[:, None], points.expand(masks.shape[0], -1, -1))[:, 0]
        gt = point_sample(gt_masks[:, None], points.expand(gt_masks.shape[0], -1, -1))[:, 0]
        cost = (-self.match_cls * cls.softmax(-1)[:, classes] + self.match_mask * _bce_cost(pred.float(), gt)
                + self.match_dice * _dice_cost(pred.float(), gt))
        rows, cols = linear_assignment(cost.cpu())
        return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)

    def stage_losses(self, cls, masks, targets, hardness=None):
        """{loss_cls, loss_mask, loss_dice} of one stage: cls (B, Q, C+1), masks (B, Q, h, w)."""
        b, q = cls.shape[:2]
        device = cls.device
        labels = torch.full((b, q), self.num_classes, dtype=torch.long, device=device)
        pred_masks, gt_masks, image_of = [], [], []
        for i, (classes, gt) in enumerate(targets):
            rows, cols = self.match(cls[i].detach(), masks[i].detach(), classes, gt.to(masks.dtype))
            rows, cols = rows.to(device), cols.to(device)
            labels[i, rows] = classes[cols]
            pred_masks.append(masks[i, rows])
            gt_masks.append(gt[cols])
            image_of.append(torch.full((len(rows),), i, dtype=torch.long, device=device))
        pred_masks, gt_masks, image_of = torch.cat(pred_masks), torch.cat(gt_masks), torch.cat(image_of)
        # mmdet averages the matched-mask count over the GPUs (reduce_mean) before it normalises the mask and dice
        # losses, so a GPU with few masks does not weigh them more than the others do
        count = all_reduce_mean({"n": torch.tensor(float(gt_masks.shape[0]), device=device)})["n"]
        num_masks = max(float(count), 1.0)
        mode, targets_hl = self.fixed_map.mode, self.fixed_map.targets

        query_w = None  # per matched query, (M,)
        if mode == "query_weights" and gt_masks.shape[0]:
            h = F.interpolate(hardness, size=gt_masks.shape[1:], mode="bilinear", align_corners=False)[image_of, 0]
            mean_h = (h * gt_masks).flatten(1).sum(1) / gt_masks.flatten(1).sum(1).clamp_min(1)
            query_w = mean_h / mean_h.mean()

        loss_cls = self._class_loss(cls, labels, query_w if "cls" in targets_hl else None)
        if gt_masks.shape[0] == 0:
            zero = masks.sum() * 0  # keeps the graph, as mmdet's mask_preds.sum() over no masks
            return {"loss_cls": self.cls_weight * loss_cls, "loss_mask": zero, "loss_dice": zero}

        with torch.no_grad():
            select = hardness[image_of] if mode == "point_selection" else None
            points = uncertain_points(pred_masks[:, None].detach(), self.num_points, self.oversample_ratio,
                                      self.importance_ratio, select, self.fixed_map.beta)
            point_gt = point_sample(gt_masks[:, None].to(pred_masks.dtype), points)[:, 0]
        point_pred = point_sample(pred_masks[:, None], points)[:, 0]

        point_w = None  # per sampled point, (M, P)
        if mode == "point_weights":
            with torch.no_grad():
                point_w = point_sample(hardness[image_of].to(point_pred.dtype), points, "border")[:, 0]
                if self.fixed_map.normalise == "mask":
                    point_w = point_w / point_w.mean(1, keepdim=True)
                elif self.fixed_map.normalise == "batch":
                    point_w = point_w / point_w.mean()
        bce = F.binary_cross_entropy_with_logits(point_pred, point_gt, reduction="none")
        if point_w is not None and "mask" in targets_hl:
            bce = bce * point_w
        if query_w is not None and "mask" in targets_hl:
            bce = bce * query_w[:, None]
        loss_mask = bce.sum() / (num_masks * self.num_points + EPS)

        p = point_pred.sigmoid()
        dice_w = point_w if point_w is not None and "dice" in targets_hl else torch.ones_like(p)
        # Naive dice with eps 1: 1 − (2Σ w·σ·t + 1)/(Σ w·σ + Σ w·t + 1); w = 1 is mmdet's DiceLoss.
        dice = 1 - (2 * (dice_w * p * point_gt).sum(1) + 1) / ((dice_w * p).sum(1) + (dice_w * point_gt).sum(1) + 1)
        if query_w is not None and "dice" in targets_hl:
            dice = dice * query_w
        loss_dice = dice.sum() / (num_masks + EPS)
        return {"loss_cls": self.cls_weight * loss_cls, "loss_mask": self.mask_weight * loss_mask,
                "loss_dice": self.dice_weight * loss_dice}

    def _class_loss(self, cls, labels, query_w=None):
        """CE with class weights, Σ w_label·CE / Σ w_label per group of images (mmdet: per GPU), groups averaged.
        query_w (M,) multiplies the matched queries' terms (in image, query order), not the normaliser."""
        b = cls.shape[0]
        class_weight = self.class_weight.to(cls.device, cls.dtype)
        ce = F.cross_entropy(cls.flatten(0, 1), labels.flatten(), weight=class_weight, reduction="none").view(b, -1)
        if query_w is not None:
            matched = labels != self.num_classes
            ce = ce.masked_scatter(matched, ce[matched] * query_w.to(ce.dtype))
        norm = class_weight[labels]
        group = self.group_size or b
        if b % group:
            raise ConfigError(f"Mask2Former's class-loss group_size {group} must divide the batch of {b} images")
        ce, norm = ce.view(b // group, -1), norm.view(b // group, -1)
        return (ce.sum(1) / (norm.sum(1) + EPS)).mean()
