"""Confusion-matrix metrics (mmseg eval_metrics semantics) and AUROC."""
import math

import pytest
import torch

from hlbench.errors import ConfigError
from hlbench.losses import pixel_cross_entropy, reduce_pixel_loss
from hlbench.metrics import ConfusionMatrix, binary_auroc


def test_iou_by_hand():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, label)
    m = cm.compute(["a", "b", "c", "d"])
    # class a: inter 1, gt 2, pred 2 -> 1/3; b: inter 2, gt 2, pred 3 -> 2/3; c: inter 1, gt 2, pred 1 -> 1/2
    assert m["IoU.a"] == pytest.approx(1 / 3) and m["IoU.b"] == pytest.approx(2 / 3)
    assert m["IoU.c"] == pytest.approx(1 / 2) and math.isnan(m["IoU.d"])
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["aAcc"] == pytest.approx(4 / 6)
    assert m["mAcc"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_accumulates_over_updates():
    torch.manual_seed(0)
    pred, label = torch.randint(0, 3, (4, 8, 8)), torch.randint(0, 3, (4, 8, 8))
    once, split = ConfusionMatrix(3), ConfusionMatrix(3)
    once.update(pred, label)
    for i in range(4):
        split.update(pred[i], label[i])
    assert torch.equal(once.mat, split.mat)


def test_unmapped_labels_rejected_when_the_metrics_are_read():
    cm = ConfusionMatrix(19)
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[26, 0], [0, 255]]))  # no host sync here
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[1, 0], [20, 255]]))
    with pytest.raises(ConfigError, match="label value 26 .* at 2 pixel"):
        cm.compute()
    assert cm.mat.sum() == 4  # the out-of-range pixels are left out of the matrix, ignored ones too


def test_matrix_equals_bincount_of_valid_pixels():
    torch.manual_seed(1)
    pred, label = torch.randint(0, 5, (3, 9, 7)), torch.randint(0, 5, (3, 9, 7))
    label[0, :2] = 255
    cm = ConfusionMatrix(5)
    cm.update(pred, label)
    valid = label != 255
    expected = torch.bincount(label[valid] * 5 + pred[valid], minlength=25).view(5, 5)
    assert torch.equal(cm.mat, expected)


def test_auroc_known_values():
    assert binary_auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert binary_auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert binary_auroc(torch.ones(10), torch.arange(10) % 2) == 0.5
    # one discordant pair out of 2x2
    assert binary_auroc(torch.tensor([0.1, 0.6, 0.5, 0.9]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert math.isnan(binary_auroc(torch.rand(5), torch.zeros(5)))


def test_ce_denominators():
    logits = torch.randn(1, 3, 2, 2)
    label = torch.tensor([[[0, 1], [255, 2]]])
    pix = pixel_cross_entropy(logits, label)
    assert pix[0, 1, 0] == 0
    assert torch.allclose(reduce_pixel_loss(pix, label, denominator="all_pixels"), pix.sum() / 4)
    assert torch.allclose(reduce_pixel_loss(pix, label, denominator="valid_pixels"), pix.sum() / 3)
    with pytest.raises(ConfigError, match="ce_denominator"):
        reduce_pixel_loss(pix, label, denominator="some")
