"""How runs appear in W&B: name / group / job type / tags, metric summaries, HL maps with class masks, and a
Hydra multirun making one searchable offline run per job (read back from the offline .wandb files)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from hlbench.tracking import Tracker
from hlbench.tracking.wandb_layout import run_group, run_identity
from tests.conftest import REPO, TINY, offline_records

CLASSES = ["road", "car", "traffic light"]


def _cfg(hl=True, method="u2pl", setting="semisup", seed=2):
    return OmegaConf.create({"seed": seed, "hl": {"enabled": hl}, "method": {"name": method},
                             "model": {"name": "deeplabv3plus_r101_u2pl"}, "data": {"name": "cityscapes_semisup_769"},
                             "setting": setting})


def test_identity_groups_by_suite_and_tags_every_axis():
    ident = run_identity(_cfg(), "semisup/u2pl_1_8+hl", "semisup", None, pretrained="resnet101_u2pl",
                         method_tags=["u2pl:reference"], split={"source": "u2pl/1_8"})
    assert ident["name"] == "semisup/u2pl_1_8+hl-s2"
    assert ident["group"] == "semisup" and ident["job_type"] == "semisup"
    assert ident["tags"] == ["hl", "method:u2pl", "model:deeplabv3plus_r101_u2pl", "data:cityscapes_semisup_769",
                             "split:u2pl/1_8", "setting:semisup", "pretrained:resnet101_u2pl", "u2pl:reference"]
    base = run_identity(_cfg(hl=False, method="supervised", setting="fullsup"), "fullsup/fcn_r101", None, "smoke",
                        pretrained="none", method_tags=["x" * 80])
    # a lone experiment joins its folder's suite; a profile's dry runs get their own group and name
    assert base["group"] == "fullsup-smoke" and base["name"] == "fullsup/fcn_r101-smoke-s2"
    assert base["tags"][0] == "baseline" and "split:full" in base["tags"] and "profile:smoke" in base["tags"]
    assert max(len(t) for t in base["tags"]) == 64
    assert run_group("fullsup/fcn_r101", "fullsup", None) == run_group("fullsup/fcn_r101+hl", None, None)


def test_offline_run_has_summaries_per_class_iou_and_hl_maps_with_class_masks(wandb_offline, tmp_path):
    run = tmp_path / "run"
    tr = Tracker(run, {"seed": 0}, logger="wandb", project="hlbench-test", group="smoke", job_type="smoke",
                 tags=["hl", "method:supervised"], name="smoke/pspnet_r18_tiny+hl-s0", class_names=CLASSES)
    for it, miou in ((10, 0.3), (20, 0.5), (30, 0.4)):
        tr.log("val", it, {"mIoU": miou, "IoU.road": miou, "IoU.car": miou / 2, "IoU.traffic light": 0.0})
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 3, (2, 8, 8)), rng.integers(0, 3, (2, 8, 8))
    labels[:, 0] = 255
    tr.log_hl_maps(30, rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8), rng.random((2, 1, 8, 8)), labels, preds,
                   hard=np.ones((2, 8, 8), np.uint8), loss=rng.random((2, 8, 8)), hard_bits={"thin": 1})
    tr.write_summary({"final": {"mIoU": 0.4, "IoU": {"road": 0.4}}, "best": {"mIoU": 0.5}})
    tr.finish()
    (offline,) = (run / "wandb").glob("offline-run-*")
    records = offline_records(offline)
    (info,) = [r["run"] for r in records if r["type"] == "run"]
    assert (info["run_group"], info["job_type"], info["display_name"]) == ("smoke", "smoke",
                                                                            "smoke/pspnet_r18_tiny+hl-s0")
    assert info["tags"] == ["hl", "method:supervised"]
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    # best and final: W&B's max / last of the val curve, and summary.json's final / best entries
    assert summary["val/mIoU"] == {"max": 0.5, "last": 0.4}
    assert summary["val/IoU.road"] == {"max": 0.5, "last": 0.4}
    assert summary["val/IoU.traffic light"] == {"max": 0.0, "last": 0.0}
    assert summary["final/mIoU"] == 0.4 and summary["best/mIoU"] == 0.5 and summary["final/IoU/road"] == 0.4
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    media = next(h for h in history if "hl_maps/hl.all_masks" in h)
    assert media["hl_maps/panel._type"] == "image-file" and media["hl_maps/hl.count"] == 2
    # each image and HL map carries both class masks; the prediction mask holds the predicted ids
    for key in ("hl_maps/hl", "hl_maps/image"):
        assert [set(m) for m in media[f"{key}.all_masks"]] == [{"prediction", "ground_truth"}] * 2
    mask_png = offline / "files" / media["hl_maps/hl.all_masks"][1]["prediction"]["path"]
    assert np.array_equal(np.asarray(Image.open(mask_png)), preds[1])
    labels_by_mask = {}
    for r in records:
        if r["type"] == "config":
            labels_by_mask.update(r["config"]["update"].get("_wandb", {}).get("mask/class_labels", {}))
    names = {"0": "road", "1": "car", "2": "traffic light", "255": "ignore"}
    assert {k: v["value"] for k, v in labels_by_mask.items()} == {
        f"hl_maps/{key}_wandb_delimeter_{mask}": names
        for key in ("hl", "image") for mask in ("prediction", "ground_truth")}


@pytest.mark.slow
def test_multirun_makes_one_searchable_offline_run_per_job(tmp_path):
    """`python -m hlbench.run -m experiment=a,b`: two jobs in one process, two finished offline runs."""
    out = tmp_path / "runs"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_DIR", None)  # each run folder keeps its wandb/ folder
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / "wandb_home" / var.lower())
    overrides = [o for o in TINY if not o.startswith(("profile=", "logger="))]  # no profile: the real smoke group
    res = subprocess.run([sys.executable, "-m", "hlbench.run", "-m", "experiment=smoke/pspnet_r18_tiny",
                          "hl.enabled=false,true",
                          "logger=wandb", f"out_dir={out}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    offline = sorted(out.rglob("offline-run-*"))
    assert len(offline) == 2
    runs = [next(r["run"] for r in offline_records(d) if r["type"] == "run") for d in offline]
    assert len({r["run_id"] for r in runs}) == 2
    assert {(r["display_name"], r["run_group"], r["job_type"]) for r in runs} == {
        ("smoke/pspnet_r18_tiny-s0", "smoke", "smoke"), ("smoke/pspnet_r18_tiny+hl-s0", "smoke", "smoke")}
    # searchable: W&B filters on group and tags pick each run
    assert [r["display_name"] for r in runs if r["run_group"] == "smoke" and "hl" in r["tags"]] == [
        "smoke/pspnet_r18_tiny+hl-s0"]
    assert [r["display_name"] for r in runs if "baseline" in r["tags"] and "method:supervised" in r["tags"]] == [
        "smoke/pspnet_r18_tiny-s0"]
    for d in offline:  # each job's run finished: the exit record is in its own file
        assert any(r["type"] == "exit" for r in offline_records(d))
