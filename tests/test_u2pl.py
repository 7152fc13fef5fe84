"""U2PL's pieces that are easy to get wrong: CutMix, the entropy-percentile schedule, the EMA and the teacher's BN
buffers, the memory queues and the class-index handling of both behaviours."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hlbench.methods.strong_aug import half_area_box
from hlbench.methods.u2pl import (U2PL, MemoryQueues, cutmix_with_next, drop_percentile, entropy_of, iters_per_epoch,
                                  percentile, resolve_flags, unsup_loss)


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
    with pytest.raises(ValueError, match="method.flags.negatives"):
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
    m = _bare_u2pl()
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
def test_a_stopped_and_resumed_u2pl_run_equals_an_uninterrupted_one(hydra_ctx, tmp_path):
    from hlbench.run import run_experiment
    from tests.conftest import TINY, compose_run

    over = TINY + ["experiment=semisup/u2pl_hl_1_16", "train.iters=4", "train.ckpt_interval=2",
                   "method.contrastive.num_queries=16", "method.contrastive.queue_size=64",
                   "method.contrastive.queue_size_class0=64"]
    full = run_experiment(compose_run(over, tmp_path / "a")[0], "semisup/u2pl_hl_1_16", None, "smoke")
    run_experiment(compose_run(over, tmp_path / "b")[0], "semisup/u2pl_hl_1_16", None, "smoke",
                   hooks={"stop_after": 2})
    resumed = run_experiment(compose_run(over + ["resume=true"], tmp_path / "b")[0], "semisup/u2pl_hl_1_16", None,
                             "smoke")
    a = torch.load(f"{full['run_dir']}/checkpoints/iter_000004.pth", weights_only=False)
    b = torch.load(f"{resumed['run_dir']}/checkpoints/iter_000004.pth", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    teacher_a, teacher_b = a["method"]["teacher"], b["method"]["teacher"]
    assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)
    queues_a, queues_b = a["method"]["queues"]["queues"], b["method"]["queues"]["queues"]
    assert any(len(q) for q in queues_a) and all(torch.equal(x, y) for x, y in zip(queues_a, queues_b))
    assert resumed["final"]["IoU"] == full["final"]["IoU"] and resumed["final"]["protocol"]["model"] == "teacher"
