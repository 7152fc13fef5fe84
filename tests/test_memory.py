"""The training-memory estimate: saved tensors counted once per storage, the same on `meta` as on real tensors."""
import pytest
import torch

from hlbench.compose import compose
from hlbench.engine import trainer
from hlbench.errors import ConfigError
from hlbench.memory import GiB, MemoryEstimate, _cgroup_memory_left, estimate_train_memory, saved_activation_bytes
from hlbench.methods import LabelledLoss
from hlbench.models import build_model
from hlbench.run import run_experiment
from tests.conftest import compose_run, SMOKE_HL, SMOKE_HL_RUN, TINY


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
    return compose([*SMOKE_HL, "logger=none", *overrides])


def test_meta_estimate_equals_the_count_on_real_tensors(hydra_ctx):
    cfg = _cfg()
    estimate = estimate_train_memory(cfg, 12, 2, (64, 64))
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=12, hl=cfg.hl).train()
    params = list(model.parameters())
    img, label = torch.randn(2, 3, 64, 64), torch.randint(0, 12, (2, 64, 64))
    loss = LabelledLoss(cfg, 2)
    assert estimate.activations == saved_activation_bytes(lambda: loss(model(img), label, model.align_corners),
                                                          exclude=params)
    n = sum(p.numel() for p in params)
    assert estimate.weights == n * 4 * 3  # fp32 weights, gradients and SGD momentum
    assert "GiB" in estimate.describe()


def test_estimate_grows_with_images_and_halves_in_bf16(hydra_ctx):
    one = estimate_train_memory(_cfg(), 12, 2, (64, 64)).activations
    two = estimate_train_memory(_cfg(), 12, 4, (64, 64)).activations
    half = estimate_train_memory(_cfg("train.precision=bf16"), 12, 2, (64, 64)).activations
    assert two == pytest.approx(2 * one, rel=0.02)  # pooled 1x1 maps do not scale, everything else does
    # bf16 halves the model's activations; the losses, at label size, stay fp32 (a large share at this toy size).
    assert 0.5 * one < half < 0.7 * one


def test_what_fits_scales_the_batch_and_the_crop_to_the_memory_left_after_the_weights():
    estimate = MemoryEstimate(activations=8 * GiB, weights=1 * GiB, images=4, crop=(512, 512), precision="fp32")
    # 5.5 GiB available: 4.5 GiB for activations, 9/16 of those needed -> 2 of 4 images, or a crop 3/4 as wide
    advice = estimate.what_fits(5.5 * GiB, per_device=4)
    assert "train.max_batch_per_device=2 " in advice and "data.train_pipeline.crop=[384,384]" in advice
    assert "max_batch_per_device" not in estimate.what_fits(1.5 * GiB, per_device=4)  # 1/16: not one image
    assert "weights" in estimate.what_fits(0.5 * GiB, per_device=4)


def test_cgroup_memory_left_is_its_limit_less_its_usage(tmp_path):
    (tmp_path / "memory.max").write_text(f"{24 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{4 * GiB}\n")
    assert _cgroup_memory_left(tmp_path) == 20 * GiB
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_memory_left(tmp_path) is None


@pytest.mark.slow
def test_a_run_that_would_not_fit_stops_at_start_naming_what_fits_and_leaves_no_folder(hydra_ctx, tmp_path,
                                                                                       monkeypatch, caplog):
    cfg = compose_run(TINY + [*SMOKE_HL, "train.iters=2"], tmp_path)[0]
    assert cfg.train.batch_size == 4 and list(cfg.data.train_pipeline.crop) == [64, 64]
    need = estimate_train_memory(cfg, 12, 4, (64, 64))
    # Room for a third of the activations: 1 image of 4 (4/3 rounded down), or a crop sqrt(1/3) as wide (36.9 -> 32)
    monkeypatch.setattr(trainer, "available_memory", lambda device: need.weights + need.activations / 3)
    with pytest.raises(ConfigError, match=r"does not fit; it would fit with train\.max_batch_per_device=1 .* or "
                                          r"data\.train_pipeline\.crop=\[32,32\] \(train\.memory_check=false"):
        run_experiment(cfg, SMOKE_HL_RUN, None, "smoke")
    assert not (tmp_path / "runs").exists()  # a failed start leaves no half-made run folder
    cfg = compose_run(TINY + [*SMOKE_HL, "train.iters=2", "train.memory_check=false"], tmp_path)[0]
    summary = run_experiment(cfg, SMOKE_HL_RUN, None, "smoke")
    assert summary["run_dir"].endswith("seed0")  # the same name again: no seed0-2
    assert "training anyway (train.memory_check=false)" in caplog.text
