"""analysis.logs: each log format into the one schema (run identity, training iteration, fractions, cost)."""
import json

import pandas as pd
import pytest
import yaml

from analysis.logs import (LINE_COLUMNS, RUN_COLUMNS, evaluations, log_classes, log_format, read_log,
                           training_cost)
from hlbench.errors import ConfigError
from log_fixtures import write_mmseg_log

CLASSES = ["meadow", "power line", "bed "]  # a space inside and a trailing one, as in Cityscapes / ADE20K


def _schema_front(df):
    assert list(df.columns[:len(RUN_COLUMNS) + len(LINE_COLUMNS)]) == [*RUN_COLUMNS, *LINE_COLUMNS]


def test_mmseg_json_val_lines_get_the_training_iteration(tmp_path):
    evals = [(40, {"meadow": 0.5, "power line": 0.25, "bed ": 0.125}),
             (80, {"meadow": 0.75, "power line": 0.5, "bed ": 0.25})]
    path = write_mmseg_log(tmp_path / "r" / "ours.log.json", CLASSES, evals, hl=True, gpus=3, samples_per_gpu=2,
                           times=(0.9, 0.3, 0.5, 0.4), memory=(100, 400, 250, 300), val_steps=7)
    df = read_log(path)
    _schema_front(df)
    assert log_format(path) == "mmseg_json"
    run = df.iloc[0]
    assert run["format"] == "mmseg_json" and run["hl"] == True  # noqa: E712 (pandas boolean)
    assert run["hardware"] == "3 × NVIDIA A100-PCIE-40GB" and run["gpus"] == 3 and run["batch"] == 6
    assert run["config"] == "hl_r.py" and run["save_best"] is None
    val = evaluations(df)
    assert list(val["iter"]) == [40, 80]  # not the val loader's step count 7
    assert log_classes(df) == CLASSES
    assert val.iloc[1]["IoU.bed "] == 0.25 and val.iloc[1]["IoU.power line"] == 0.5
    assert val.iloc[1]["mIoU"] == pytest.approx(0.5)
    train = df[df["mode"] == "train"]
    assert list(train["iter"]) == [20, 40, 60, 80] and list(train["s_per_iter"]) == [0.9, 0.3, 0.5, 0.4]
    cost = training_cost(df)
    assert cost == {"s_per_iter": pytest.approx(0.45), "memory_mb": 400, "train_lines": 4}
    base = read_log(write_mmseg_log(tmp_path / "r" / "base.log.json", CLASSES, evals, hl=False))
    assert base.iloc[0]["hl"] == False  # noqa: E712


def test_mmseg_json_rejects_a_file_without_header(tmp_path):
    path = tmp_path / "x.log.json"
    path.write_text('{"mode": "train", "iter": 50}\n')
    with pytest.raises(ConfigError, match="x.log.json"):
        read_log(path)


MMENGINE = """\
2023/07/25 16:59:31 - mmengine - INFO -
------------------------------------------------------------
System environment:
    sys.platform: linux
    CUDA available: True
    GPU 0,1,2,3: NVIDIA GeForce RTX 4090
    PyTorch: 1.13.1+cu117

Runtime environment:
    Distributed launcher: pytorch
    Distributed training: True
    GPU number: 4
------------------------------------------------------------

2023/07/25 16:59:33 - mmengine - INFO - Config:
model = dict(
    type='EncoderDecoderWeight',
    backbone=dict(type='MixVisionTransformer'))
train_dataloader = dict(
    batch_size=4,
    num_workers=8)
default_hooks = dict(
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=5000,
        save_best='mIoU'))
work_dir = './work_dirs/segformer_tiny_ade20k-512x512'

2023/07/25 17:00:01 - mmengine - INFO - Iter(train) [   50/1000]  lr: 1.9614e-06  eta: 10:09:17  time: 0.2000  \
data_time: 0.0092  memory: 3483  grad_norm: 4.5  loss: 3.8805  decode.loss_ce: 3.9197  decode.acc_seg: 3.7491  \
weight_loss: -0.0392
2023/07/25 17:00:09 - mmengine - INFO - Iter(train) [  100/1000]  lr: 1.9e-06  eta: 1 day, 2:03:04  time: 0.4000  \
data_time: 0.0090  memory: 3500  loss: 3.5  decode.loss_ce: 3.6  decode.acc_seg: 5.0  weight_loss: -0.036
2023/07/25 17:00:10 - mmengine - INFO - Iter(val) [ 50/100]    eta: 0:00:08  time: 0.0172  data_time: 0.0022  memory: 762
2023/07/25 17:00:12 - mmengine - INFO - per class results:
2023/07/25 17:00:12 - mmengine - INFO - \n\
+------------+-------+-------+
|   Class    |  IoU  |  Acc  |
+------------+-------+-------+
|   meadow   | 71.23 | 84.28 |
| power line |  0.5  |  2.0  |
+------------+-------+-------+
2023/07/25 17:00:12 - mmengine - INFO - Iter(val) [100/100]    aAcc: 74.0500  mIoU: 35.8650  mAcc: 43.1400  \
data_time: 0.0017  time: 0.0162
2023/07/25 17:00:14 - mmengine - INFO - The best checkpoint with 35.8650 mIoU at 100 iter is saved to best_mIoU_iter_100.pth.
2023/07/25 17:00:20 - mmengine - INFO - Iter(train) [  150/1000]  lr: 1.8e-06  eta: 10:00:00  time: 0.3000  \
data_time: 0.0090  memory: 3400  loss: 3.4  decode.loss_ce: 3.5  decode.acc_seg: 6.0  weight_loss: -0.035
"""


def test_mmengine_log(tmp_path):
    path = tmp_path / "20230725_165931.log"
    path.write_text(MMENGINE)
    df = read_log(path)
    _schema_front(df)
    run = df.iloc[0]
    assert run["format"] == "mmengine" and run["config"] == "segformer_tiny_ade20k-512x512"
    assert run["hardware"] == "4 × NVIDIA GeForce RTX 4090" and run["gpus"] == 4 and run["batch"] == 16
    assert run["save_best"] == "mIoU" and run["hl"] == True  # noqa: E712
    train = df[df["mode"] == "train"]
    assert list(train["iter"]) == [50, 100, 150] and list(train["memory_mb"]) == [3483, 3500, 3400]
    assert train.iloc[0]["grad_norm"] == 4.5 and train.iloc[1]["weight_loss"] == -0.036
    val = evaluations(df)
    assert len(val) == 1  # the progress line `Iter(val) [ 50/100] eta ...` is not an evaluation
    assert val.iloc[0]["iter"] == 100  # the last train line before it
    assert val.iloc[0]["mIoU"] == pytest.approx(0.35865) and val.iloc[0]["aAcc"] == pytest.approx(0.7405)
    assert val.iloc[0]["IoU.power line"] == pytest.approx(0.005) and val.iloc[0]["Acc.meadow"] == pytest.approx(0.8428)
    assert pd.isna(val.iloc[0]["s_per_iter"])  # val timing is not a training cost
    assert training_cost(df)["s_per_iter"] == pytest.approx(0.3)


U2PL = """\
[2022-10-11 20:46:42,421 INFO eval.py line 77 1223102] Namespace(base_size=2048, scales=[1.0], config='config.yaml', \
model_path='checkpoints/ckpt_best.pth', save_folder='checkpoints/results', crop=False)
[2022-10-11 20:46:56,354 INFO eval.py line 124 1223102] => load checkpoint[teacher_state]
/home/user/functional.py:780: UserWarning: Note that order of the arguments: ceil_mode
  warnings.warn("Note that order of the arguments")
[2022-10-11 20:47:06,075 INFO eval.py line 287 1223102] Test: [10/500] Data 0.487 (0.332) Batch 1.034 (0.955).
[2022-10-11 20:54:22,963 INFO eval.py line 308 1223102]  * class [0] IoU 97.12
[2022-10-11 20:54:22,963 INFO eval.py line 308 1223102]  * class [1] IoU 40.50
[2022-10-11 20:54:22,963 INFO eval.py line 309 1223102]  * mIoU 68.81
[Info] Load ImageNet pretrain from '/data/resnet101.pth'
missing_keys:  []
"""


def test_u2pl_eval_log(tmp_path):
    path = tmp_path / "val_best_20221011_203900.txt"
    path.write_text(U2PL)
    df = read_log(path)
    _schema_front(df)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["format"] == "u2pl_eval" and row["mode"] == "val" and pd.isna(row["iter"])
    assert row["mIoU"] == pytest.approx(0.6881) and row["IoU.1"] == pytest.approx(0.405)
    assert log_classes(df) == ["0", "1"]
    assert row["protocol"] == "checkpoints/ckpt_best.pth [teacher_state]" and row["save_best"] == "mIoU"


UNIMATCH = """\
[2023-01-01 10:00:00,000][    INFO] {'dataset': 'cityscapes', 'nclass': 2}
[2023-01-01 10:00:01,000][    INFO] ===========> Epoch: 0, LR: 0.0050, Previous best: 0.00
[2023-01-01 10:01:00,000][    INFO] Iters: 0, Total loss: 2.345, Loss x: 1.200, Loss s: 0.800, Loss w_fp: 0.345, Mask ratio: 0.100
[2023-01-01 10:02:00,000][    INFO] Iters: 93, Total loss: 1.500, Loss x: 0.900, Loss s: 0.400, Loss w_fp: 0.200, Mask ratio: 0.500
[2023-01-01 10:05:00,000][    INFO] ***** Evaluation center_crop ***** >>>> meanIOU: 45.67
[2023-01-01 10:05:01,000][    INFO] ===========> Epoch: 1, LR: 0.0049, Previous best: 45.67
[2023-01-01 10:09:00,000][    INFO] ***** Evaluation ***** >>>> Class [0 road] IoU: 97.00
[2023-01-01 10:09:00,000][    INFO] ***** Evaluation ***** >>>> Class [1 traffic light] IoU: 10.50
[2023-01-01 10:09:00,000][    INFO] ***** Evaluation sliding_window ***** >>>> MeanIoU: 53.75
"""


def test_unimatch_log(tmp_path):
    path = tmp_path / "unimatch.log"
    path.write_text(UNIMATCH)
    df = read_log(path)
    _schema_front(df)
    val = evaluations(df)
    assert list(val["epoch"]) == [0, 1] and list(val["protocol"]) == ["center_crop", "sliding_window"]
    assert list(val["mIoU"]) == pytest.approx([0.4567, 0.5375])
    assert pd.isna(val.iloc[0]["IoU.road"]) and val.iloc[1]["IoU.traffic light"] == pytest.approx(0.105)
    train = df[df["mode"] == "train"]
    assert list(train["loss"]) == [2.345, 1.5] and list(train["mask_ratio"]) == [0.1, 0.5]
    assert train["iter"].isna().all()  # `Iters` counts within an epoch
    assert df.iloc[0]["save_best"] == "mIoU"


def test_run_folder_in_the_same_schema(tmp_path):
    run = tmp_path / "runs" / "x" / "seed0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (run / "summary.json").write_text(json.dumps({"experiment": "fullsup/x_hl", "hl": True,
                                                  "batch": {"global": {"labeled": 8}}}))
    (run / "env.json").write_text(json.dumps({"devices": ["NVIDIA H200", "NVIDIA H200"], "world_size": 2}))
    lines = [{"mode": "train", "iter": 2, "time": 0.5, "memory": 900, "loss": 1.0},
             {"mode": "val", "iter": 2, "mIoU": 0.2, "IoU.pole": 0.1},
             {"mode": "train", "iter": 4, "time": 0.7, "memory": 950, "loss": 0.9},
             {"mode": "resume", "iter": 2},  # the attempt after iteration 2 is superseded
             {"mode": "train", "iter": 4, "time": 0.3, "memory": 800, "loss": 0.8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    df = read_log(run)
    _schema_front(df)
    first = df.iloc[0]
    assert first["format"] == "hlbench" and first["config"] == "fullsup/x_hl" and first["hl"] == True  # noqa: E712
    assert first["hardware"] == "2 × NVIDIA H200" and first["gpus"] == 2 and first["batch"] == 8
    assert evaluations(df).iloc[0]["IoU.pole"] == 0.1
    assert training_cost(df) == {"s_per_iter": pytest.approx(0.4), "memory_mb": 900, "train_lines": 2}


def test_unknown_file_is_one_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    with pytest.raises(ConfigError, match="notes.txt: not a log format"):
        read_log(path)
    with pytest.raises(FileNotFoundError, match="gone.log"):
        read_log(tmp_path / "gone.log")
