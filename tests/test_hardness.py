"""HL maths: normalisation, loss values and gradient routing (the authors' hl_encoder_decoder.py)."""
import pytest
import torch
import torch.nn as nn

from hlbench.errors import ConfigError
from hlbench.hardness import hardness_loss, hardness_map, hardness_weights


def _pixel_loss(n=2, h=5, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(n, h, w, generator=g) * 3
    loss[0, 0, :3] = 0.0  # ignored pixels have zero CE
    return loss


@pytest.mark.parametrize("scope", ["batch", "image", "group"])
def test_uniform_weights_give_mean_ce(scope):
    loss = _pixel_loss(n=4)
    seg, hl, w = hardness_loss(loss, torch.zeros(4, 1, 5, 7), scope=scope)
    assert torch.allclose(seg, loss.mean(), atol=1e-6)
    assert torch.allclose(hl, -0.01 * loss.mean(), atol=1e-8)


def test_uniform_weights_with_mask_give_valid_pixel_mean():
    loss = _pixel_loss()
    valid = loss > 0
    seg, _, w = hardness_loss(loss, torch.zeros(2, 5, 7), valid_mask=valid)
    assert torch.allclose(seg, loss[valid].mean(), atol=1e-6)
    assert (w[~valid] == 0).all()


@pytest.mark.parametrize("scope,parts", [("batch", [slice(0, 4)]), ("image", [slice(i, i + 1) for i in range(4)]),
                                          ("group", [slice(0, 2), slice(2, 4)])])
def test_weights_sum_to_one_per_scope(scope, parts):
    d = torch.randn(4, 1, 6, 6) * 3
    w = hardness_weights(d, scope=scope, group_size=2)
    for p in parts:
        assert torch.allclose(w[p].sum(), torch.tensor(1.0), atol=1e-6)


def test_offset_bounds_weight_ratio():
    d = torch.tensor([[[-50.0, 50.0]]])
    w = hardness_weights(d, offset=0.1)
    assert torch.allclose(w.max() / w.min(), torch.tensor(11.0), rtol=1e-4)


def test_hl_gradient_equals_closed_form():
    """dL_h/dh_k = -lam (l_k - Lbar) / S with Lbar = sum_i H_i l_i."""
    lam, c = 0.01, 0.1
    loss = _pixel_loss()
    d = torch.randn(2, 5, 7)
    h = (torch.sigmoid(d) + c).requires_grad_(True)
    # Feed h through the public function by inverting the offset+sigmoid: D = logit(h - c).
    _, hl, w = hardness_loss(loss, torch.logit(h - c), lam=lam, offset=c)
    hl.backward()
    s = h.detach().sum()
    lbar = (w.detach() * loss).sum()
    assert torch.allclose(h.grad, -lam * (loss - lbar) / s, atol=1e-6)


def test_gradient_routing():
    """seg_loss trains the segmentation path only; hl_loss the HL branch only."""
    torch.manual_seed(0)
    backbone, decode, hl_head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 3, 1), nn.Conv2d(4, 1, 1)
    x, y = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 6, 6))
    feats = backbone(x)
    ce = nn.functional.cross_entropy(decode(feats), y, reduction="none")
    seg, hl, _ = hardness_loss(ce, hl_head(feats.detach()))

    grads = torch.autograd.grad(hl, [backbone.weight, decode.weight, hl_head.weight], allow_unused=True)
    assert grads[0] is None and grads[1] is None
    assert grads[2].abs().sum() > 0
    grads = torch.autograd.grad(seg, [backbone.weight, decode.weight, hl_head.weight], allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert grads[2] is None


def test_hl_descent_raises_weight_of_hard_pixels():
    loss = torch.tensor([[[0.1, 0.1, 5.0, 0.1]]])
    d = torch.zeros(1, 1, 4, requires_grad=True)
    opt = torch.optim.SGD([d], lr=100.0)
    for _ in range(20):
        opt.zero_grad()
        hardness_loss(loss, d)[1].backward()
        opt.step()
    w = hardness_weights(d.detach())
    assert w[0, 0, 2] == w.max() and w[0, 0, 2] > 0.25


def test_image_sum_reduction_is_n_times_mean():
    loss = _pixel_loss(n=3)
    d = torch.randn(3, 5, 7)
    mean_seg = hardness_loss(loss, d, scope="image")[0]
    sum_seg = hardness_loss(loss, d, scope="image", image_reduce="sum")[0]
    assert torch.allclose(sum_seg, 3 * mean_seg)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ConfigError, match="scope"):
        hardness_weights(torch.zeros(1, 2, 2), scope="pixel")
    with pytest.raises(ConfigError, match="group_size"):
        hardness_weights(torch.zeros(3, 2, 2), scope="group", group_size=2)
    with pytest.raises(ValueError, match="pixel_loss"):
        hardness_loss(torch.zeros(1, 2, 2), torch.zeros(1, 1, 3, 3))


def test_hardness_map_range():
    m = hardness_map(torch.tensor([[[[-100.0, 0.0, 100.0]]]]))
    assert torch.allclose(m, torch.tensor([[[0.1, 0.6, 1.1]]]))
