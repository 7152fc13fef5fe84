"""Mask2Former (hlbench/models/mask2former.py) and its criterion (hlbench/methods/mask2former_criterion.py): the tiny
model trains a step and predicts on CPU, the matching is optimal, the deformable attention samples where it
should, and a uniform fixed HL map leaves every HL mode equal to plain Mask2Former. Logit and loss parity with
mmseg/mmdet: analysis/mask2former_parity.py."""
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from hlbench.errors import ConfigError
from hlbench.methods.mask2former_criterion import (FixedMapOptions, Mask2FormerCriterion, linear_assignment,
                                                   point_sample, semantic_targets)
from hlbench.models.build import build_model
from hlbench.models.mask2former import Mask2FormerSegmentor, deformable_attention, sine_position_encoding

TINY = Path(__file__).resolve().parents[1] / "hlbench" / "conf" / "model" / "tiny" / "mask2former.yaml"
NUM_CLASSES = 5


def _tiny():
    cfg = OmegaConf.to_container(OmegaConf.load(TINY), resolve=True)
    return cfg, build_model(cfg, NUM_CLASSES)


def _label(b=2, h=80, w=72, seed=0):
    """Blocky labels of a few classes, an ignored border strip."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, NUM_CLASSES, (b, h // 16, w // 12), generator=gen)
    label = label.repeat_interleave(16, 1).repeat_interleave(12, 2)
    label[:, :4] = 255
    return label


def test_tiny_mask2former_trains_a_step_and_predicts():
    torch.manual_seed(0)
    cfg, model = _tiny()
    assert isinstance(model, Mask2FormerSegmentor)
    keys = model.state_dict().keys()
    # mmseg/mmdet 1.x names, so mmseg's Mask2Former checkpoints load as they are
    for key in ("decode_head.pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight",
                "decode_head.pixel_decoder.input_convs.0.gn.weight", "decode_head.pixel_decoder.level_encoding.weight",
                "decode_head.transformer_decoder.layers.2.cross_attn.attn.in_proj_weight",
                "decode_head.transformer_decoder.post_norm.weight", "decode_head.query_feat.weight",
                "decode_head.mask_embed.4.weight", "decode_head.cls_embed.bias"):
        assert key in keys, key
    criterion = Mask2FormerCriterion(NUM_CLASSES, **cfg["criterion"])
    img, label = torch.randn(2, 3, 80, 72), _label()
    start = time.perf_counter()
    model.train()
    out = model(img)
    assert len(out["cls"]) == len(out["masks"]) == 4  # initial queries + 3 decoder layers
    assert out["cls"][0].shape == (2, 8, NUM_CLASSES + 1) and out["masks"][0].shape == (2, 8, 20, 18)
    losses = criterion(out["cls"], out["masks"], label)
    assert sorted(losses) == sorted([f"{p}loss_{t}" for p in ["", "d0.", "d1.", "d2."] for t in ("cls", "mask", "dice")])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for part in (model.backbone, model.decode_head.pixel_decoder, model.decode_head.transformer_decoder,
                 model.decode_head.query_feat):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    model.eval()
    scores = model.predict(img)
    assert scores.shape == (2, NUM_CLASSES, 80, 72) and torch.isfinite(scores).all()
    # softmax over classes without no-object (< 1) times sigmoid masks, summed over the 8 queries
    assert scores.min() >= 0 and scores.sum(1).max() <= 8
    assert time.perf_counter() - start < 20


def test_tiny_mask2former_learns_a_fixed_batch():
    torch.manual_seed(0)
    cfg, model = _tiny()
    criterion = Mask2FormerCriterion(NUM_CLASSES, **cfg["criterion"])
    img, label = torch.randn(2, 3, 48, 48), _label(h=48, w=48, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(4):
        out = model.train()(img)
        total = sum(criterion(out["cls"], out["masks"], label).values())
        opt.zero_grad()
        total.backward()
        opt.step()
        totals.append(total.item())
    assert totals[-1] < totals[0]


def test_linear_assignment_is_optimal():
    rng = np.random.default_rng(0)
    for rows, cols in [(1, 1), (3, 3), (5, 3), (3, 6), (6, 6), (7, 4)]:
        for _ in range(5):
            cost = rng.normal(size=(rows, cols))
            r, c = linear_assignment(cost)
            assert len(r) == min(rows, cols) and len(set(r)) == len(r) and len(set(c)) == len(c)
            assert list(r) == sorted(r)
            if rows >= cols:
                best = min(sum(cost[p[j], j] for j in range(cols)) for p in itertools.permutations(range(rows), cols))
            else:
                best = min(sum(cost[i, p[i]] for i in range(rows)) for p in itertools.permutations(range(cols), rows))
            assert cost[r, c].sum() == pytest.approx(best, abs=1e-9)


def test_point_sample_reads_pixel_centres():
    h = torch.arange(12.0).view(1, 1, 3, 4)
    coords = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3], [1.5 / 4, 1.5 / 3]]])
    torch.testing.assert_close(point_sample(h, coords)[0, 0], torch.tensor([0.0, 11.0, 5.0]))
    corner = torch.zeros(1, 1, 2)  # half a pixel outside the centre of pixel (0, 0)
    assert point_sample(h + 1, corner).item() == pytest.approx(0.25) and point_sample(h + 1, corner, "border") == 1


def test_deformable_attention_samples_the_offset_cells():
    # One level, one head, one point: the weight is 1, so each query returns the value at its sampling location.
    value = torch.randn(1, 4 * 5, 1, 3)
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) / 5, (ys.flatten() + 0.5) / 4], -1)  # (20, 2) as (x, y)
    shifted = centres + torch.tensor([1 / 5, 0.0])  # one cell to the right: past the last column reads zeros
    out = deformable_attention(value, [(4, 5)], shifted.view(1, 20, 1, 1, 1, 2), torch.ones(1, 20, 1, 1, 1))
    grid = value.view(4, 5, 3)
    expected = torch.cat([grid[:, 1:], torch.zeros(4, 1, 3)], 1).reshape(1, 20, 3)
    torch.testing.assert_close(out, expected)


def test_sine_position_encoding_channels():
    pos = sine_position_encoding(2, 3, 4, 8, "cpu")
    assert pos.shape == (2, 16, 3, 4)
    # channel 0 is sin of the normalised row (row 0: 2π/3), channel 8 the same of the column
    assert pos[0, 0, 0, 0].item() == pytest.approx(np.sin(2 * np.pi / 3), abs=1e-5)
    assert pos[0, 8, 0, 0].item() == pytest.approx(np.sin(2 * np.pi / 4), abs=1e-5)


def test_semantic_targets_one_mask_per_present_class():
    label = torch.tensor([[[3, 3, 255], [1, 3, 1]]])
    (classes, masks), = semantic_targets(label)
    assert classes.tolist() == [1, 3]
    assert masks.tolist() == [[[0, 0, 0], [1, 0, 1]], [[1, 1, 0], [0, 1, 0]]]


def _predictions(seed=0, b=2, q=6, h=20, w=18):
    gen = torch.Generator().manual_seed(seed)
    cls = [torch.randn(b, q, NUM_CLASSES + 1, generator=gen) for _ in range(3)]
    masks = [torch.randn(b, q, h, w, generator=gen) * 3 for _ in range(3)]
    return cls, masks


def _losses(fixed_map, hl_map=None, seed=0):
    cls, masks = _predictions()
    torch.manual_seed(seed)
    out = Mask2FormerCriterion(NUM_CLASSES, num_points=200, fixed_map=fixed_map)(cls, masks, _label(), hl_map)
    return {k: v.item() for k, v in out.items()}


# (options, uniform HL logits): a constant map gives plain Mask2Former in every mode. Raw point weights need h = 1:
# sigmoid(0) + 0.5.
UNIFORM_CASES = [
    ({"mode": "point_weights", "normalise": "none", "offset": 0.5}, 0.0),
    ({"mode": "point_weights", "normalise": "mask", "targets": ["mask", "dice"]}, 1.3),
    ({"mode": "point_weights", "normalise": "batch"}, -0.7),
    ({"mode": "point_selection", "beta": 5.0}, 0.4),
    ({"mode": "query_weights", "targets": ["cls", "mask", "dice"]}, 2.0),
]


@pytest.mark.parametrize("options,logit", UNIFORM_CASES)
def test_uniform_map_gives_plain_mask2former(options, logit):
    plain = _losses(None)
    uniform = torch.full((2, 40, 36), logit)  # at another resolution than the masks and the label, as stored maps
    with_map = _losses(options, uniform)
    assert with_map.keys() == plain.keys()
    for key in plain:
        assert with_map[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-6), key
    varied = torch.randn(2, 40, 36, generator=torch.Generator().manual_seed(3)) * 3
    changed = _losses(options, varied)
    assert any(abs(changed[k] - plain[k]) > 1e-4 for k in plain), options


def test_raw_point_weights_scale_the_bce_only():
    plain = _losses(None)
    half = _losses({"mode": "point_weights", "offset": 0.0}, torch.zeros(2, 10, 9))  # h = sigmoid(0) = 0.5
    for key in plain:
        factor = 0.5 if key.endswith("loss_mask") else 1.0
        assert half[key] == pytest.approx(factor * plain[key], rel=1e-6), key


def test_fixed_map_options_are_checked():
    with pytest.raises(ConfigError, match="mode must be one of"):
        FixedMapOptions(mode="pixels")
    with pytest.raises(ConfigError, match="targets for mode point_weights"):
        FixedMapOptions(mode="point_weights", targets=["cls"])
    with pytest.raises(ConfigError, match="normalise must be one of"):
        FixedMapOptions(mode="point_weights", normalise="image")
    with pytest.raises(ConfigError, match="needs the batch's hl_map"):
        _losses({"mode": "point_selection"})


def test_image_without_labels_has_class_loss_only():
    cls, masks = _predictions()
    label = torch.full((2, 80, 72), 255)
    out = Mask2FormerCriterion(NUM_CLASSES, num_points=50)(cls, masks, label)
    assert out["loss_mask"].item() == 0 and out["loss_dice"].item() == 0 and out["loss_cls"].item() > 0


def test_the_mask_count_is_averaged_over_processes(monkeypatch):
    # mmdet's reduce_mean of num_total_masks: where the processes' mean count is twice this one's, the mask and dice
    # losses halve and the class loss stays.
    import hlbench.methods.mask2former_criterion as criterion

    alone = _losses({"mode": "off"})
    monkeypatch.setattr(criterion, "all_reduce_mean", lambda values: {k: v * 2 for k, v in values.items()})
    shared = _losses({"mode": "off"})
    for key in alone:
        expected = alone[key] / 2 if key.endswith(("loss_mask", "loss_dice")) else alone[key]
        assert shared[key] == pytest.approx(expected, rel=1e-5), key
