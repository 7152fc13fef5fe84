"""Real experiments (Cityscapes, GTA5 -> Cityscapes, ADE20K) train and evaluate through the runner on fixtures
generated in the data sets' on-disk layouts; only the model and sizes are shrunk, the data code is the real one."""
import json
from pathlib import Path

import pytest

from hlbench.errors import ConfigError
from hlbench.run import run
from hlbench.suites import run_overrides
from tests.conftest import compose_run
from tests.test_datasets import make_ade, make_cityscapes, make_gta

pytestmark = pytest.mark.slow

SHRINK = ["logger=none", "model.backbone.depth=18", "model.backbone.width_mult=0.25", "model.head.channels=32",
          "train.iters=2", "train.batch_size=2", "train.num_workers=0", "train.log_interval=1",
          "train.eval_interval=0", "train.ckpt_interval=2", "train.hl_map_interval=0", "train.precision=fp32",
          "data.train_pipeline.crop=[32,32]", "data.train_pipeline.resize.scale=[64,32]",
          "data.test_pipeline.resize.scale=[64,32]", "model.backbone.pretrained=none"]


@pytest.mark.parametrize("experiment,extra", [
    ("fullsup/pspnet_r101+hl", ["model.aux.channels=16", "data.protocol.crop=[32,32]", "data.protocol.stride=[24,24]"]),
    ("losses/pspnet_r18_ohem", ["model.aux.channels=16", "data.protocol.crop=[32,32]", "data.protocol.stride=[24,24]"]),
    ("fullsup/ocrnet_r101+hl", []),
])
def test_cityscapes_experiments_train_and_evaluate(hydra_ctx, tmp_path, experiment, extra):
    root = make_cityscapes(tmp_path / "cityscapes")
    cfg, choices, overrides = compose_run([*run_overrides(experiment), f"data.root={root}", *SHRINK, *extra],
                                          tmp_path / "out")
    (summary,) = run(cfg, choices, overrides)
    assert summary["data"].startswith("cityscapes") and summary["iters"] == 2
    assert len(summary["final"]["IoU"]) == 19 and 0 <= summary["final"]["mIoU"] <= 1
    assert summary["paper"]["value"] > 70 and summary["final"]["protocol"]["mode"] == cfg.eval.mode
    assert (Path(summary["run_dir"]) / "checkpoints" / "iter_000002.pth").is_file()


def test_gta_to_cityscapes_experiment(hydra_ctx, tmp_path):
    gta, cs = make_gta(tmp_path / "gta"), make_cityscapes(tmp_path / "cityscapes")
    cfg, choices, overrides = compose_run(["experiment=dg/deeplabv3plus_r101", "hl.enabled=true", f"data.root={gta}",
                                           f"data.cityscapes_root={cs}", "model.aux.channels=16", *SHRINK],
                                          tmp_path / "out")
    (summary,) = run(cfg, choices, overrides)
    assert summary["setting"] == "dg" and summary["paper"]["value"] == 43.06
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert any(x["mode"] == "val" and "IoU.traffic sign" in x for x in lines)


def test_ade20k_experiment(hydra_ctx, tmp_path):
    root = make_ade(tmp_path / "ade")
    cfg, choices, overrides = compose_run(["experiment=ade20k/upernet_r101", "hl.enabled=true", f"data.root={root}",
                                           "model.aux.channels=16", *SHRINK], tmp_path / "out")
    (summary,) = run(cfg, choices, overrides)
    assert len(summary["final"]["IoU"]) == 150 and summary["hl_auroc"] is None


def test_training_refuses_unmapped_validation_labels(hydra_ctx, tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes", train_ids=True)
    # A raw labelIds file saved under the trainIds name: the classic mistake.
    bad = sorted((root / "gtFine" / "val").rglob("*_labelTrainIds.png"))[0]
    bad.write_bytes(next(bad.parent.glob("*_labelIds.png")).read_bytes())
    cfg, choices, overrides = compose_run(["experiment=fullsup/pspnet_r101", f"data.root={root}", *SHRINK],
                                          tmp_path / "out")
    with pytest.raises(ConfigError, match=r"labelTrainIds.png: values \[.*\] are outside the train ids"):
        run(cfg, choices, overrides)
