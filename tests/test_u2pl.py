"""U2PL's pieces that are easy to get wrong: CutMix, the entropy-percentile schedule, the EMA and the teacher's BN
buffers, the memory queues, the class-index handling of both behaviours, the reference's contrastive label maps,
its teacher in the first epoch and in supervised-only epochs, and where HL enters its losses.

Two-process behaviour (the contrastive gradient, supervised-only epochs under DDP, per-rank resume) is in
test_ddp_runs.py."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.errors import ConfigError
from hlbench.methods.labelled_loss import LabelledLoss, LabelledTerms
from hlbench.methods.strong_aug import half_area_box
from hlbench.methods.u2pl import (U2PL, MemoryQueues, contrastive_labels, cutmix_masks, cutmix_with_next,
                                  drop_percentile, entropy_of, iters_per_epoch, percentile, resolve_flags, unsup_loss)


def test_half_area_box_covers_half_the_image():
    torch.manual_seed(0)
    for _ in range(20):
        box = half_area_box(33, 48)
        assert abs(box.sum().item() - 33 * 48 / 2) <= 48  # h is rounded: within one row
        ys, xs = box.nonzero(as_tuple=True)
        width = xs.max() - xs.min() + 1
        assert 48 // 2 + 1 <= width < 48 and box[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()


def test_cutmix_pastes_the_next_image_of_the_same_reference_gpu_batch():
    img = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    label = torch.arange(4).view(4, 1, 1).expand(4, 2, 2)
    masks = torch.zeros(4, 2, 2, dtype=torch.bool)
    masks[:, 0, 0] = True
    mixed_img, mixed_label = cutmix_with_next(masks, img, label, group=2)
    # Inside the box, image i shows image i+1 of its pair (0<->1, 2<->3); outside it stays itself.
    assert mixed_img[:, 0, 0, 0].tolist() == [1, 0, 3, 2] and mixed_label[:, 0, 0].tolist() == [1, 0, 3, 2]
    assert mixed_img[:, 0, 1, 1].tolist() == [0, 1, 2, 3] and mixed_label[:, 1, 1].tolist() == [0, 1, 2, 3]


def test_percentile_is_numpys_linear_percentile():
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0, 12.5, 80, 97.3, 100):
        assert percentile(values, q).item() == pytest.approx(float(np.percentile(values.numpy(), q)), rel=1e-6)


def test_unsup_loss_drops_the_high_entropy_pixels_and_rescales():
    torch.manual_seed(0)
    pred = torch.randn(2, 3, 10, 10)
    target = torch.randint(0, 3, (2, 10, 10))
    entropy = torch.rand(2, 10, 10)
    loss = unsup_loss(pred, target, entropy, drop_percent=80)
    kept = entropy < percentile(entropy.flatten(), 80)
    ce = torch.nn.functional.cross_entropy(pred, target, reduction="none")
    assert kept.sum() == 160  # 20 % of 200 pixels dropped
    assert loss.item() == pytest.approx((200 / 160) * ce[kept].mean().item(), rel=1e-5)
    # A uniform H gives the same loss (the HL invariant of hl.semisup.apply_to=[u2pl.unsup]).
    hl = unsup_loss(pred, target, entropy, drop_percent=80, hl_logits=torch.zeros(2, 10, 10))
    assert hl.item() == pytest.approx(loss.item(), rel=1e-5)


def test_drop_schedule_follows_the_epoch():
    # 20 (1 - t/T) % of the pixels are dropped: 20 % at t = 0, 10 % half-way, none at the end.
    assert [drop_percentile(80, t / 200) for t in (0, 100, 200)] == [80, 90, 100]


@pytest.mark.parametrize("total, epochs", [(300, 30), (40, 30), (301, 30), (7, 30)])
def test_every_iteration_falls_inside_the_epoch_schedule(total, epochs):
    # An uneven run (40 iterations over 30 epochs) once put its last iterations in epoch 39: t/T > 1 and a
    # dropping percentile above 100 that torch.quantile refused.
    m = U2PL.__new__(U2PL)
    m.iters_per_epoch = ipe = iters_per_epoch(total, epochs)
    last_epoch = m.epoch_of(total - 1)  # the trainer's last 0-based iteration
    assert last_epoch < epochs
    assert 0 <= drop_percentile(80, last_epoch / epochs) <= 100
    if total % epochs == 0:
        assert ipe == total // epochs  # even runs keep the reference's epoch length


def test_entropy_of_uniform_and_one_hot():
    uniform = torch.full((1, 4, 1, 1), 0.25)
    one_hot = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1)
    assert entropy_of(uniform).item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-5)
    assert entropy_of(one_hot).item() == pytest.approx(0, abs=1e-6)


def test_queues_keep_the_newest_entries_per_class():
    q = MemoryQueues([3, 2], dim=1)
    q.push(0, torch.tensor([[1.0], [2.0]]))
    q.push(0, torch.tensor([[3.0], [4.0]]))
    q.push(1, torch.tensor([[5.0]]))
    assert q.queues[0].flatten().tolist() == [2, 3, 4] and q.queues[1].flatten().tolist() == [5]
    restored = MemoryQueues([3, 2], dim=1)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored.queues[0], q.queues[0])


def _method_cfg(**flags):
    return OmegaConf.create({"behaviour": "reference", "flags": flags})


def test_behaviour_sets_flags_and_each_flag_overrides():
    assert resolve_flags(_method_cfg())["class_index"] == "reference"
    assert resolve_flags(_method_cfg())["contra_weight"] == 1.0
    paper = resolve_flags(OmegaConf.create({"behaviour": "paper", "flags": {"contra_weight": None}}))
    assert paper["negatives"] == "paper" and paper["contra_weight"] == 0.1
    assert resolve_flags(_method_cfg(contra_weight=0.1))["negatives"] == "reference"
    with pytest.raises(ConfigError, match="method.flags.negatives"):
        resolve_flags(_method_cfg(negatives="sometimes"))


class _Tiny(torch.nn.Module):
    """A conv + BN network standing in for student and teacher."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)
        self.align_corners, self.num_classes = False, 4

    def forward(self, x):
        return {"out": self.bn(self.conv(x))}


def _bare_u2pl(**flags):
    m = U2PL.__new__(U2PL)
    m.flags = resolve_flags(_method_cfg(**flags))
    m.ema_decay, m.sup_only_epoch, m.iters_per_epoch = 0.99, 0, 10
    return m


def test_ema_decay_schedule_and_teacher_bn_buffers_stay_its_own():
    m = _bare_u2pl(teacher_epoch0="ema")  # the EMA from iteration 0
    student, m.teacher = _Tiny(), _Tiny()
    student.bn.running_mean.fill_(5.0)
    m.after_step(student, 1)  # i = 0: d = 0, the teacher takes the student's parameters
    assert torch.equal(m.teacher.conv.weight, student.conv.weight)
    assert m.teacher.bn.running_mean.abs().sum() == 0  # buffers are never averaged
    before = m.teacher.conv.weight.clone()
    with torch.no_grad():
        student.conv.weight.add_(1.0)
    m.after_step(student, 3)  # i = 2: d = min(1 - 1/3, 0.99)
    assert torch.allclose(m.teacher.conv.weight, before * (2 / 3) + student.conv.weight * (1 / 3))
    m.after_step(student, 1000)  # late: d = 0.99
    after = m.teacher.conv.weight.clone()
    m.after_step(student, 1001)
    assert torch.allclose(m.teacher.conv.weight, after * 0.99 + student.conv.weight * 0.01)


def _terms(valid, anchors):
    """Per-class terms for 3 classes: anchors[c] rows, prototypes, the valid classes."""
    return {"valid": valid, "anchors": anchors, "protos": [a.mean(0, keepdim=True) if len(a) else None for a in anchors],
            "negatives": [torch.zeros(0, 2)] * 3}


@pytest.mark.parametrize("behaviour,expected", [
    ("reference", math.log(1 + 2 * math.exp(-2))),  # class i's anchors meet queue valid[i]: orthogonal negatives
    ("paper", math.log(3))])                         # each class with its own queue: negatives equal the anchors
def test_class_index_handling(behaviour, expected):
    m = _bare_u2pl(class_index=behaviour)
    m.contra = OmegaConf.create({"num_queries": 4, "num_negatives": 2, "temperature": 0.5})
    m.queues = MemoryQueues([5, 5, 5], dim=2)
    anchors = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])]
    m.queues.queues = [torch.zeros(0, 2), torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])]
    loss = m._group_loss(_terms([1, 2], anchors), torch.zeros(1, requires_grad=True))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_one_valid_class_gives_no_contrastive_loss():
    m = _bare_u2pl()
    m.contra = OmegaConf.create({"num_queries": 4, "num_negatives": 2, "temperature": 0.5})
    m.queues = MemoryQueues([5, 5, 5], dim=2)
    rep = torch.ones(1, requires_grad=True)
    assert m._group_loss(_terms([1], [torch.ones(1, 2)] * 3), rep).item() == 0


@pytest.mark.slow
def test_a_stopped_and_resumed_u2pl_run_equals_an_uninterrupted_one(hydra_ctx, tmp_path, monkeypatch):
    from hlbench.errors import RunStopped
    from hlbench.run import run_experiment
    from tests.conftest import TINY, compose_run, sigterm_during_step

    over = TINY + ["experiment=semisup/u2pl_1_16", "hl.enabled=true", "train.iters=4", "train.ckpt_interval=2",
                   "method.contrastive.num_queries=16", "method.contrastive.queue_size=64",
                   "method.contrastive.queue_size_class0=64"]
    full = run_experiment(compose_run(over, tmp_path / "a")[0], "semisup/u2pl_1_16+hl", None, "smoke")
    sigterm_during_step(monkeypatch, 2)
    with pytest.raises(RunStopped):
        run_experiment(compose_run(over, tmp_path / "b")[0], "semisup/u2pl_1_16+hl", None, "smoke")
    resumed = run_experiment(compose_run(over + ["resume=true"], tmp_path / "b")[0], "semisup/u2pl_1_16+hl", None,
                             "smoke")
    a = torch.load(f"{full['run_dir']}/checkpoints/iter_000004.pth", weights_only=False)
    b = torch.load(f"{resumed['run_dir']}/checkpoints/iter_000004.pth", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    teacher_a, teacher_b = a["method"]["teacher"], b["method"]["teacher"]
    assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)
    queues_a, queues_b = a["method"]["queues"]["queues"], b["method"]["queues"]["queues"]
    assert any(len(q) for q in queues_a) and all(torch.equal(x, y) for x, y in zip(queues_a, queues_b))
    assert resumed["final"]["IoU"] == full["final"]["IoU"] and resumed["final"]["protocol"]["network"] == "teacher"


# --- the reference's code paths, on hand-made cases ---------------------------------------------------------------

def test_cutmix_is_decided_per_reference_gpu_batch():
    torch.manual_seed(0)
    patterns = set()
    for _ in range(20):
        boxes = cutmix_masks(8, 2, (6, 8), p=0.5)
        mixing = boxes.flatten(1).any(1).view(4, 2)  # 4 reference GPU batches of 2 images
        assert (mixing[:, 0] == mixing[:, 1]).all()  # the images of one GPU batch mix together or not at all
        assert (boxes[mixing.flatten()].flatten(1).sum(1) >= 6 * 8 // 2 - 8).all()  # half-area boxes
        patterns.add(tuple(mixing[:, 0].tolist()))
    # Within one device batch some reference GPUs mix and others do not (a single draw made them all alike).
    assert any(0 < sum(p) < 4 for p in patterns)
    assert not cutmix_masks(4, 2, (6, 8), p=0.0).any() and cutmix_masks(4, 2, (6, 8), p=1.0).flatten(1).any(1).all()


def test_reference_contrastive_labels_give_image_0_the_union_and_the_others_nothing():
    labels = torch.tensor([[[0, 1], [255, 2]],
                           [[1, 1], [2, 255]]])
    ref = contrastive_labels(labels, 3, "reference")
    # Image 0, per pixel: its class and image 1's (image 1's ignored label counts as class 0); none where image 0's
    # own label is ignored.
    assert ref[0].permute(1, 2, 0).tolist() == [[[True, True, False], [False, True, False]],
                                                [[False, False, False], [True, False, True]]]
    assert not ref[1].any()
    own = contrastive_labels(labels, 3, "per_image")
    assert own[1].permute(1, 2, 0).tolist() == [[[False, True, False], [False, True, False]],
                                                [[False, False, True], [False, False, False]]]
    assert own[0, :, 1, 0].sum() == 0 and own[0, :, 0, 0].tolist() == [True, False, False]


def _contra_u2pl(**flags):
    m = _bare_u2pl(**flags)
    m.contra = OmegaConf.create({"low_rank": 1, "high_rank": 3, "current_class_threshold": 0.1,
                                 "current_class_negative_threshold": 1.0})
    return m


def _class_terms(m, mode):
    """Per-class terms of one reference GPU batch (2 labeled + 2 unlabeled 2x2 images) whose features are the
    image's number + 1; every pixel reliable and unreliable; the teacher ranks class 0 first, then 1, then 2."""
    labels_l = torch.tensor([[[0, 1], [1, 2]], [[2, 2], [0, 1]]])
    labels_u = torch.tensor([[[1, 1], [2, 0]], [[0, 2], [2, 1]]])
    onehot = torch.cat([contrastive_labels(labels_l, 3, mode), contrastive_labels(labels_u, 3, mode)])
    rep = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 2, 2, 2)
    prob = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1).expand(4, 3, 2, 2)
    every = torch.ones(4, 2, 2, dtype=torch.bool)
    return m._class_terms(rep, rep, onehot, prob, every, every, nl=2)


def test_reference_contrastive_loss_sees_only_each_gpu_batchs_first_images():
    terms = _class_terms(_contra_u2pl(), "reference")
    # Class 2 (row-major): image 0 holds the union of images 0 and 1 at 3 pixels, image 2 that of images 2 and 3
    # at 2 pixels; images 1 and 3 give no anchor.
    assert terms["anchors"][2][:, 0].tolist() == [1, 1, 1, 3, 3]
    assert terms["protos"][2][0, 0].item() == pytest.approx((3 * 1 + 2 * 3) / 5)
    # Negatives (reference: labelled pixels never qualify): unlabeled image 2's pixels of classes 1 and 2.
    assert all((n[:, 0] == 3).all() for n in terms["negatives"]) and len(terms["negatives"][1]) > 0
    per_image = _class_terms(_contra_u2pl(), "per_image")
    assert per_image["anchors"][2][:, 0].tolist() == [1, 2, 2, 3, 4, 4]
    assert set(torch.cat(per_image["negatives"])[:, 0].tolist()) == {3.0, 4.0}


def test_the_first_epoch_ends_with_teacher_equal_to_student():
    m = _bare_u2pl()  # reference: teacher_epoch0=student
    m.iters_per_epoch = 2
    student, m.teacher = _Tiny(), _Tiny()
    for it in (1, 2):  # epoch 0: after each of the student's steps, the teacher is the student
        with torch.no_grad():
            student.conv.weight.add_(1.0)
        m.after_step(student, it)
        assert torch.equal(m.teacher.conv.weight, student.conv.weight)
    end_of_epoch0 = student.conv.weight.detach().clone()
    with torch.no_grad():
        student.conv.weight.add_(1.0)
    m.after_step(student, 3)  # epoch 1, i = 2: d = 2/3 from teacher = student at the end of epoch 0
    assert torch.allclose(m.teacher.conv.weight, end_of_epoch0 * (2 / 3) + student.conv.weight * (1 / 3))


class _TinyRep(_Tiny):
    """_Tiny with a representation head, as U2PL's model."""

    def __init__(self):
        super().__init__()
        self.rep = torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {**super().forward(x), "rep": self.rep(x)}


def test_supervised_only_epochs_move_the_teachers_bn_and_give_the_rep_head_a_zero_gradient():
    m = _bare_u2pl()
    m.sup_only_epoch, m.iters_per_epoch, m.align_corners = 1, 2, False
    zero = torch.zeros(())
    m.loss = lambda out, y, align_corners: LabelledTerms(seg=out["out"].mean(), aux=zero, hl=zero, logs={})
    student, m.teacher = _TinyRep(), _TinyRep()
    teacher_weights = m.teacher.conv.weight.detach().clone()
    batches = {"labeled": {"img": torch.randn(2, 3, 4, 4) + 3, "label": torch.zeros(2, 4, 4, dtype=torch.long)},
               "unlabeled": {"img": torch.randn(2, 3, 4, 4)}}
    loss, logs = m.step(student, batches, 1)  # iteration 1: epoch 0 < sup_only_epoch
    loss.backward()
    # The teacher ran in train mode on the labeled images: its running mean left 0 (a BN momentum of 0.1).
    assert (m.teacher.bn.running_mean != 0).all()
    # rep took part in the loss with weight 0: a zero gradient (weight decay and momentum apply), not None.
    assert student.rep.weight.grad is not None and not student.rep.weight.grad.any()
    assert logs["unsup.loss_u"] == 0 and logs["contra.loss_c"] == 0
    m.after_step(student, 2)  # no EMA in a supervised-only epoch
    assert torch.equal(m.teacher.conv.weight, teacher_weights)


class _PixelsHL(torch.nn.Module):
    """A segmentor whose logits are its input's 3 channels and whose HL logits are the first channel."""

    align_corners, num_classes = False, 3

    def forward(self, img):
        return {"out": img.clone(), "hl": img[:, :1]}


def _u2pl_step(apply_to):
    cfg = compose([
        "method=u2pl", "loss.name=ce", "hl.enabled=true", f"hl.semisup.apply_to={apply_to}", "train.batch_size=2",
        "train.iters=10", "method.epochs=1", "train.reference.gpus=1", "train.reference.per_gpu=2",
        "method.cutmix_p=0", "method.flags.contra_weight=0"])
    method, model = U2PL(cfg), _PixelsHL()
    method.setup(model, SimpleNamespace(per_device={"labeled": 2, "unlabeled": 2}))
    g = torch.Generator().manual_seed(0)
    x, u = 2 * torch.randn(2, 3, 4, 4, generator=g), 2 * torch.randn(2, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (2, 4, 4), generator=g)
    loss, logs = method.step(model, {"labeled": {"img": x, "label": y}, "unlabeled": {"img": u}}, 0)
    return loss, logs, (cfg, x, y, u)


@pytest.mark.parametrize("apply_to", ["[u2pl.unsup]", "[sup]", "[sup,u2pl.unsup]"])
def test_hl_enters_u2pls_losses_where_apply_to_says(hydra_ctx, apply_to):
    loss, logs, (cfg, x, y, u) = _u2pl_step(apply_to)
    labelled = LabelledLoss(cfg, 2)({"out": x, "hl": x[:, :1]}, y, False)  # the HL-weighted labelled loss
    # L_h always comes from the labelled pixels.
    assert logs["weight_loss"].item() == pytest.approx(labelled.logs["weight_loss"].item(), rel=1e-6)
    decode = labelled.seg if "sup" in apply_to.strip("[]").split(",") else F.cross_entropy(x, y)
    assert logs["decode.loss_ce"].item() == pytest.approx(decode.item(), rel=1e-6)
    entropy = entropy_of(u.softmax(1))  # teacher = the model: the same prediction in both modes
    weighted = "u2pl.unsup" in apply_to
    unsup = unsup_loss(u, u.argmax(1), entropy, 80, u[:, :1] if weighted else None)
    assert logs["unsup.loss_u"].item() == pytest.approx(unsup.item(), rel=1e-6)
    assert (unsup.item() == pytest.approx(unsup_loss(u, u.argmax(1), entropy, 80).item(), rel=1e-4)) != weighted
    assert loss.item() == pytest.approx((decode + logs["weight_loss"] + unsup).item(), rel=1e-6)


def test_apply_to_is_checked_against_the_running_method(hydra_ctx):
    from hlbench.config_checks import check_config

    check_config(compose(["method=u2pl", "hl.semisup.apply_to=[sup,u2pl.unsup]"]))
    with pytest.raises(ConfigError, match=r"hl.semisup.apply_to has \['unimatch.fp'\], which method=u2pl"):
        check_config(compose(["method=u2pl", "hl.semisup.apply_to=[unimatch.fp]"]))
