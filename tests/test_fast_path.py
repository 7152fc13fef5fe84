"""The bf16 fast path computes the HL losses of the fp32 step within bf16 tolerance, with the HL normaliser and
the losses in fp32 (CPU bf16 autocast stands in for CUDA's here)."""
import pytest
import torch
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.engine.distributed import plan_batches
from hlbench.hardness import hardness_weights
from hlbench.methods import build_method
from hlbench.models import build_model
from hlbench.models.heads import resize
from hlbench.suites import run_overrides
from hlbench.tracking.run_folder import flatten
from tests.conftest import SMOKE_HL


def _step(hydra_overrides, bf16):
    cfg = compose([*SMOKE_HL, "logger=none", *hydra_overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=12, hl=cfg.hl).train()
    method = build_method(cfg)
    method.setup(model, plan_batches({"labeled": (4, "train.batch_size")}, 1, 4))
    g = torch.Generator().manual_seed(1)
    img = torch.randn(4, 3, 64, 64, generator=g)
    label = torch.randint(0, 12, (4, 64, 64), generator=g)
    label[:, :8] = 255
    torch.manual_seed(2)  # the same dropout masks in both precisions
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(img)
        terms = method.loss(out, label, model.align_corners)
        loss = terms.seg + terms.hl + terms.aux
        logs = {**terms.logs, "loss": loss}
        weights = hardness_weights(resize(out["hl"], (64, 64), False), scope="batch")
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.hl_head.parameters()])
    return out, loss, logs, weights, grads


@pytest.mark.parametrize("overrides", [[], ["loss.name=ohem", "loss.ohem_min_kept=500"]])
def test_bf16_hl_losses_match_fp32(hydra_ctx, overrides):
    out32, loss32, logs32, w32, g32 = _step(overrides, bf16=False)
    out16, loss16, logs16, w16, g16 = _step(overrides, bf16=True)
    assert out16["out"].dtype == torch.bfloat16 and out16["hl"].dtype == torch.bfloat16  # autocast did act
    # The normaliser sums every pixel of the batch and the losses reduce over them: both stay fp32.
    assert w16.dtype == torch.float32 and loss16.dtype == torch.float32
    assert w16.sum().item() == pytest.approx(1.0, abs=1e-5)
    for key in ("decode.loss_ce", "weight_loss", "aux.loss_ce", "loss"):
        assert logs16[key].dtype == torch.float32
        torch.testing.assert_close(logs16[key], logs32[key], rtol=1e-2, atol=1e-4, msg=key)
    torch.testing.assert_close(w16, w32, rtol=1e-2, atol=1e-9)
    # The HL branch learns the same direction (bf16 rounds each gradient entry, not the update's sense).
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99



@pytest.mark.parametrize("experiment", ["fullsup/pspnet_r101+hl", "semisup/unimatch_1_8+hl",
                                        "dg/deeplabv3plus_r101+hl"])
def test_speed_profile_changes_only_the_speed_switches(hydra_ctx, experiment):
    plain, fast = (flatten(OmegaConf.to_container(compose([*run_overrides(experiment), *extra]),
                                                  resolve=True))
                   for extra in ([], ["profile=fast"]))
    changed = {key for key in plain.keys() | fast.keys() if plain.get(key) != fast.get(key)}
    assert "train.precision" in changed and fast["train.precision"] == "bf16"
    assert changed <= {"train.precision", "train.channels_last", "train.cudnn_benchmark", "train.compile",
                       "train.num_workers"}
