"""load_checkpoint (hlbench, mmseg 0.x and 1.x checkpoints) and the `python -m hlbench.eval` entry point."""
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hlbench.data import build_datasets
from hlbench.data.synthetic import CLASSES
from hlbench.errors import ConfigError
from hlbench.eval import evaluate_checkpoint, iou_table
from hlbench.labels import IGNORE_INDEX
from hlbench.models import build_model, load_checkpoint
from tests.conftest import compose_run, SMOKE_HL, SMOKE_HL_RUN, TINY

NUM_CLASSES = 5
TINY_MODEL = {"backbone": {"type": "resnet_v1c", "depth": 18, "width_mult": 0.25, "stem_channels": [32, 32, 64],
                           "pretrained": "none"},
              "head": {"type": "psp", "channels": 16},
              "aux": {"enabled": True, "in_index": 2, "channels": 8}}


def _model(seed):
    torch.manual_seed(seed)
    model = build_model(TINY_MODEL, NUM_CLASSES, hl={"enabled": True})
    for name, buf in model.named_buffers():  # BN statistics differ between models too
        if name.endswith("running_mean") or name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
    return model


def _authors_keys(state):
    """The released HL checkpoints name the HL branch `weigh_head`."""
    return OrderedDict((k.replace("hl_head.", "weigh_head.", 1) if k.startswith("hl_head.") else k, v)
                       for k, v in state.items())


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _mmseg0(state):
    return {"state_dict": _authors_keys(state), "meta": {"mmseg_version": "0.11.0", "iter": 80000}}


class _MessageHub:
    """Stands in for the mmengine objects a 1.x checkpoint pickles (rejected by weights_only=True)."""


def _mmseg1(state):
    weights = OrderedDict([("data_preprocessor.mean", torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)),
                           ("data_preprocessor.std", torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)),
                           *_authors_keys(state).items()])
    return {"state_dict": weights, "meta": {"mmseg_version": "1.2.2", "iter": 80000}, "message_hub": _MessageHub()}


@pytest.mark.parametrize("wrap", [lambda s: {"model": s}, _mmseg0, _mmseg1], ids=["hlbench", "mmseg0", "mmseg1"])
def test_load_checkpoint_formats(tmp_path, wrap):
    source, target = _model(0), _model(1)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict()), path)
    report = load_checkpoint(target, path)
    _assert_same(source, target)
    assert not report["missing"] and not report["unexpected"]
    assert any(k.startswith("hl_head.") for k in report["loaded"])


def test_load_checkpoint_ddp_prefix_and_missing_hl(tmp_path):
    source, target = _model(0), _model(1)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state}, tmp_path / "ddp.pth")
    load_checkpoint(target, tmp_path / "ddp.pth")
    _assert_same(source, target)

    plain = build_model(TINY_MODEL, NUM_CLASSES)
    report = load_checkpoint(plain, tmp_path / "ddp.pth")  # HL weights are reported, not an error
    assert report["unexpected"] and all(k.startswith("hl_head.") for k in report["unexpected"])


def test_load_checkpoint_errors(tmp_path):
    model = _model(0)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")

    other = build_model(TINY_MODEL, NUM_CLASSES + 2, hl={"enabled": True})  # different class count
    torch.save({"state_dict": other.state_dict()}, tmp_path / "classes.pth")
    with pytest.raises(ConfigError, match=r"classes\.pth.*shape mismatch.*conv_seg"):
        load_checkpoint(model, tmp_path / "classes.pth")

    partial = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.layer1")}
    torch.save({"model": partial}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"partial\.pth: only \d+/\d+ tensors"):
        load_checkpoint(model, tmp_path / "partial.pth")

    torch.save({"meta": {}}, tmp_path / "empty.pth")
    with pytest.raises(ConfigError, match="empty.pth"):
        load_checkpoint(model, tmp_path / "empty.pth")


def _iou_by_hand(model, cfg) -> dict:
    """{class: IoU} from a confusion matrix counted here (rows truth, columns prediction, void pixels left out) on
    the val images, normalised and predicted whole; classes neither present nor predicted are left out."""
    val = build_datasets(cfg.data, cfg.seed)["val"]
    n = len(CLASSES)
    confusion = torch.zeros(n, n, dtype=torch.long)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in (cfg.data.mean, cfg.data.std))
    with torch.no_grad():
        for i in range(len(val)):
            item = val[i]
            pred = model.eval().predict(((item["img"].float() - mean) / std)[None], mode="whole")[0].argmax(0)
            valid = item["label"] != IGNORE_INDEX
            confusion += torch.bincount(item["label"][valid] * n + pred[valid], minlength=n * n).view(n, n)
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    return {CLASSES[c]: (confusion[c, c] / union[c]).item() for c in range(n) if union[c] > 0}


def test_eval_cli_scores_a_checkpoint(tmp_path, hydra_ctx, capsys):
    cfg, _, _ = compose_run([*TINY, *SMOKE_HL], out_dir=tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=len(CLASSES), hl=cfg.hl)
    # A fresh classifier predicts one class everywhere; wide weights spread the predictions over several.
    torch.nn.init.normal_(model.decode_head.conv_seg.weight, std=1.0)
    ckpt = tmp_path / "best.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    cfg = OmegaConf.merge(cfg, {"checkpoint": str(ckpt)})

    first = evaluate_checkpoint(cfg, SMOKE_HL_RUN)
    second = evaluate_checkpoint(cfg, SMOKE_HL_RUN)
    out = capsys.readouterr().out
    assert "mIoU" in out and "road" in out
    assert Path(first["run_dir"]) == tmp_path / "eval" / "smoke-pspnet_r18_tiny+hl" / "best"
    assert Path(second["run_dir"]).name == "best-2"  # never overwrites an earlier evaluation
    saved = json.loads((Path(first["run_dir"]) / "metrics.json").read_text())
    expected = _iou_by_hand(model, cfg)
    assert saved["mIoU"] == pytest.approx(sum(expected.values()) / len(expected), abs=1e-6)
    assert {c: saved["metrics"][f"IoU.{c}"] for c in expected} == pytest.approx(expected, abs=1e-6)
    assert saved["mIoU"] == pytest.approx(second["mIoU"])  # deterministic
    assert set(saved["metrics"]) >= {f"IoU.{c}" for c in ("road", "wire")}
    assert (Path(first["run_dir"]) / "config.yaml").is_file()


def test_iou_table_shows_nan_classes():
    table = iou_table({"IoU.a": 0.5, "Acc.a": 1.0, "IoU.b": float("nan"), "Acc.b": float("nan"),
                       "mIoU": 0.5, "mAcc": 1.0, "aAcc": 0.9}, ["a", "b"])
    assert " 50.00" in table and "nan" in table and "mIoU  50.00" in table


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(64), None], ids=["png", "truncated"])
def test_unreadable_files_give_one_line_errors_naming_them(tmp_path, content):
    from hlbench.engine.checkpoint import load_state
    from hlbench.models import load_pretrained

    model = _model(0)
    path = tmp_path / "bad.pth"
    if content is None:  # a copy cut off mid-transfer
        torch.save({"model": model.state_dict()}, path)
        content = path.read_bytes()[:2000]
    path.write_bytes(content)
    for load in (lambda: load_checkpoint(model, path), lambda: load_pretrained(model.backbone, path),
                 lambda: load_state(path)):
        with pytest.raises(ConfigError, match=r"bad\.pth: not a readable PyTorch checkpoint") as err:
            load()
        assert "\n" not in str(err.value)
