"""Engine pieces: global-batch plan, lr schedule, resumable sampler, checkpoints, run-folder naming."""

import pytest
import torch
from omegaconf import OmegaConf

from hlbench.data.sampling import InfiniteShardedSampler
from hlbench.engine.checkpoint import atomic_save, latest_checkpoint
from hlbench.engine.distributed import plan_batches
from hlbench.engine.optim import build_optimizer, lr_at, set_lr
from hlbench.errors import ConfigError
from hlbench.methods import Method
from hlbench.run import run_dir_for


@pytest.mark.parametrize("global_batch,world,max_dev,expected", [
    (8, 1, 8, (8, 1)), (8, 4, 8, (2, 1)), (8, 1, 2, (2, 4)), (8, 2, 3, (2, 2)), (16, 1, 5, (4, 4))])
def test_plan_batch_keeps_global_batch(global_batch, world, max_dev, expected):
    plan = plan_batches({"labeled": (global_batch, "train.batch_size")}, world, max_dev)
    per_dev, accum = plan.per_device["labeled"], plan.accum
    assert (per_dev, accum) == expected and per_dev * accum * world == global_batch


def test_plan_batch_rejects_indivisible():
    with pytest.raises(ConfigError, match="train.batch_size=8"):
        plan_batches({"labeled": (8, "train.batch_size")}, 3, 8)


def test_streams_share_one_accumulation_count():
    plan = plan_batches({"labeled": (8, "a"), "unlabeled": (16, "b")}, 2, 4)
    assert plan.accum == 2 and plan.per_device == {"labeled": 2, "unlabeled": 4}
    with pytest.raises(ConfigError, match="accumulation"):
        plan_batches({"labeled": (3, "a"), "unlabeled": (4, "b")}, 1, 2)


def test_poly_schedule_matches_mmseg_formula():
    cfg = OmegaConf.create({"lr": 0.01, "min_lr": 1e-4, "power": 0.9, "warmup_iters": 0, "warmup_ratio": 1e-6})
    assert lr_at(0, 40000, cfg) == pytest.approx(0.01)
    assert lr_at(20000, 40000, cfg) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    assert lr_at(39999, 40000, cfg) == pytest.approx(1e-4, rel=1e-2)


def test_linear_warmup_then_poly():
    cfg = OmegaConf.create({"lr": 6e-5, "min_lr": 0.0, "power": 1.0, "warmup_iters": 1500, "warmup_ratio": 1e-6})
    assert lr_at(0, 40000, cfg) == pytest.approx(6e-5 * 1e-6)
    assert lr_at(750, 40000, cfg) == pytest.approx(6e-5 * (1 - 750 / 40000) * (1 - 0.5 * (1 - 1e-6)))
    assert lr_at(1500, 40000, cfg) == pytest.approx(6e-5 * (1 - 1500 / 40000))


def test_method_param_groups_carry_lr_multipliers():
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "decode_head": torch.nn.Linear(2, 2),
                                 "hl_head": torch.nn.Linear(2, 1)})
    cfg = OmegaConf.create({"hl": {"enabled": True, "lr_mult": 10.0, "semisup": {"apply_to": ["sup"]}},
                            "method": {"lr_mult": {"decode_head.": 2.0}}})
    groups = Method(cfg).param_groups(model)
    assert [g["lr_mult"] for g in groups] == [1.0, 2.0, 10.0]
    assert groups[2]["params"] == [model["hl_head"].weight, model["hl_head"].bias]
    opt = build_optimizer(groups, OmegaConf.create({"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}))
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.02, 0.1])


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_sampler_resumes_mid_stream_and_shards_disjointly():
    full = _take(iter(InfiniteShardedSampler(10, seed=3, rank=0, world=1)), 25)
    resumed = _take(iter(InfiniteShardedSampler(10, seed=3, rank=0, world=1, start=13)), 12)
    assert resumed == full[13:]
    assert sorted(i for i, _ in full[:10]) == list(range(10))  # each epoch is a permutation
    r0 = [i for i, _ in _take(iter(InfiniteShardedSampler(10, seed=3, rank=0, world=2)), 5)]
    r1 = [i for i, _ in _take(iter(InfiniteShardedSampler(10, seed=3, rank=1, world=2)), 5)]
    assert sorted(r0 + r1) == list(range(10))
    assert len({s for _, s in full}) == len(full)  # distinct augmentation seeds


def test_atomic_checkpoints_and_latest(tmp_path):
    for it in (5, 40, 100):
        atomic_save({"model": {"w": torch.tensor(it)}, "iter": it}, tmp_path / f"iter_{it:06d}.pth")
    assert latest_checkpoint(tmp_path).name == "iter_000100.pth"
    assert not list(tmp_path.glob("*.tmp"))
    assert latest_checkpoint(tmp_path / "none") is None


def test_run_dir_naming_and_versions(tmp_path):
    cfg = OmegaConf.create({"out_dir": str(tmp_path), "resume": False})
    first = run_dir_for(cfg, "fullsup/pspnet_r101+hl", "fullsup", None, 0)
    assert first == tmp_path / "fullsup" / "fullsup-pspnet_r101+hl" / "seed0"
    first.mkdir(parents=True)
    second = run_dir_for(cfg, "fullsup/pspnet_r101+hl", "fullsup", None, 0)
    assert second.name == "seed0-2"
    second.mkdir()
    assert run_dir_for(cfg, "fullsup/pspnet_r101+hl", "fullsup", None, 0).name == "seed0-3"
    cfg.resume = True
    assert run_dir_for(cfg, "fullsup/pspnet_r101+hl", "fullsup", None, 0) == second
    assert run_dir_for(cfg, "x", None, "smoke", 1) == tmp_path / "runs" / "x-smoke" / "seed1"
