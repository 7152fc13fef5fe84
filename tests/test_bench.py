"""The step benchmark runs the real training step of a model config, baseline and HL, and prints one row per model."""
import torch

from hlbench.bench import TrainStep, main


def test_train_step_updates_the_model_and_hl_branch():
    step = TrainStep("pspnet_r18_tiny", hl=True, size=64, batch=2, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    assert step() > 0
    after = step.model.state_dict()
    changed = {k.split(".")[0] for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert {"backbone", "decode_head", "hl_head"} <= changed


def test_bench_prints_baseline_and_hl_per_model(capsys):
    main(["--models", "pspnet_r18_tiny", "--size", "64", "--steps", "1", "--warmup", "1"])
    out = capsys.readouterr().out.splitlines()
    (row,) = [line for line in out if line.startswith("pspnet_r18_tiny")]
    *times, memory = row.split()[1:]
    assert len(times) == 3 and all(float(v) > 0 for v in times)
    assert memory == "–"  # peak memory is a CUDA measurement
