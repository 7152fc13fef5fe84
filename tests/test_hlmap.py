"""Stored HL maps: export from a trained smoke HL model (hlbench/hlmap.py), the map through the train pipeline with
the image (hlbench/data/hl_maps.py, transforms.py), and a fixed map in the labelled loss (hl.source=fixed)."""
import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hlbench import hlmap
from hlbench.config_checks import check_config
from hlbench.data import build_datasets
from hlbench.data.bad_samples import BadSampleError
from hlbench.data.hl_maps import HL_MAP_KEY, MANIFEST, AttachHLMap, attach_hl_maps
from hlbench.data.sampling import stream_loader
from hlbench.data.transforms import build_train_pipeline
from hlbench.errors import ConfigError
from hlbench.methods.labelled_loss import LabelledLoss
from hlbench.models.heads import resize
from hlbench.run import run_experiment
from hlbench.weights import sha256_of
from tests.conftest import SMOKE_HL, SMOKE_HL_RUN, TINY, compose_run, free_port, gloo_group, launch_gloo

SCENES = 6
DATA = [*TINY, f"data.train.num_images={SCENES}"]
# The runs that train with a fixed map in the end-to-end chain (profile=smoke trains the tiny model of each
# experiment's family), the loss key the map changes, and the keys it must leave as the baseline's on the first
# step: Mask2Former's default variant weights only the point BCE (hl.fixed_map: point_weights on mask).
FIXED_MAP_CONSUMERS = [("smoke/pspnet_r18_tiny", "decode.loss_ce", ()),
                       ("mask2former/swin_t_512", "decode.loss_mask", ("decode.loss_cls", "decode.loss_dice",
                                                                       "decode.d0.loss_cls", "decode.d0.loss_dice"))]


@pytest.fixture(scope="module")
def hl_model(tmp_path_factory):
    """A smoke HL model trained for 2 iterations: (run folder, checkpoint)."""
    out = tmp_path_factory.mktemp("hl_model")
    summary = run_experiment(compose_run([*DATA, *SMOKE_HL, "train.iters=2"], out)[0], SMOKE_HL_RUN, None, "smoke")
    return summary["run_dir"], os.path.join(summary["run_dir"], "checkpoints", "best.pth")


@pytest.fixture(scope="module")
def exported(hl_model, tmp_path_factory):
    """The maps of the model's training scenes, exported once with experiment= and checkpoint=."""
    out = tmp_path_factory.mktemp("maps") / "maps"
    result = hlmap.export_command([*DATA, *SMOKE_HL, f"checkpoint={hl_model[1]}", f"out={out}"])
    return out, result


def _export(hl_model, out, *extra):
    return hlmap.export_command([*DATA, *SMOKE_HL, f"checkpoint={hl_model[1]}", f"out={out}", *extra])


def test_export_writes_a_float16_map_per_scene_at_one_eighth_and_a_manifest(hl_model, exported):
    out, result = exported
    assert result["written"] == result["complete"] == result["images"] == SCENES
    stored = np.load(out / "train" / "00000.npy")
    # Scenes are 80x80 (TINY), evaluated whole: the PSPNet-R18 HL head's output is 1/8 of that.
    assert stored.dtype == np.float16 and stored.shape == (10, 10)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["checkpoint_sha256"] == sha256_of(hl_model[1])
    assert manifest["experiment"] == SMOKE_HL_RUN and manifest["split"] == "train"
    assert manifest["data"] == {"name": "synthetic", "scene_seed": 0, "train": {"domain": "source", "size": [80, 80]}}
    assert manifest["model"]["name"] == "tiny/pspnet_r18"
    assert manifest["resolution"]["test_pipeline"] == {"resize": None}
    assert "commit" in manifest["hlbench"]


def test_export_resumes_and_refuses_to_mix(hl_model, exported, tmp_path):
    out = tmp_path / "maps"
    first = _export(hl_model, out)
    (out / "train" / "00003.npy").unlink()
    kept = (out / "train" / "00000.npy").stat().st_mtime_ns
    again = _export(hl_model, out)
    assert (again["written"], again["already_done"], again["complete"]) == (1, SCENES - 1, SCENES)
    assert (out / "train" / "00000.npy").stat().st_mtime_ns == kept
    assert np.array_equal(np.load(out / "train" / "00001.npy"), np.load(exported[0] / "train" / "00001.npy"))
    assert first["written"] == SCENES
    # Another checkpoint's maps must not land in this folder.
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match=r"checkpoint_sha256 differ in .*manifest\.json"):
        _export(hl_model, out)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files but no manifest.json"):
        _export(hl_model, stray)
    assert (stray / "notes.txt").read_text() == "mine"


def _export_rank(rank, port, checkpoint, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    with gloo_group(rank, 2, port):
        result = hlmap.export_command([*DATA, *SMOKE_HL, f"checkpoint={checkpoint}", f"out={out}"])
    torch.save(result, f"{out}.rank{rank}.pt")


@pytest.mark.slow
def test_export_under_two_processes_shares_the_images_out(hl_model, exported, tmp_path):
    out = tmp_path / "maps"
    launch_gloo(_export_rank, 2, (free_port(), hl_model[1], str(out)), ["hlbench.hlmap"])
    results = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["written"] for r in results] == [SCENES // 2, SCENES // 2]
    assert all(r["complete"] == SCENES for r in results)
    for path in sorted(exported[0].glob("train/*.npy")):
        theirs = np.load(out / "train" / path.name).astype(np.float32)
        assert np.allclose(theirs, np.load(path).astype(np.float32), atol=2e-3)  # one thread per rank here


def test_export_command_names_what_is_missing(capsys):
    assert hlmap.main(["export", *SMOKE_HL]) == 2
    assert capsys.readouterr().err.strip() == "error: out=<folder> is required once: where the maps and " \
                                              "manifest.json go"


def test_show_draws_the_maps_beside_their_scenes(exported, tmp_path):
    png = hlmap.show(exported[0], n=2, out=tmp_path / "maps.png")
    assert png.stat().st_size > 10_000


def _coordinate_sample(h=120, w=200):
    """An image whose red channel is the x coordinate, its label (10 columns), and a float map equal to x."""
    x = np.broadcast_to(np.arange(w, dtype=np.float32), (h, w))
    img = np.stack([x, np.broadcast_to(np.arange(h)[:, None], (h, w)), np.zeros((h, w))], -1).astype(np.uint8)
    return {"img": img, "label": (x // 20).astype(np.uint8), "hard": np.zeros((h, w), np.uint8), "index": 0,
            HL_MAP_KEY: x.copy()}


@pytest.mark.parametrize("resize", [{"scale": [200, 120], "ratio_range": [0.5, 1.5]},
                                    {"mode": "long_side", "ratio_range": [0.5, 1.5]}])
def test_the_map_is_resized_cropped_and_flipped_with_the_image(resize):
    cfg = {"resize": resize, "crop": [96, 96], "flip": 0.5, "photometric": False}
    flips = set()
    for seed in range(12):
        out = build_train_pipeline(cfg)(_coordinate_sample(), np.random.default_rng(seed))
        red, hl = out["img"][0].float().numpy(), out[HL_MAP_KEY].numpy()
        h, w = out["img_hw"].tolist()
        # Bilinear on both (the image rounds to uint8): the map stays on the image's x coordinate.
        assert hl.dtype == np.float32 and np.abs(red[:h, :w] - hl[:h, :w]).max() <= 1.0
        flips.add(bool(red[0, 1] < red[0, 0]))
        # Padding (a small rescale) keeps the map's own mean, not 0.
        if h < 96:
            assert np.allclose(hl[h:], hl[h, 0]) and hl[:h, :w].min() <= hl[h, 0] <= hl[:h, :w].max()
    assert flips == {True, False}
    # Photometric steps draw after the geometric ones and never touch the map.
    plain = build_train_pipeline(cfg)(_coordinate_sample(), np.random.default_rng(3))
    photo = build_train_pipeline({**cfg, "photometric": True})(_coordinate_sample(), np.random.default_rng(3))
    assert np.array_equal(plain[HL_MAP_KEY].numpy(), photo[HL_MAP_KEY].numpy())
    assert not torch.equal(plain["img"], photo["img"])


def test_attached_map_is_resized_to_the_image_like_the_online_branch(tmp_path):
    # A 1/8 map whose cell j holds the x of its centre, 8j + 3.5: bilinear (align_corners=False) gives x back.
    stored = np.broadcast_to(8 * np.arange(12) + 3.5, (8, 12)).astype(np.float16)
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "b.npy", stored)
    sample = {"img": np.zeros((64, 96, 3), np.uint8), "index": 0}
    out = AttachHLMap(tmp_path, ["a/b"], align_corners=False)(sample)
    assert np.allclose(out[HL_MAP_KEY][:, 4:-4], np.arange(96)[4:-4])
    online = resize(torch.from_numpy(stored.astype(np.float32))[None, None], (64, 96), False)[0, 0].numpy()
    assert np.array_equal(out[HL_MAP_KEY], online)


@pytest.mark.parametrize("scope", ["batch", "image"])
def test_a_uniform_fixed_map_gives_exactly_the_plain_cross_entropy(scope):
    fixed_cfg = compose_run([*TINY, *SMOKE_HL, "hl.source=fixed", "data.hl_map_dir=maps", f"hl.scope={scope}"])[0]
    plain_cfg = compose_run([*TINY, "experiment=smoke/pspnet_r18_tiny"])[0]
    torch.manual_seed(0)
    label = torch.randint(0, 12, (4, 32, 32))
    label[:, :4] = 255
    out = {"out": torch.randn(4, 12, 32, 32), "aux": torch.randn(4, 12, 32, 32)}
    fixed = LabelledLoss(fixed_cfg, 4)(out, label, False, hl_map=torch.full((4, 32, 32), 0.37))
    plain = LabelledLoss(plain_cfg, 4)(out, label, False)
    assert torch.allclose(fixed.seg, plain.seg, rtol=1e-6, atol=0) and torch.equal(fixed.aux, plain.aux)
    assert "weight_loss" not in fixed.logs and float(fixed.hl) == 0.0  # a stored map has no L_h
    # A harder region does weigh more.
    hl_map = torch.zeros(4, 32, 32)
    hl_map[:, 16:] = 5.0
    assert not torch.allclose(LabelledLoss(fixed_cfg, 4)(out, label, False, hl_map=hl_map).seg, plain.seg)
    with pytest.raises(ConfigError, match="no stored HL map"):
        LabelledLoss(fixed_cfg, 4)(out, label, False)


def test_fixed_source_needs_a_map_folder():
    with pytest.raises(ConfigError, match="hl.source=fixed needs data.hl_map_dir"):
        check_config(compose_run([*TINY, *SMOKE_HL, "hl.source=fixed"])[0])


def _train_set(exported, *extra):
    cfg = compose_run([*DATA, *SMOKE_HL, "hl.source=fixed", f"data.hl_map_dir={exported[0]}", *extra])[0]
    train = build_datasets(cfg.data, cfg.seed)["train"]
    attach_hl_maps(train, cfg.data)
    return train


def test_a_missing_or_mismatched_map_stops_in_one_line_naming_it_or_is_skipped(exported, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    for path in exported[0].rglob("*"):
        if path.is_file():
            (maps / path.relative_to(exported[0])).parent.mkdir(parents=True, exist_ok=True)
            (maps / path.relative_to(exported[0])).write_bytes(path.read_bytes())
    (maps / "train" / "00002.npy").unlink()
    train = _train_set((maps,))
    assert train[0][HL_MAP_KEY].shape == (64, 64)  # the crop of TINY's pipeline
    with pytest.raises(BadSampleError) as err:
        train[2]
    assert str(err.value) == f"{maps / 'train' / '00002.npy'}: no stored HL map for this image (python -m " \
                             f"hlbench.hlmap export writes it)"
    # Through a training stream the error reaches the main process as the same line; skip counts and goes on.
    with pytest.raises(BadSampleError, match="00002.npy: no stored HL map"):
        for _ in zip(range(3), stream_loader(train, SCENES, seed=0, rank=0, world=1)):
            pass
    np.save(maps / "train" / "00002.npy", np.zeros((10, 30), np.float16))
    skipping = _train_set((maps,), "data.on_bad_sample=skip")
    batch = next(iter(stream_loader(skipping, SCENES, seed=0, rank=0, world=1)))
    assert batch[HL_MAP_KEY].shape == (SCENES, 64, 64)
    assert list(skipping.bad_samples.files) == [str(maps / "train" / "00002.npy")]
    assert "does not fit this 80x80 image" in skipping.bad_samples.files[str(maps / "train" / "00002.npy")]
    # Maps of other scenes are refused as a whole.
    with pytest.raises(ConfigError, match=r"manifest\.json: its maps were exported for other images .*train"):
        _train_set((maps,), "data.train.domain=target")


def _train_records(summary) -> list[dict]:
    records = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    return [r for r in records if r["mode"] == "train"]


@pytest.mark.parametrize("experiment, changed, unchanged", FIXED_MAP_CONSUMERS)
def test_chain_hl_model_then_export_then_training_with_its_fixed_map(hl_model, tmp_path, experiment, changed,
                                                                      unchanged):
    """profile=smoke end to end: the HL model's run folder -> its maps -> the experiment trained with them, and
    without them (its baseline, same seed)."""
    maps = tmp_path / "maps"
    assert hlmap.main(["export", f"run={hl_model[0]}", f"out={maps}"]) == 0
    over = [*DATA, f"experiment={experiment}", "hl.source=fixed", f"data.hl_map_dir={maps}", "train.iters=2",
            "train.log_interval=1"]
    summary = run_experiment(compose_run([*over, "hl.enabled=true"], tmp_path / "runs")[0], f"{experiment}+hl",
                             None, "smoke")
    baseline = run_experiment(compose_run([*over, "hl.enabled=false"], tmp_path / "runs")[0], experiment, None,
                              "smoke")
    assert summary["hl_variant"] == "fixed_map" and baseline["hl_variant"] == "off"
    train, plain = _train_records(summary), _train_records(baseline)
    assert len(train) == 2 and all(np.isfinite(r[changed]) and "weight_loss" not in r for r in train)
    assert train[0][changed] != plain[0][changed]
    assert all(train[0][key] == plain[0][key] for key in unchanged)
    weights = torch.load(os.path.join(summary["run_dir"], "checkpoints", "best.pth"), map_location="cpu",
                         weights_only=False)
    state = weights.get("state_dict", weights.get("model", weights))
    assert not any(k.startswith("hl_head.") for k in state)  # no HL branch is trained
    recorded = OmegaConf.load(os.path.join(summary["run_dir"], "config.yaml"))
    assert recorded.data.hl_map_dir == str(maps) and recorded.hl.fixed_map.mode == "point_weights"
