"""Everyday commands on a trained run: predict on one's own images, evaluate a run folder, list what exists, and the
README's example command lines."""
import re

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from hlbench.config_checks import check_config
from hlbench.eval import evaluate_checkpoint, saved_run
from hlbench.predict import main as predict_main
from hlbench.run import print_catalogue, run_experiment
from hlbench.weights import require_pretrained
from tests.conftest import compose_run, REPO, SMOKE_HL, SMOKE_HL_RUN, TINY


@pytest.fixture
def trained_run(hydra_ctx, tmp_path):
    cfg = compose_run(TINY + [*SMOKE_HL], tmp_path / "out")[0]
    return run_experiment(cfg, SMOKE_HL_RUN, None, "smoke")


@pytest.mark.slow
def test_predict_writes_labels_overlay_and_hl_map_at_each_images_size(trained_run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"street": (40, 56), "square": (64, 64)}
    for stem, size in sizes.items():
        cv2.imwrite(str(photos / f"{stem}.png"), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    out = tmp_path / "predicted"
    checkpoint = f"{trained_run['run_dir']}/checkpoints/iter_000004.pth"  # a checkpoint works as well as the folder
    assert predict_main([f"run={checkpoint}", f"images={photos}/*.png", f"out={out}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}_{k}.png" for s in sizes
                                                           for k in ("hl", "labels", "overlay"))
    for stem, size in sizes.items():
        labels = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert labels.shape == size and labels.max() < 12  # the synthetic scenes' 12 classes
        assert cv2.imread(str(out / f"{stem}_overlay.png")).shape == (*size, 3)
        assert cv2.imread(str(out / f"{stem}_hl.png")).shape == (*size, 3)
    assert predict_main([f"run={trained_run['run_dir']}", "images=/nonexistent/*.jpg", f"out={out}"]) == 2
    assert predict_main([f"run={trained_run['run_dir']}", f"images={photos}", f"out={out}", "colour=1"]) == 2


@pytest.mark.slow
def test_eval_of_a_run_folder_uses_its_config_and_best_weights_and_reproduces_its_scores(trained_run, capsys):
    cfg, checkpoint, experiment = saved_run(trained_run["run_dir"])
    assert checkpoint.name == "best.pth" and experiment == SMOKE_HL_RUN
    # The only evaluation was the final one (eval_interval > iters), so best.pth holds the final weights.
    result = evaluate_checkpoint(OmegaConf.merge(cfg, {"checkpoint": str(checkpoint)}), experiment)
    assert result["mIoU"] == trained_run["final"]["mIoU"] and result["hl_auroc"] == trained_run["hl_auroc"]
    assert f"HL AUROC {100 * trained_run['hl_auroc']:.2f}" in capsys.readouterr().out


def test_list_names_the_experiments_and_suites(capsys):
    print_catalogue()
    out = capsys.readouterr().out
    assert "\n  smoke/pspnet_r18_tiny\n" in out and "\n  fullsup/pspnet_r101\n" in out and "\n  fullsup\n" in out
    assert "--cfg job" in out


def test_the_readme_examples_without_data_or_weights_start(hydra_ctx, tmp_path):
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Running things", 1)[1].split("```", 2)[1]
    lines = [re.sub(r"\s+#.*", "", ln).split()[3:] for ln in block.splitlines()
             if ln.startswith("python -m hlbench.run")]
    # one experiment with overrides: composed, checked and its weights found exactly as a run starts
    for overrides in [ln for ln in lines if ln and all("=" in o and not o.startswith("-") for o in ln)
                      and any(o.startswith("experiment=") for o in ln)]:
        cfg = compose_run(overrides, tmp_path)[0]
        check_config(cfg)
        require_pretrained(cfg)
    assert any("model=" in " ".join(ln) for ln in lines)  # the example that swaps the model is among them
