"""The benchmark times the real training step of model configs (baseline, HL, light HL), counts their FLOPs, and
writes JSON + Markdown; --quick --tiny runs the prepared GPU plan's code end to end at toy sizes on a CPU."""
import json

import pytest
import torch

from hlbench.bench import Setup, TrainStep, main
from hlbench.errors import ConfigError


def test_train_step_updates_the_model_and_hl_branch():
    step = TrainStep("tiny/pspnet_r18", hl=True, size=64, batch=2, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    assert step() > 0
    after = step.model.state_dict()
    changed = {k.split(".")[0] for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert {"backbone", "decode_head", "hl_head"} <= changed


def test_setup_labels_round_trip_and_bad_ones_are_named():
    setup = Setup.parse("bf16+cl+bm+compile")
    assert (setup.precision, setup.channels_last, setup.cudnn_benchmark, setup.compile) == ("bf16", True, True, True)
    assert Setup.parse(setup.label) == setup
    assert Setup.parse("tf32+bm").inactive(torch.device("cpu")) == ["tf32", "bm"]
    with pytest.raises(ConfigError, match="fp16"):
        Setup.parse("fp16+cl")


def test_bench_writes_baseline_hl_and_light_hl_rows(tmp_path, capsys):
    result = main(["--models", "tiny/pspnet_r18", "--size", "64", "--steps", "1", "--warmup", "1", "--device", "cpu",
                   "--light-channels", "4", "--out", str(tmp_path)])
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows.keys() == {"tiny/pspnet_r18", "tiny/pspnet_r18+HL", "tiny/pspnet_r18+HL(HL 4 ch)"}
    base, hl, light = rows.values()
    assert all(r["ms_per_step"] > 0 and r["setup"] == "fp32" and r["floor_ms"] is None for r in rows.values())
    assert base["tflop_per_step"] < light["tflop_per_step"] < hl["tflop_per_step"]
    assert hl["estimated_gib"] > base["estimated_gib"]
    md = (tmp_path / "bench.md").read_text()
    assert "## HL cost" in md and f"| {hl['tflop_per_step'] / base['tflop_per_step']:.3f} |" in md
    assert result["rows"] == list(rows.values()) and "## Training step" in capsys.readouterr().out


def test_flops_mode_counts_baseline_hl_and_light_hl_at_a_non_square_crop(tmp_path):
    main(["--flops", "--models", "tiny/pspnet_r18", "--size", "32x64", "--light-channels", "4", "--out", str(tmp_path)])
    rows = {r["name"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows.keys() == {"tiny/pspnet_r18", "tiny/pspnet_r18+HL", "tiny/pspnet_r18+HL(HL 4 ch)"}
    base, hl, light = (r["tflop_per_image"] for r in rows.values())
    assert all(r["kind"] == "flops" and r["size"] == "32×64" for r in rows.values()) and base < light < hl
    md = (tmp_path / "bench.md").read_text()
    assert f"| {hl:.3f} ({hl / base:.3f}×) | {100 * (hl - base) / hl:.1f} % | {light / base:.3f}× (4 ch) |" in md


@pytest.mark.slow
def test_quick_plan_runs_end_to_end_at_tiny_sizes(tmp_path):
    main(["--quick", "--tiny", "--device", "cpu", "--models", "pspnet_r101", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    assert result["failed"] == []  # a failing group is recorded and the run goes on
    assert {r["kind"] for r in rows} == {"train", "components", "eval", "loader"}
    train = [r for r in rows if r["kind"] == "train"]
    setups = {r["setup"] for r in train}
    assert {"tf32", "fp32", "bf16", "bf16+bm", "bf16+cl", "bf16+cl+bm"} <= setups
    assert any(r["model"] == "peer" for r in train) and any(r["hl_head_channels"] for r in train)
    # On a CPU TF32 and cudnn.benchmark do nothing, and the rows say so; compile is left to the GPU run.
    assert all(bool(r.get("inactive_switches")) == ("tf32" in r["setup"] or "bm" in r["setup"]) for r in train)
    assert [s for s in result["skipped"] if "compile" in s["group"]] and len(result["skipped"]) == 2
    parts = {r["name"] for r in rows if r["kind"] == "components"}
    assert parts == {"backbone", "decode_head", "auxiliary_head", "hl_head", "full step"}
    (evaluation,) = [r for r in rows if r["kind"] == "eval"]
    assert evaluation["windows_per_image"] > 1 and evaluation["s_per_image"] > 0
    assert "## Against the torchvision loop" in (tmp_path / "bench.md").read_text()
