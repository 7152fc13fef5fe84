"""The training-memory estimate: saved tensors counted once per storage, the same on `meta` as on real tensors."""
import pytest
import torch
from hydra import compose

from hlbench.memory import estimate_train_memory, saved_activation_bytes
from hlbench.methods import LabelledLoss
from hlbench.models import build_model


def test_a_tensor_saved_twice_is_counted_once():
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(5, 5, requires_grad=True)

    def fn():
        y = x * 2             # multiplying by a number saves nothing
        y.sin() + y.cos()     # both save y
        y @ w                 # saves y again, and w
    assert saved_activation_bytes(fn, exclude=[w]) == 3 * 5 * 4
    assert saved_activation_bytes(fn) == 3 * 5 * 4 + 5 * 5 * 4


def _cfg(*overrides):
    return compose("config", overrides=["experiment=smoke/hl", "logger=none", *overrides])


def test_meta_estimate_equals_the_count_on_real_tensors(hydra_ctx):
    cfg = _cfg()
    estimate = estimate_train_memory(cfg, 12, 2, (64, 64))
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=12, hl=True).train()
    params = list(model.parameters())
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, 12, (2, 64, 64))
    loss = LabelledLoss(cfg, 2)
    assert estimate.activations == saved_activation_bytes(lambda: loss(model(img), label, model.align_corners),
                                                          exclude=params)
    n = sum(p.numel() for p in params)
    assert estimate.weights == n * 4 * 3  # fp32 weights, gradients and SGD momentum
    assert "GiB" in estimate.describe() and not estimate.exceeds(torch.device("cpu"))


def test_estimate_grows_with_images_and_halves_in_bf16(hydra_ctx):
    one = estimate_train_memory(_cfg(), 12, 2, (64, 64)).activations
    two = estimate_train_memory(_cfg(), 12, 4, (64, 64)).activations
    half = estimate_train_memory(_cfg("train.precision=bf16"), 12, 2, (64, 64)).activations
    assert two == pytest.approx(2 * one, rel=0.02)  # pooled 1x1 maps do not scale, everything else does
    # bf16 halves the model's activations; the losses, at label size, stay fp32 (a large share at this toy size).
    assert 0.5 * one < half < 0.7 * one
