"""HL-map panels (hlbench/tracking/hl_maps.py): column titles, shared colour scales with colour bars, kinds apart."""
import numpy as np
import pytest

from hlbench.tracking.hl_maps import (NO_KIND_RGB, colorize_kinds, colorize_labels, hl_panel_figure, kind_colours,
                                      save_figure)

PALETTE = [(128, 64, 128), (0, 0, 142), (153, 153, 153)]
BITS = {"thin": 1, "small": 2, "boundary": 4, "confusable": 8}
ALL_TITLES = ["image", "ground truth", "prediction", "HL map h", "CE loss", "hardness kinds, rarest on top"]


def _batch(n=2, h=8, w=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, h, w), dtype=np.uint8)
    hl = rng.uniform(0.1, 1.1, size=(n, 1, h, w)).astype(np.float32)  # N×1×H×W, as the HL head gives it
    labels = rng.integers(0, 3, (n, h, w))
    labels[:, 0] = 255
    preds = rng.integers(0, 3, (n, h, w))
    loss = rng.exponential(size=(n, h, w)).astype(np.float32)
    return images, hl, labels, preds, loss


def _tiles(fig):
    """{column title: [per-row AxesImage]} of a panel figure (colour-bar and legend axes have no image title)."""
    grid = [ax for ax in fig.axes if ax.images and ax.get_subplotspec() is not None]
    ncols = grid[0].get_subplotspec().get_gridspec().ncols
    titles = [ax.get_title() for ax in grid[:ncols]]
    return {t: [ax.images[0] for ax in grid[c::ncols]] for c, t in enumerate(titles)}


def _hard(labels):
    """Most pixels confusable; a few thin pixels that are also confusable, one small block, the rest none."""
    hard = np.full(labels.shape, BITS["confusable"], np.uint8)
    hard[:, 2, :3] |= BITS["thin"]
    hard[:, 5:7, 5:7] = BITS["small"]
    hard[:, 7] = 0
    return hard


def test_panel_has_every_column_titled_and_a_colour_bar_per_map(tmp_path):
    images, hl, labels, preds, loss = _batch(n=3)
    hl[:, 0, 0] = 2.0  # the ignored row: outside the scale, which the labelled pixels set
    fig = hl_panel_figure(labels, preds, PALETTE, images=images, hl=hl, loss=loss, hard=_hard(labels),
                          hard_bits=BITS, max_images=2, title="smoke/pspnet_r18_tiny+hl-s0, iteration 8",
                          class_names=["road", "car", "pole"])
    tiles = _tiles(fig)
    assert list(tiles) == ALL_TITLES and all(len(col) == 2 for col in tiles.values())
    assert fig._suptitle.get_text() == "smoke/pspnet_r18_tiny+hl-s0, iteration 8"
    # HL and loss each get a colour bar that says what it measures
    assert sorted(ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()) == ["CE (nats), capped at p99",
                                                                              "h (learned hardness)"]
    fig.canvas.draw()  # lay out: every row's tiles share one top edge and one height, whatever the column
    for row in zip(*tiles.values()):
        boxes = [im.axes.get_position() for im in row]
        assert max(b.y1 for b in boxes) - min(b.y1 for b in boxes) < 1e-6
        assert max(b.height for b in boxes) - min(b.height for b in boxes) < 1e-6
    # One scale per map column, shared by its rows: the HL bar spans the min..max of the shown maps.
    labelled = labels[:2] != 255
    scored = hl[:2, 0][labelled]
    for im in tiles["HL map h"]:
        assert im.get_clim() == (pytest.approx(float(scored.min())), pytest.approx(float(scored.max())))
    assert tiles["CE loss"][0].get_clim() == (0.0, pytest.approx(float(np.percentile(loss[:2][labelled], 99))))
    classes, kinds = ([t.get_text() for t in legend.get_texts()] for legend in fig.legends)
    assert classes == ["road", "car", "pole", "ignore"]  # every class the ground truth or prediction shows
    assert [t.split()[0] for t in kinds] == [*BITS, "none"]
    assert save_figure(fig, tmp_path / "p.png").stat().st_size > 0


def test_class_legend_names_only_the_classes_shown():
    labels = np.array([[[0, 0], [2, 255]]])
    preds = np.array([[[0, 0], [0, 0]]])
    fig = hl_panel_figure(labels, preds, PALETTE)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["class 0", "class 2", "ignore"]
    colours = [tuple(np.round(255 * np.array(h.get_facecolor()[:3])).astype(int)) for h in legend.legend_handles]
    assert colours == [PALETTE[0], PALETTE[2], (0, 0, 0)]


def test_label_tiles_are_palette_colours_and_ignore_is_black():
    images, hl, labels, preds, loss = _batch(n=1)
    gt = _tiles(hl_panel_figure(labels, preds, PALETTE))["ground truth"][0].get_array()
    assert (np.asarray(gt[0]) == 0).all()
    assert tuple(np.asarray(gt[1, 0])) == PALETTE[labels[0, 1, 0]]
    with pytest.raises(ValueError, match="palette"):
        colorize_labels(labels + 3 * (labels != 255), PALETTE)


def test_kinds_are_drawn_apart_rarest_on_top():
    _, _, labels, _, _ = _batch(n=1)
    hard = _hard(labels)
    colours = kind_colours(BITS)
    order = ["thin", "small", "boundary", "confusable"]
    rgb = colorize_kinds(hard, BITS, order)[0]
    assert tuple(rgb[2, 0]) == colours["thin"]  # thin wins over the confusable bit it shares
    assert tuple(rgb[5, 5]) == colours["small"] and tuple(rgb[3, 3]) == colours["confusable"]
    assert tuple(rgb[7, 0]) == NO_KIND_RGB
    assert len({colours[k] for k in BITS}) == len(BITS)
    # The figure orders by share: confusable (most pixels) goes under the thin pixels it overlaps.
    fig = hl_panel_figure(labels, None, PALETTE, hard=hard, hard_bits=BITS)
    tile = np.asarray(_tiles(fig)["hardness kinds, rarest on top"][0].get_array())
    assert tuple(tile[2, 0]) == colours["thin"]


def test_maps_and_images_at_input_size_are_drawn_at_label_size():
    images, hl, labels, preds, loss = _batch(n=1, h=8, w=12)
    big_img, big_hl = images.repeat(2, 2).repeat(2, 3), hl.repeat(2, 2).repeat(2, 3)
    tiles = _tiles(hl_panel_figure(labels, preds, PALETTE, images=big_img, hl=big_hl))
    assert {np.asarray(col[0].get_array()).shape[:2] for col in tiles.values()} == {(8, 12)}


def test_columns_without_input_are_left_out():
    _, _, labels, preds, _ = _batch(n=1)
    assert list(_tiles(hl_panel_figure(labels, preds, PALETTE, hard=np.zeros((0,))))) == ["ground truth",
                                                                                          "prediction"]
    # A mask whose kinds are unknown is drawn as one binary column.
    tiles = _tiles(hl_panel_figure(labels, None, PALETTE, hard=(labels == 2).astype(np.uint8)))
    assert list(tiles) == ["ground truth", "hardness mask"]
    with pytest.raises(ValueError, match="no images"):
        hl_panel_figure(labels[:0], None, PALETTE)
