"""Distributed evaluation: 2 gloo processes, each scoring its uneven shard of the val set (3 + 2 images), give exactly
the single-process confusion matrix, metrics and HL-map AUROC."""
import pytest
import torch

from hydra import initialize_config_module
from omegaconf import OmegaConf

from hlbench.compose import compose
from hlbench.data import build_datasets
from hlbench.engine.evaluator import evaluate
from hlbench.models import build_model
from tests.conftest import free_port, gloo_group, launch_gloo

WORLD = 2
VAL_IMAGES = 5  # rank 0 scores images 0, 2, 4 and rank 1 images 1, 3
# Slide windows smaller than the 64 x 64 images, so several windows per image run batched.
OVERRIDES = ["logger=none", "data.val.num_images=5", "data.val.size=[64,64]", "data.train.num_images=2",
             "eval.mode=slide", "eval.crop=[48,48]", "eval.stride=[32,32]", "eval.window_batch=3",
             "eval.batch_size=2", "eval.num_hl_maps=0"]


def _config():
    with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
        return OmegaConf.to_container(compose(OVERRIDES), resolve=True)


def _evaluate(plain: dict) -> dict:
    cfg = OmegaConf.create(plain)
    val = build_datasets(cfg.data, seed=0)["val"]
    torch.manual_seed(0)  # the same weights in every process
    model = build_model(cfg.model, num_classes=len(val.classes), hl={"enabled": True})
    result = evaluate(model, val, cfg.eval, cfg.data, torch.device("cpu"), list(val.classes))
    return {"confusion": result["confusion"], "metrics": result["metrics"], "hl_auroc_kinds": result["hl_auroc_kinds"]}


def _worker(rank, port, plain, out_file):
    with gloo_group(rank, WORLD, port):
        result = _evaluate(plain)
        if rank == 0:
            torch.save(result, out_file)


@pytest.mark.slow
def test_two_gloo_processes_with_an_uneven_split_give_the_single_process_result(tmp_path):
    plain = _config()
    assert plain["data"]["val"]["num_images"] % WORLD  # the split is uneven
    single = _evaluate(plain)
    out_file = tmp_path / "rank0.pt"
    launch_gloo(_worker, WORLD, (free_port(), plain, str(out_file)), [evaluate.__module__])
    shared = torch.load(out_file)
    assert single["confusion"].sum() > 0 and torch.equal(shared["confusion"], single["confusion"])
    assert shared["metrics"] == pytest.approx(single["metrics"], rel=0, abs=0, nan_ok=True)
    assert single["hl_auroc_kinds"]["hl_auroc"] is not None
    # HL scores are fp32 convolutions over differently composed batches: equal up to rounding, not bit for bit.
    assert shared["hl_auroc_kinds"] == pytest.approx(single["hl_auroc_kinds"], abs=1e-6)
