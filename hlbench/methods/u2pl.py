"""U2PL (Wang et al., CVPR 2022), "w/ CutMix" as in Haochen-Wang409/U2PL `train_semi.py` and
`u2pl/utils/loss_helper.py`: an EMA teacher labels CutMix-ed unlabeled images; the student learns from the reliable
(low-entropy) pseudo-labels and contrasts its features against unreliable pixels kept in per-class memory queues.

One iteration (per reference GPU batch of 2 labeled + 2 unlabeled images; see `group` below):
  1. eval-mode teacher on the unlabeled images -> pseudo-labels;
  2. CutMix the unlabeled batch with half-area boxes (p = 0.5 per iteration);
  3. student on cat(labeled, mixed): the labelled OHEM loss (+ 0.4 aux) and L_h, through LabelledLoss;
  4. train-mode teacher on the same batch: entropy, probabilities and features;
  5. L_u: CE on the pseudo-labels without the highest-entropy 20 (1 - t/T) % of pixels, rescaled;
  6. L_c: the contrastive loss with per-class queues of unreliable teacher features;
  then the EMA update of the teacher's parameters (its BN buffers are its own).

`method.behaviour` sets the flags on which the reference code and the paper differ (README of this module's
config); every flag can be overridden on its own.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import ConfigError
from ..hardness import hardness_loss
from ..labels import IGNORE_INDEX
from ..models.heads import resize
from .base import Method, Stream, resolve_behaviour_flags
from .labelled_loss import LabelledLoss, reference_group, unlabeled_per_gpu
from .strong_aug import half_area_box

# behaviour -> flag values. The reference column produced the published numbers.
BEHAVIOURS = {
    "reference": {"negatives": "reference", "class_index": "reference", "contra_labels": "reference",
                  "teacher_epoch0": "student", "contra_weight": 1.0, "contra_grad": "reference",
                  "entropy_source": "train_teacher_mixed"},
    "paper": {"negatives": "paper", "class_index": "paper", "contra_labels": "per_image", "teacher_epoch0": "ema",
              "contra_weight": 0.1, "contra_grad": "paper", "entropy_source": "eval_teacher"},
}
FLAG_CHOICES = {"negatives": ("reference", "paper"), "class_index": ("reference", "paper"),
                "contra_labels": ("reference", "per_image"), "teacher_epoch0": ("student", "ema"),
                "contra_grad": ("reference", "paper"), "entropy_source": ("train_teacher_mixed", "eval_teacher")}


def resolve_flags(method_cfg) -> dict:
    """The behaviour's flags with the user's non-null overrides applied; ValueError naming a bad value."""
    return resolve_behaviour_flags(method_cfg, BEHAVIOURS, FLAG_CHOICES, "U2PL")


def entropy_of(prob: torch.Tensor) -> torch.Tensor:
    """Per-pixel entropy -sum_c p log(p + 1e-10) of N×C×H×W probabilities."""
    return -(prob * torch.log(prob + 1e-10)).sum(1)


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """numpy.percentile(values, q) (linear interpolation), as the reference computes its thresholds."""
    return torch.quantile(values.float().flatten(), q / 100)


def iters_per_epoch(total_iters: int, epochs: int) -> int:
    """Iterations per reference epoch, rounded up so that every iteration of the run falls in epochs 0 .. T-1 (the
    reference's epoch never reaches T; a floor would put the last iterations of an uneven run past the schedule)."""
    return max(1, math.ceil(total_iters / epochs))


def drop_percentile(drop_percent: float, t_frac: float) -> float:
    """The entropy percentile above which pseudo-labels are dropped at training progress t/T: the unreliable share
    (100 - drop_percent) (1 - t/T) % shrinks to 0 (train_semi.py)."""
    return 100 - (100 - drop_percent) * (1 - t_frac)


def cutmix_masks(n: int, group: int, size: tuple[int, int], p: float, device=None) -> torch.Tensor:
    """N×H×W CutMix boxes of a device batch of n images: each reference GPU batch of `group` images mixes with
    probability p (train_semi.py draws once per GPU), each of its images with its own half-area box; the images of
    a batch that does not mix get an empty box."""
    mixing = (torch.rand(n // group) < p).repeat_interleave(group).tolist()
    empty = torch.zeros(size, dtype=torch.bool, device=device)
    return torch.stack([half_area_box(*size, device=device) if mix else empty for mix in mixing])


def contrastive_labels(labels: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """N×C×h×w class masks of one reference GPU batch's labels (N×h×w, 255 = none) for the contrastive loss.

    per_image: each image's own one-hot. reference: U2PL's `label_onehot` (u2pl/utils/utils.py) scatters along the
    class dim with an (N, 1, h, w) index, so only image 0 gets a map: at each pixel every class that any image of
    the batch has there (an ignored label counts as class 0), cleared where image 0's own label is ignored; the
    other images get none, and so give no anchors, prototypes or negatives.
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    if mode == "per_image":
        return labels[:, None] == classes
    valid = labels != IGNORE_INDEX
    union = (labels.masked_fill(~valid, 0)[:, None] == classes).any(0) & valid[0]
    out = torch.zeros(labels.shape[0], num_classes, *labels.shape[1:], dtype=torch.bool, device=labels.device)
    out[0] = union
    return out


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x in value, `scale` times its gradient."""
    return x.detach() + scale * (x - x.detach())


def cutmix_with_next(masks: torch.Tensor, *tensors: torch.Tensor, group: int) -> list[torch.Tensor]:
    """Paste the next image of the same reference GPU batch (i + 1 mod B) inside each image's box (masks N×H×W).

    U2PL's generate_unsup_data: x_i <- M_i x_i + (1 - M_i) x_{i+1} with M = 1 outside the box; images, labels and
    confidences are mixed alike. Tensors are N×H×W or N×C×H×W.
    """
    n = masks.shape[0]
    partner = torch.arange(n).view(-1, group).roll(-1, dims=1).flatten().to(masks.device)
    out = []
    for t in tensors:
        inside = masks if t.dim() == 3 else masks[:, None]
        out.append(torch.where(inside, t[partner], t))
    return out


def unsup_loss(pred: torch.Tensor, target: torch.Tensor, entropy: torch.Tensor, drop_percent: float,
               hl_logits: torch.Tensor | None = None, hl_offset: float = 0.1) -> torch.Tensor:
    """U2PL's compute_unsupervised_loss for one reference GPU batch.

    Pixels whose entropy is at or above the `drop_percent`-th percentile become 255; the loss is the mean CE over
    the kept pixels times N_all / N_kept. With `hl_logits`, the mean becomes the sg(H)-weighted sum with H
    normalised over the kept pixels, so a uniform H gives the same loss.
    """
    valid = target != IGNORE_INDEX
    thresh = percentile(entropy[valid], drop_percent)
    target = target.masked_fill((entropy >= thresh) & valid, IGNORE_INDEX)
    kept = target != IGNORE_INDEX
    scale = target.numel() / kept.sum().clamp_min(1)
    ce = F.cross_entropy(pred.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    if hl_logits is None:
        return scale * ce.sum() / kept.sum().clamp_min(1)
    weighted, _, _ = hardness_loss(ce, hl_logits, offset=hl_offset, scope="batch", valid_mask=kept)
    return scale * weighted


class MemoryQueues:
    """One FIFO queue of teacher features per class, on the CPU: the newest `sizes[c]` entries are kept."""

    def __init__(self, sizes: list[int], dim: int):
        self.sizes = list(sizes)
        self.queues = [torch.zeros(0, dim) for _ in sizes]

    def push(self, c: int, keys: torch.Tensor) -> None:
        """Append this step's keys of class c from every process (in rank order, as the reference gathers)."""
        keys = keys.detach().float().cpu()
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, keys)
            keys = torch.cat(gathered)
        self.queues[c] = torch.cat([self.queues[c], keys])[-self.sizes[c]:]

    def state_dict(self) -> dict:
        return {"queues": [q.clone() for q in self.queues]}

    def load_state_dict(self, state: dict) -> None:
        self.queues = [q.clone() for q in state["queues"]]


class U2PL(Method):
    """U2PL on the shared loop: streams labeled + unlabeled, an EMA teacher, per-class memory queues."""

    name = "u2pl"
    hl_streams = ("sup", "u2pl.unsup")

    def __init__(self, cfg):
        super().__init__(cfg)
        m = cfg.method
        self.flags = resolve_flags(m)
        self.epochs, self.sup_only_epoch = int(m.epochs), int(m.sup_only_epoch)
        self.ema_decay, self.unsup_weight = float(m.ema_decay), float(m.unsup_weight)
        self.drop_percent, self.cutmix_p = float(m.drop_percent), float(m.cutmix_p)
        self.contra = m.contrastive
        self.reference_gpus = int(cfg.train.reference.gpus)

    def streams(self, datasets: dict) -> dict[str, Stream]:
        if "unlabeled" not in datasets:
            raise ConfigError(f"method=u2pl needs a semi-supervised data config (an unlabeled set); "
                              f"data.name={self.cfg.data.name!r} has only {sorted(datasets)}")
        return {"labeled": Stream(datasets["train"], int(self.cfg.train.batch_size)),
                "unlabeled": Stream(datasets["unlabeled"], int(self.cfg.method.unlabeled_batch),
                                    key="method.unlabeled_batch")}

    def setup(self, model, plan) -> None:
        self.loss = LabelledLoss(self.cfg, plan.per_device["labeled"], hl_weighted="sup" in self.hl_targets)
        self.align_corners = model.align_corners
        per_gpu_u = unlabeled_per_gpu(self.cfg)
        self.group_l = self.loss.group or plan.per_device["labeled"]
        self.group_u = reference_group(plan.per_device["unlabeled"], per_gpu_u) or plan.per_device["unlabeled"]
        if plan.per_device["labeled"] // self.group_l != plan.per_device["unlabeled"] // self.group_u:
            raise ConfigError(f"U2PL pairs each reference GPU's labeled and unlabeled images: per-device batches "
                              f"{plan.per_device} do not split into the same number of reference GPU batches")
        self.iters_per_epoch = iters_per_epoch(int(self.cfg.train.iters), self.epochs)
        # The teacher is a second network; its BN buffers come from its own forwards, never from the student.
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        num_classes = model.num_classes
        sizes = [int(self.contra.queue_size)] * num_classes
        sizes[0] = int(self.contra.queue_size_class0)  # the reference's larger queue for road
        rep_dim = int(self.cfg.model.head.get("rep_channels") or 0)
        if rep_dim <= 0 and self.contra_weight > 0:
            raise ConfigError("U2PL's contrastive loss needs a representation head (model.head.rep_channels > 0), "
                              "or method.flags.contra_weight=0")
        self.queues = MemoryQueues(sizes, max(rep_dim, 1))

    @property
    def contra_weight(self) -> float:
        return float(self.flags["contra_weight"])

    def epoch_of(self, it: int) -> int:
        return it // self.iters_per_epoch

    def step(self, model, batches, it):
        xl, yl = batches["labeled"]["img"], batches["labeled"]["label"]
        xu = batches["unlabeled"]["img"]
        epoch, nl, size = self.epoch_of(it), xl.shape[0], yl.shape[-2:]
        if epoch < self.sup_only_epoch:
            return self._supervised_step(model, xl, yl)
        if epoch == self.sup_only_epoch and self.flags["teacher_epoch0"] == "student":
            # The reference re-points the teacher's parameters to the student's every step of this epoch
            # (train_semi.py), so its teacher is the student until the EMA takes over.
            self._copy_student(model)

        # 1. Pseudo-labels from the eval-mode teacher on the unmixed images.
        with torch.no_grad():
            self.teacher.eval()
            prob_eval = resize(self.teacher(xu)["out"], size, self.align_corners).softmax(1)
            self.teacher.train()
            conf, plabel = prob_eval.max(1)
            entropy_eval = entropy_of(prob_eval)
        # 2. CutMix, decided per reference GPU batch.
        boxes = cutmix_masks(xu.shape[0], self.group_u, size, self.cutmix_p, device=xu.device)
        if boxes.any():
            xu, plabel, conf, entropy_eval = cutmix_with_next(boxes, xu, plabel, conf, entropy_eval,
                                                              group=self.group_u)
        # 3. Student on labeled + mixed images; the labelled terms (OHEM + aux, HL-weighted with "sup" in
        # hl.semisup.apply_to, and L_h with an HL branch).
        out = model(torch.cat([xl, xu]))
        labelled = self.loss({k: v[:nl] for k, v in out.items()}, yl, self.align_corners)
        logs = labelled.logs
        loss = labelled.seg + labelled.hl + labelled.aux
        # 4. Train-mode teacher on the same batch (dropout and batch statistics active, as in the reference).
        with torch.no_grad():
            t_out = self.teacher(torch.cat([xl, xu]))
            t_prob = t_out["out"].softmax(1)
            t_prob_u_large = resize(t_out["out"][nl:], size, self.align_corners).softmax(1)
        entropy = entropy_of(t_prob_u_large) if self.flags["entropy_source"] == "train_teacher_mixed" \
            else entropy_eval
        # 5. Unsupervised loss per reference GPU batch, dropping the least reliable pixels.
        t_frac = epoch / self.epochs
        drop = drop_percentile(self.drop_percent, t_frac)
        pred_u = resize(out["out"][nl:], size, self.align_corners)
        hl_u = resize(out["hl"][nl:], size, self.align_corners) if "u2pl.unsup" in self.hl_targets else None
        parts = [unsup_loss(p, y, e, drop, h, self.cfg.hl.offset)
                 for p, y, e, h in zip(*(t.split(self.group_u) for t in (pred_u, plabel, entropy)),
                                       hl_u.split(self.group_u) if hl_u is not None else [None] * len(pred_u))]
        logs["unsup.loss_u"] = torch.stack(parts).mean()
        loss = loss + self.unsup_weight * logs["unsup.loss_u"]
        # 6. Contrastive loss with the memory queues. The reference all-reduces it (not differentiable) and then
        # divides by the GPU count: it logs the GPUs' mean, but its gradient reaches the weights divided by the
        # number of GPUs, after DDP's own averaging (contrastive_term).
        if self.contra_weight > 0:
            logs["contra.loss_c"] = self._contrastive(out["rep"], t_out["rep"], yl, plabel, t_prob, entropy, t_frac)
            loss = loss + self.contrastive_term(logs["contra.loss_c"])
        logs["loss"] = loss.detach()
        return loss, logs

    def contrastive_term(self, loss_c: torch.Tensor) -> torch.Tensor:
        """The contrastive loss's term of the total: contra_weight x L_c, whose gradient, with contra_grad=reference,
        is divided by the reference's GPU count (train.reference.gpus), as its code's is."""
        scale = 1 / self.reference_gpus if self.flags["contra_grad"] == "reference" else 1.0
        return self.contra_weight * scale_gradient(loss_c, scale)

    def _supervised_step(self, model, xl, yl):
        """A supervised-only epoch (epoch < sup_only_epoch), as train_semi.py runs it: the student on the labeled
        images, the teacher in train mode on them too (its BN statistics move), and 0 x rep.sum() in the loss, so
        the representation head takes part in the step (weight decay, momentum; and DDP sees every parameter
        used)."""
        out = model(xl)
        labelled = self.loss(out, yl, self.align_corners)
        with torch.no_grad():
            self.teacher.train()
            self.teacher(xl)
        unused = 0 * out["rep"].sum() if "rep" in out else labelled.seg.new_zeros(())
        loss = labelled.seg + labelled.hl + labelled.aux + unused
        logs = {**labelled.logs, "unsup.loss_u": unused.detach()}
        if self.contra_weight > 0:
            logs["contra.loss_c"] = unused.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    @torch.no_grad()
    def _copy_student(self, model) -> None:
        student = getattr(model, "module", model)
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.copy_(s)

    @torch.no_grad()
    def after_step(self, model, it: int) -> None:
        """The teacher after the student's step `it` (1-based): untouched in supervised-only epochs; the student
        itself through the first semi-supervised epoch with teacher_epoch0=student (the reference's teacher shares
        the student's tensors then, so the next epoch starts from teacher = student); otherwise the EMA of the
        student's parameters with d_i = min(1 - 1 / (i + 1), ema_decay), i the 0-based global iteration counted
        from the end of the supervised-only epochs (train_semi.py)."""
        epoch = self.epoch_of(it - 1)
        if epoch < self.sup_only_epoch:
            return
        if epoch == self.sup_only_epoch and self.flags["teacher_epoch0"] == "student":
            self._copy_student(model)
            return
        i = it - 1 - self.iters_per_epoch * self.sup_only_epoch
        decay = min(1 - 1 / (i + 1), self.ema_decay)
        for t, s in zip(self.teacher.parameters(), model.parameters()):
            t.mul_(decay).add_(s.detach(), alpha=1 - decay)

    def _masks(self, yl, plabel, entropy, t_frac, rep_hw):
        """Low / high entropy masks of U2PL's contrastive loss at the feature grid, labeled images first.

        Unlabeled pixels are reliable below the alpha_t-th entropy percentile and unreliable above the
        (100 - alpha_t)-th, per reference GPU batch; every labelled pixel counts as both.
        """
        alpha = float(self.contra.low_entropy_threshold) * (1 - t_frac)
        low_u, high_u = [], []
        for e, y in zip(entropy.split(self.group_u), plabel.split(self.group_u)):
            valid = y != IGNORE_INDEX
            low_u.append((e <= percentile(e[valid], alpha)) & valid)
            high_u.append((e >= percentile(e[valid], 100 - alpha)) & valid)
        labelled = yl != IGNORE_INDEX

        def small(mask):
            return F.interpolate(mask[:, None].float(), size=rep_hw, mode="nearest")[:, 0].bool()

        return small(torch.cat([labelled, torch.cat(low_u)])), small(torch.cat([labelled, torch.cat(high_u)]))

    def _contrastive(self, rep, rep_t, yl, plabel, t_prob, entropy, t_frac):
        """U2PL's compute_contra_memobank_loss, per reference GPU batch, averaged over them."""
        rep_hw = rep.shape[-2:]
        num_classes = t_prob.shape[1]
        low, high = self._masks(yl, plabel, entropy, t_frac, rep_hw)
        labels = F.interpolate(torch.cat([yl, plabel])[:, None].float(), size=rep_hw, mode="nearest")[:, 0].long()
        nl, mode = yl.shape[0], self.flags["contra_labels"]
        groups = []
        for g in range(nl // self.group_l):
            rows_l = torch.arange(g * self.group_l, (g + 1) * self.group_l, device=rep.device)
            rows_u = nl + torch.arange(g * self.group_u, (g + 1) * self.group_u, device=rep.device)
            rows = torch.cat([rows_l, rows_u])
            # The reference builds the labeled and the unlabeled label maps of each GPU batch apart.
            onehot = torch.cat([contrastive_labels(labels[rows_l], num_classes, mode),
                                contrastive_labels(labels[rows_u], num_classes, mode)])
            groups.append(self._class_terms(rep[rows], rep_t[rows], onehot, t_prob[rows], low[rows], high[rows],
                                            self.group_l))
        # Every reference GPU enqueues its negatives (gathered) before any of them samples (the class loop in the
        # reference runs to the end before the loss loop).
        for cls in range(num_classes):
            self.queues.push(cls, torch.cat([terms["negatives"][cls] for terms in groups]))
        losses = [self._group_loss(terms, rep) for terms in groups]
        return torch.stack(losses).mean()

    def _class_terms(self, rep, rep_t, onehot, prob, low, high, nl) -> dict:
        """Per class: anchor candidates, the positive prototype, and the negatives to enqueue (one GPU batch whose
        first nl images are labeled; onehot: its N×C×h×w class masks from contrastive_labels)."""
        c = self.contra
        rep, rep_t, prob = rep.permute(0, 2, 3, 1), rep_t.permute(0, 2, 3, 1).detach(), prob.detach()
        rank = prob.argsort(1, descending=True).permute(0, 2, 3, 1)  # N×h×w×C, class indices by probability
        low_rank, high_rank = int(c.low_rank), int(c.high_rank)
        terms = {"anchors": [], "protos": [], "negatives": [], "valid": []}
        for cls in range(onehot.shape[1]):
            is_cls = onehot[:, cls]
            low_valid = is_cls & low
            # Reference: the unreliable mask is multiplied by the one-hot of cls before the rank test, so labeled
            # pixels never qualify (issues #27, #171); paper: any unreliable pixel.
            high_valid = is_cls & high if self.flags["negatives"] == "reference" else high
            anchor_mask = (prob[:, cls] > float(c.current_class_threshold)) & low_valid
            high_mask = (prob[:, cls] < float(c.current_class_negative_threshold)) & high_valid
            terms["anchors"].append(rep[anchor_mask])
            terms["protos"].append(rep_t[low_valid].mean(0, keepdim=True) if low_valid.any() else None)
            in_top = (rank[..., :low_rank] == cls).any(-1)
            in_mid = (rank[..., low_rank:high_rank] == cls).any(-1)
            # Labeled pixels: cls among the teacher's top low_rank but not the label; unlabeled: cls ranked
            # low_rank..high_rank.
            class_mask = torch.cat([in_top[:nl] & ~is_cls[:nl], in_mid[nl:]])
            terms["negatives"].append(rep_t[high_mask & class_mask])
            if low_valid.any():
                terms["valid"].append(cls)
        return terms

    def _group_loss(self, terms: dict, rep: torch.Tensor) -> torch.Tensor:
        c = self.contra
        valid = terms["valid"]
        zero = rep.sum() * 0
        if len(valid) <= 1:  # a batch with one class has nothing to contrast
            return zero
        queries, negatives, temp = int(c.num_queries), int(c.num_negatives), float(c.temperature)
        total = zero
        for i, cls in enumerate(valid):
            # Reference: anchors and prototype of class index i, queue of valid[i] (issue #111).
            own = i if self.flags["class_index"] == "reference" else cls
            anchors, proto, queue = terms["anchors"][own], terms["protos"][own], self.queues.queues[cls]
            if len(anchors) == 0 or proto is None or len(queue) == 0:
                continue
            anchor = anchors[torch.randint(len(anchors), (queries,))]
            with torch.no_grad():
                neg = queue[torch.randint(len(queue), (queries * negatives,))].to(rep.device, rep.dtype)
                keys = torch.cat([proto.expand(queries, 1, -1), neg.view(queries, negatives, -1)], dim=1)
            logits = F.cosine_similarity(anchor.unsqueeze(1), keys, dim=2) / temp
            total = total + F.cross_entropy(logits.float(), torch.zeros(queries, dtype=torch.long,
                                                                        device=rep.device))
        return total / len(valid)

    def eval_model(self, model):
        return self.teacher, "teacher"

    def describe(self) -> dict:
        return {"method": self.name, "behaviour": self.cfg.method.behaviour, "flags": self.flags,
                "grouping": self.loss.grouping(), "hl_variant": self.loss.variant(),
                "iters_per_epoch": self.iters_per_epoch}

    def tags(self) -> list[str]:
        return [f"hl_variant:{self.loss.variant()}", f"u2pl:{self.cfg.method.behaviour}"]

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "queues": self.queues.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.queues.load_state_dict(state["queues"])

    def rank_state_dict(self) -> dict:
        # Without SyncBN each process's teacher keeps the statistics of its own train-mode forwards.
        return {"teacher_buffers": {name: b.detach().cpu().clone() for name, b in self.teacher.named_buffers()}}

    @torch.no_grad()
    def load_rank_state_dict(self, state: dict) -> None:
        for name, b in self.teacher.named_buffers():
            b.copy_(state["teacher_buffers"][name])


__all__ = ["U2PL", "MemoryQueues", "contrastive_labels", "cutmix_masks", "cutmix_with_next", "drop_percentile",
           "entropy_of", "iters_per_epoch", "percentile", "resolve_flags", "scale_gradient", "unsup_loss"]
