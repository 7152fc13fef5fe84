"""SyntheticStreets: the embedded default data set of procedurally drawn street scenes (no files needed).

A scene's label layout is a pure function of (seed, split, index); its look additionally depends on the
domain, so "source" and "target" draw the same layouts in two styles (domain generalisation) while train,
val and unlabeled never share a scene (the split enters the seed).

Semi-supervised (`build_synthetic_semisup`): a pool of data.train.num_images slots is split by the seeded rule
of hlbench.data.semisup; a labeled slot i serves train scene i, an unlabeled slot i unlabeled scene i, so no
unlabeled image is ever a labeled one and its label never leaves the generator. data=synthetic with a shipped
split's name in data.split (profile=smoke on a semi-supervised experiment) is split the same way, labelling the
fraction that name states (`stand_in_split`).

The scenes are easy for a tiny CNN overall, but four kinds of pixels stay measurably harder; each pixel's
kinds are recorded in the uint8 bitmask `hard` (HARD_BITS):
  thin        poles (1-3 px wide columns) and wires (1 px lines)
  small       traffic signs and traffic lights
  boundary    within 2 px (Chebyshev distance) of a class change
  confusable  road/sidewalk, vegetation/terrain, car/truck: near-identical colour and texture statistics,
              told apart only by subtle cues (tile lines vs lane marks, blob vs grain texture, box shape)
"""
from __future__ import annotations

import dataclasses
import re

import cv2
import numpy as np
from torch.utils.data import Dataset

from hlbench.data.semisup import Split, resolve_split, shipped_splits, unlabeled_sample
from hlbench.data.transforms import Compose, ToTensor, build_split_pipelines, config_value, sample_rng
from hlbench.errors import ConfigError
from hlbench.labels import IGNORE_INDEX

CLASSES = ("road", "sidewalk", "building", "wire", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "car", "truck")
(ROAD, SIDEWALK, BUILDING, WIRE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY, CAR,
 TRUCK) = range(len(CLASSES))
# Display colours (Cityscapes colours where the class exists there).
PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (190, 153, 153), (153, 153, 153), (250, 170, 30),
           (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (0, 0, 142), (0, 0, 70))
# Class indices into CLASSES.
THIN_CLASSES = (WIRE, POLE)
SMALL_CLASSES = (TRAFFIC_LIGHT, TRAFFIC_SIGN)
CONFUSABLE_PAIRS = ((ROAD, SIDEWALK), (VEGETATION, TERRAIN), (CAR, TRUCK))
HARD_BITS = {"thin": 1, "small": 2, "boundary": 4, "confusable": 8}
BOUNDARY_RADIUS = 2
SPLITS = ("train", "val", "unlabeled")

_VEHICLE_KEYS = tuple(f"vehicle{i}" for i in range(7))
# Render styles. Colours are RGB means before noise and lighting; "fine"/"coarse" are per-class noise
# amplitudes (0-255 units) of per-pixel grain and ~h/24-px blobs, in CLASSES order.
STYLES = {
    "source": {  # sunny day, crisp
        "colours": {
            "road": (112, 110, 108), "sidewalk": (124, 119, 114), "building": (150, 118, 95),
            "wire": (35, 35, 38), "pole": (105, 108, 112), "traffic light": (35, 38, 35),
            "traffic sign": (200, 30, 30), "vegetation": (66, 110, 44), "terrain": (88, 116, 56),
            "sky": (135, 185, 235), "car": (90, 95, 100), "truck": (90, 95, 100),
            "lane": (225, 225, 215), "curb": (150, 146, 140), "tile": (100, 96, 92),
            "window": (60, 70, 85), "car_window": (45, 55, 70), "wheel": (25, 25, 25),
            "sign_red": (200, 30, 30), "sign_blue": (30, 70, 190), "sign_yellow": (230, 190, 30),
            "sign_inner": (235, 235, 235), "lamp_red": (235, 40, 30), "lamp_green": (40, 210, 80),
            "vehicle0": (200, 200, 205), "vehicle1": (240, 240, 240), "vehicle2": (30, 30, 35),
            "vehicle3": (170, 25, 30), "vehicle4": (35, 60, 140), "vehicle5": (95, 100, 105),
            "vehicle6": (190, 170, 120),
        },
        "fine": (9, 5, 6, 2, 3, 3, 3, 10, 7, 2, 3, 3),
        "coarse": (5, 5, 8, 0, 0, 0, 0, 22, 6, 4, 0, 0),
        "sky_gradient": 35.0,  # sky brightens toward the horizon
        "gamma": 1.0,
        "blur": 0.5,
        "fog": None,
    },
    "target": {  # overcast dusk with fog: other palette, grain and blur, same layouts
        "colours": {
            "road": (86, 88, 100), "sidewalk": (100, 101, 112), "building": (118, 120, 140),
            "wire": (25, 25, 30), "pole": (80, 85, 96), "traffic light": (28, 28, 32),
            "traffic sign": (180, 40, 60), "vegetation": (44, 86, 78), "terrain": (84, 98, 66),
            "sky": (205, 172, 160), "car": (80, 80, 90), "truck": (80, 80, 90),
            "lane": (200, 190, 150), "curb": (125, 125, 135), "tile": (78, 78, 90),
            "window": (215, 185, 110), "car_window": (35, 40, 55), "wheel": (18, 18, 22),
            "sign_red": (180, 40, 60), "sign_blue": (40, 80, 170), "sign_yellow": (210, 170, 50),
            "sign_inner": (210, 210, 220), "lamp_red": (255, 60, 40), "lamp_green": (60, 255, 120),
            "vehicle0": (170, 172, 185), "vehicle1": (205, 205, 215), "vehicle2": (25, 25, 32),
            "vehicle3": (140, 30, 45), "vehicle4": (40, 55, 120), "vehicle5": (80, 84, 96),
            "vehicle6": (160, 145, 115),
        },
        "fine": (13, 8, 8, 2, 4, 4, 4, 13, 10, 3, 4, 4),
        "coarse": (8, 8, 10, 0, 0, 0, 0, 20, 9, 6, 0, 0),
        "sky_gradient": -25.0,
        "gamma": 1.25,
        "blur": 0.9,
        "fog": {"strength": 0.45, "rgb": (185, 175, 180)},  # strongest at the horizon (far away)
    },
}
DOMAINS = tuple(STYLES)

_CLASS_BITS = np.zeros(256, np.uint8)
_CLASS_BITS[list(THIN_CLASSES)] |= HARD_BITS["thin"]
_CLASS_BITS[list(SMALL_CLASSES)] |= HARD_BITS["small"]
_CLASS_BITS[[c for pair in CONFUSABLE_PAIRS for c in pair]] |= HARD_BITS["confusable"]


def hardness_mask(label: np.ndarray) -> np.ndarray:
    """Per-pixel HARD_BITS of a uint8 label map; ignored pixels (255) get no class bits."""
    hard = _CLASS_BITS[label]
    kernel = np.ones((2 * BOUNDARY_RADIUS + 1,) * 2, np.uint8)
    # max != min over the window <=> a different class within BOUNDARY_RADIUS (image borders do not count).
    boundary = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
    hard[boundary] |= HARD_BITS["boundary"]
    return hard


class _Canvas:
    """Paint ids drawn with numpy/cv2; each id is (class, style colour key, colour jitter)."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.paints = [(c, name, 1.0) for c, name in enumerate(CLASSES)]
        self.ids = np.full((h, w), SKY, np.int32)

    def paint(self, cls: int, key: str, jitter=1.0) -> int:
        """Registers a colour variant of `cls` and returns its paint id."""
        self.paints.append((cls, key, jitter))
        return len(self.paints) - 1

    def rect(self, y0, y1, x0, x1, pid: int) -> None:
        """Fills rows [y0, y1) x cols [x0, x1), clipped to the canvas (negative indices must not wrap)."""
        y0, y1 = np.clip(np.round([y0, y1]).astype(int), 0, self.h)
        x0, x1 = np.clip(np.round([x0, x1]).astype(int), 0, self.w)
        self.ids[y0:y1, x0:x1] = pid


class _Street:
    """Ground geometry: road and sidewalks widen linearly below the horizon from a vanishing point."""

    def __init__(self, h: int, w: int, rng: np.random.Generator):
        self.h, self.w = h, w
        self.hy = int(h * rng.uniform(0.36, 0.5))
        self.vx = w * rng.uniform(0.3, 0.7)
        aspect = w / h
        self.kl, self.kr = aspect * rng.uniform(0.5, 0.9, 2)  # road half-width growth per row
        self.sl, self.sr = np.array([self.kl, self.kr]) * rng.uniform(0.3, 0.6, 2)  # sidewalk width growth

    def road_edges(self, d):
        """Road's left/right x at `d` rows below the horizon."""
        return self.vx - self.kl * d, self.vx + self.kr * d


def _draw_ground(cv: _Canvas, st: _Street, rng: np.random.Generator) -> None:
    d = np.arange(cv.h, dtype=np.float32)[:, None] - st.hy
    x = np.arange(cv.w, dtype=np.float32)[None, :]
    left, right = st.road_edges(d)
    ground = d >= 0
    road = ground & (x >= left) & (x < right)
    walk = ground & ~road & (x >= left - st.sl * d) & (x < right + st.sr * d)
    ids = cv.ids
    ids[st.hy:] = TERRAIN
    ids[walk] = SIDEWALK
    ids[road] = ROAD
    # Subtle cues separating the confusable road/sidewalk: dashed lane marks vs a curb and tile lines.
    centre = st.vx + (st.kr - st.kl) / 2 * d
    period = max(2, cv.h // 16)
    dash = (d // period) % 2 == 0
    lane = road & dash & (np.abs(x - centre) < 0.012 * (st.kl + st.kr) * d + 0.3)
    ids[lane] = cv.paint(ROAD, "lane")
    curb = walk & ((x < left + 0.5 + 0.2 * st.sl * d) & (x >= left - 0.2 * st.sl * d - 0.5)
                   | (x >= right - 0.5 - 0.2 * st.sr * d) & (x < right + 0.2 * st.sr * d + 0.5))
    tiles = walk & ~curb & (d % max(3, cv.h // 32) == 0)
    ids[curb] = cv.paint(SIDEWALK, "curb")
    ids[tiles] = cv.paint(SIDEWALK, "tile")
    # Bushes on the terrain beyond the sidewalks: vegetation next to its confusable partner.
    for _ in range(rng.integers(0, 4)):
        dc = (cv.h - st.hy) * rng.uniform(0.05, 0.6)
        left_outer = st.vx - (st.kl + st.sl) * dc
        right_outer = st.vx + (st.kr + st.sr) * dc
        fx, ay = rng.uniform(0.15, 0.4), dc * rng.uniform(0.2, 0.5) + 1
        if rng.integers(2):
            span = left_outer
            cx = span * rng.uniform(0.3, 0.7)
        else:
            span = cv.w - right_outer
            cx = right_outer + span * rng.uniform(0.3, 0.7)
        if span >= 4:
            cv2.ellipse(ids, (int(cx), int(st.hy + dc)), (max(1, int(span * fx)), int(ay)), 0, 0, 360,
                        VEGETATION, -1)


def _draw_skyline(cv: _Canvas, st: _Street, rng: np.random.Generator) -> None:
    """Buildings with window grids, tree crowns and gaps of sky along the horizon."""
    hy, x = st.hy, 0
    window = cv.paint(BUILDING, "window")
    while x < cv.w:
        bw = max(2, int(cv.w * rng.uniform(0.07, 0.22)))
        kind = rng.choice(3, p=(0.6, 0.25, 0.15))
        if kind == 0:
            top = int(hy * rng.uniform(0.05, 0.7))
            cv.rect(top, hy, x, x + bw, cv.paint(BUILDING, "building", rng.uniform(0.8, 1.2, 3)))
            py, px = max(3, int(rng.uniform(0.08, 0.15) * hy)), max(3, bw // rng.integers(3, 7))
            ys = np.arange(top + 1, hy - 1)
            xs = np.arange(x + 1, min(x + bw, cv.w) - 1)
            on = ((ys - top) % py < py // 2)[:, None] & ((xs - x) % px < (px + 1) // 2)[None, :]
            cv.ids[ys[:, None], xs[None, :]] = np.where(on, window, cv.ids[ys[:, None], xs[None, :]])
        elif kind == 1:
            cy = int(hy * (1 - rng.uniform(0.15, 0.4)))
            cv2.ellipse(cv.ids, (x + bw // 2, cy), (max(1, int(bw * rng.uniform(0.5, 0.8))),
                                                    max(1, int(hy * rng.uniform(0.15, 0.35)))),
                        0, 0, 360, VEGETATION, -1)
            cv.rect(cy, hy, x + 0.1 * bw, x + 0.9 * bw, VEGETATION)  # foliage down to the ground
        x += bw


def _pole_specs(cv: _Canvas, st: _Street, rng: np.random.Generator) -> list[dict]:
    """1-4 poles on the sidewalks, 1-3 px wide and >= 2 px apart so each stays a thin column."""
    poles = []
    for _ in range(rng.integers(1, 5)):
        side = int(rng.integers(2))
        db = (cv.h - st.hy) * rng.uniform(0.12, 0.95)
        width = int(rng.integers(1, 4))
        xc = st.vx - (st.kl + st.sl / 2) * db if side == 0 else st.vx + (st.kr + st.sr / 2) * db
        x0 = int(round(xc - width / 2))
        top = max(1, int(st.hy + db - db * rng.uniform(1.6, 3.2)))
        attach = rng.choice(3, p=(0.5, 0.3, 0.2))  # sign, light, nothing
        size = min(max(3, int(db * rng.uniform(0.12, 0.2))), int(0.08 * cv.h) + 3)
        shape = int(rng.integers(3))
        colour = ("sign_red", "sign_blue", "sign_yellow")[rng.integers(3)]
        lamp = int(rng.integers(3))
        if 0 <= x0 and x0 + width <= cv.w and all(
                x0 + width + 2 <= p["x0"] or p["x0"] + p["width"] + 2 <= x0 for p in poles):
            poles.append({"side": side, "base": st.hy + db, "x0": x0, "width": width, "top": top,
                          "attach": attach, "size": size, "shape": shape, "colour": colour, "lamp": lamp})
    return poles


def _draw_wires(cv: _Canvas, st: _Street, poles: list[dict], rng: np.random.Generator) -> None:
    """1 px sagging wires between neighbouring pole tops on a side, plus some across the sky."""
    spans = []
    for side in (0, 1):
        tops = sorted((p["x0"], p["top"]) for p in poles if p["side"] == side)
        spans += list(zip(tops[:-1], tops[1:]))
    for _ in range(rng.integers(0, 3)):
        spans.append(((0, int(st.hy * rng.uniform(0.1, 0.7))), (cv.w - 1, int(st.hy * rng.uniform(0.1, 0.7)))))
    t = np.linspace(0, 1, 9)
    for (xa, ya), (xb, yb) in spans:
        sag = cv.h * rng.uniform(0.02, 0.08) * 4 * t * (1 - t)
        pts = np.stack([xa + (xb - xa) * t, ya + (yb - ya) * t + sag], 1).round().astype(np.int32)
        cv2.polylines(cv.ids, [pts.reshape(-1, 1, 2)], False, WIRE, 1, cv2.LINE_8)


def _draw_pole(cv: _Canvas, pole: dict) -> None:
    x0, w, top, s = pole["x0"], pole["width"], pole["top"], pole["size"]
    cv.rect(top, pole["base"], x0, x0 + w, POLE)
    # Attachments hang on the road side of the pole, touching it.
    ax = x0 + w if pole["side"] == 0 else x0 - s
    if pole["attach"] == 0:
        pid, inner = cv.paint(TRAFFIC_SIGN, pole["colour"]), cv.paint(TRAFFIC_SIGN, "sign_inner")
        cx, cy, r = ax + s / 2, top + 1 + s / 2, s / 2
        if pole["shape"] == 0:
            cv2.circle(cv.ids, (int(cx), int(cy)), max(1, int(r)), pid, -1)
            cv2.circle(cv.ids, (int(cx), int(cy)), int(r * 0.45), inner, -1)
        elif pole["shape"] == 1:
            tri = np.array([[ax, top + 1], [ax + s - 1, top + 1], [cx, top + s]], np.int32)
            cv2.fillPoly(cv.ids, [tri], pid)
        else:
            cv.rect(top + 1, top + 1 + s, ax, ax + s, pid)
            cv.rect(top + 1 + s / 3, top + 1 + 2 * s / 3, ax + s / 3, ax + 2 * s / 3, inner)
    elif pole["attach"] == 1:
        lw, lh = max(2, s // 2), s + s // 2
        lx = x0 + w if pole["side"] == 0 else x0 - lw
        cv.rect(top + 1, top + 1 + lh, lx, lx + lw, TRAFFIC_LIGHT)
        key = ("lamp_red", "lamp_red", "lamp_green")[pole["lamp"]]
        ly = top + 1 + pole["lamp"] * lh / 3
        cv.rect(ly, ly + max(1, lh / 3 - 1), lx + lw / 4, lx + lw - lw / 4, cv.paint(TRAFFIC_LIGHT, key))


def _vehicle_spec(cv: _Canvas, st: _Street, rng: np.random.Generator) -> dict:
    """A car or a truck on the road; both use the same colour law so only the shape tells them apart."""
    db = (cv.h - st.hy) * rng.uniform(0.15, 1.05)
    truck = bool(rng.random() < 0.45)
    left, right = st.road_edges(db)
    vw = (right - left) * (rng.uniform(0.32, 0.44) if truck else rng.uniform(0.3, 0.4))
    vh = vw * (rng.uniform(0.85, 1.05) if truck else rng.uniform(0.48, 0.6))
    x0 = left + rng.uniform(0, max(right - left - vw, 0))
    colours = [(_VEHICLE_KEYS[rng.integers(len(_VEHICLE_KEYS))], rng.uniform(0.9, 1.1, 3)) for _ in range(2)]
    return {"truck": truck, "base": st.hy + db, "x0": x0, "vw": vw, "vh": vh, "colours": colours,
            "cab_left": bool(rng.integers(2))}


def _draw_vehicle(cv: _Canvas, v: dict) -> None:
    cls = TRUCK if v["truck"] else CAR
    x0, vw, vh, y1 = v["x0"], v["vw"], v["vh"], v["base"]
    x1, y0 = x0 + vw, y1 - vh
    body = cv.paint(cls, *v["colours"][0])
    window, wheel = cv.paint(cls, "car_window"), cv.paint(cls, "wheel")
    if v["truck"]:
        split = x0 + 0.3 * vw if v["cab_left"] else x1 - 0.3 * vw
        cab = (x0, split) if v["cab_left"] else (split, x1)
        box = (split, x1) if v["cab_left"] else (x0, split)
        cv.rect(y0, y1 - 0.15 * vh, *box, cv.paint(cls, *v["colours"][1]))
        cv.rect(y0 + 0.3 * vh, y1 - 0.15 * vh, *cab, body)
        cv.rect(y0 + 0.36 * vh, y0 + 0.52 * vh, cab[0] + 0.05 * vw, cab[1] - 0.05 * vw, window)
        cv.rect(y1 - 0.15 * vh, y1 - 0.08 * vh, x0, x1, wheel)
        for wx in (0.05, 0.4, 0.78):
            cv.rect(y1 - 0.15 * vh, y1, x0 + wx * vw, x0 + (wx + 0.17) * vw, wheel)
    else:
        cv.rect(y1 - 0.6 * vh, y1 - 0.1 * vh, x0, x1, body)
        cv.rect(y0, y1 - 0.6 * vh, x0 + 0.2 * vw, x1 - 0.2 * vw, body)
        cv.rect(y0 + 0.15 * vh, y1 - 0.62 * vh, x0 + 0.26 * vw, x1 - 0.26 * vw, window)
        for wx in (0.08, 0.72):
            cv.rect(y1 - 0.2 * vh, y1, x0 + wx * vw, x0 + (wx + 0.2) * vw, wheel)


def _layout(h: int, w: int, rng: np.random.Generator) -> tuple[_Canvas, _Street]:
    cv, st = _Canvas(h, w), _Street(h, w, rng)
    _draw_skyline(cv, st, rng)
    _draw_ground(cv, st, rng)
    poles = _pole_specs(cv, st, rng)
    _draw_wires(cv, st, poles, rng)
    vehicles = [_vehicle_spec(cv, st, rng) for _ in range(rng.integers(1, 5))]
    # Painter's order by base row: nearer objects (lower base) occlude farther ones.
    objects = [(p["base"], 0, i) for i, p in enumerate(poles)] + [(v["base"], 1, i) for i, v in enumerate(vehicles)]
    for _, kind, i in sorted(objects):
        if kind == 0:
            _draw_pole(cv, poles[i])
        else:
            _draw_vehicle(cv, vehicles[i])
    return cv, st


def _render(cv: _Canvas, st: _Street, style: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resolves paint ids to (RGB uint8 image, uint8 label) with texture, lighting, fog, gamma and blur."""
    h, w = cv.h, cv.w
    classes = np.array([c for c, _, _ in cv.paints], np.uint8)
    colours = np.array([np.asarray(style["colours"][k], np.float32) * j for _, k, j in cv.paints], np.float32)
    label = classes[cv.ids]
    img = colours[cv.ids]
    fine = rng.standard_normal((h, w), dtype=np.float32)
    cell = max(2, h // 24)
    coarse = cv2.resize(rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    amp_fine = np.asarray(style["fine"], np.float32)[label]
    amp_coarse = np.asarray(style["coarse"], np.float32)[label]
    rows = np.arange(h, dtype=np.float32)[:, None]
    sky = (label == SKY) * (style["sky_gradient"] * np.clip(rows / max(st.hy, 1), 0, 1))
    img += (amp_fine * fine + amp_coarse * coarse + sky)[..., None]
    # Per-scene lighting: overall gain, a left-right shading ramp and a slight colour cast.
    ramp = rng.uniform(0.85, 1.15) * (1 + rng.uniform(-0.25, 0.25) * (np.arange(w, dtype=np.float32) / w - 0.5))
    img *= ramp[None, :, None] * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    if style["fog"] is not None:
        fog = style["fog"]["strength"] * np.exp(-np.abs(rows - st.hy) / (0.2 * h))[..., None]
        img = img * (1 - fog) + np.asarray(style["fog"]["rgb"], np.float32) * fog
    img = np.clip(img, 0, 255)
    if style["gamma"] != 1.0:
        img = 255 * (img / 255) ** style["gamma"]
    img = cv2.GaussianBlur(img, (0, 0), style["blur"])
    return (img + 0.5).astype(np.uint8), label


def _check_split_domain(split: str, domain: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"synthetic split must be one of {SPLITS}, got {split!r}")
    if domain not in STYLES:
        raise ConfigError(f"synthetic domain must be one of {DOMAINS}, got {domain!r}")


def generate_scene(size: tuple[int, int], seed: int, split: str, index: int, domain: str = "source"):
    """One scene as (RGB uint8 H×W×3, label uint8 H×W, hard uint8 H×W); unlabeled: label 255, hard 0."""
    _check_split_domain(split, domain)
    h, w = (int(v) for v in size)
    if h < 16 or w < 16:
        raise ConfigError(f"synthetic size must be at least 16x16 [H, W], got {list(size)}")
    key = [seed, SPLITS.index(split), index]
    # The layout stream ignores the domain, so both styles draw identical label maps.
    cv, st = _layout(h, w, np.random.default_rng(key + [0]))
    img, label = _render(cv, st, STYLES[domain], np.random.default_rng(key + [1 + DOMAINS.index(domain)]))
    if split == "unlabeled":
        return img, np.full_like(label, IGNORE_INDEX), np.zeros_like(label)
    return img, label, hardness_mask(label)


class SyntheticStreets(Dataset):
    """Procedural street scenes; items are the contract's dicts produced by `transform(sample, rng)`.

    Items of the "unlabeled" split are unlabeled samples ({"img", "pad", "index"} before the pipeline).

    Args:
        num_images: the split's scenes are 0..num_images-1.
        size: (H, W) of the generated scenes.
        seed: scene seed; the data set's identity (keep it fixed across runs, like a real data set).
        transform: pipeline from hlbench.data.transforms (default: ToTensor only).
        aug_seed: mixed into each item's augmentation Generator (see transforms.sample_rng).
        scenes: serve only these scene indices, in this order (a split's part); default all of them.
        pregenerate: draw every scene now and serve them from memory. A scene costs ~10 ms to draw on one core,
            more than the rest of a training sample; drawn once in the main process, the arrays are shared by
            the DataLoader workers it forks, which then only augment. (5 bytes a pixel: 65 MB for 512 at 160².)
    """

    def __init__(self, split: str, num_images: int, size=(160, 160), seed: int = 0, domain: str = "source",
                 transform=None, aug_seed: int = 0, scenes=None, pregenerate: bool = False):
        _check_split_domain(split, domain)
        if num_images < 1:
            raise ConfigError(f"synthetic num_images must be >= 1, got {num_images}")
        self.scenes = list(range(num_images)) if scenes is None else [int(i) for i in scenes]
        if not self.scenes or not all(0 <= i < num_images for i in self.scenes):
            raise ConfigError(f"synthetic scenes must be a non-empty subset of 0..{num_images - 1}")
        self.split, self.num_images, self.size = split, int(num_images), tuple(int(v) for v in size)
        self.seed, self.domain, self.aug_seed = int(seed), domain, int(aug_seed)
        self.transform = transform if transform is not None else Compose([ToTensor()])
        self.classes = list(CLASSES)
        self.palette = [tuple(c) for c in PALETTE]
        self.hard_bits = dict(HARD_BITS)
        self.drawn = None
        if pregenerate:
            # One array per field, not a list of small arrays: forked workers then never touch (copy) these pages.
            scenes = [self._draw(i) for i in range(len(self.scenes))]
            self.drawn = tuple(np.stack(field) for field in zip(*scenes))

    def _draw(self, index: int):
        return generate_scene(self.size, self.seed, self.split, self.scenes[index], self.domain)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.scenes):
            raise IndexError(f"index {index} out of range for {len(self.scenes)} synthetic images")
        if self.drawn is None:
            img, label, hard = self._draw(index)
        else:
            img, label, hard = (field[index].copy() for field in self.drawn)
        if self.split == "unlabeled":
            sample = unlabeled_sample(img, index)
        else:
            sample = {"img": img, "label": label, "hard": hard, "index": int(index)}
        return self.transform(sample, sample_rng(self.aug_seed))


def _streets(data_cfg, key: str, split: str, transform, seed: int, scenes=None,
             pregenerate: bool = True) -> SyntheticStreets:
    """The `split` scenes configured by data.<key> ({num_images, size, domain}); drawn up front when
    data.pregenerate and `pregenerate` are both true."""
    cfg = config_value(data_cfg, key, "{num_images, size, domain}", "data")
    return SyntheticStreets(split, config_value(cfg, "num_images", "an int", f"data.{key}"),
                            config_value(cfg, "size", "[H, W]", f"data.{key}"), seed=data_cfg.get("scene_seed", 0),
                            domain=cfg.get("domain", "source"), transform=transform, aug_seed=seed, scenes=scenes,
                            pregenerate=bool(data_cfg.get("pregenerate", False)) and pregenerate)


def build_synthetic(data_cfg, seed: int) -> dict:
    """{"train", "val", "unlabeled"} SyntheticStreets from the data config; `seed` (the run seed) drives augmentation.

    "unlabeled" (as many scenes of the unlabeled stream as train has, through the train pipeline) lets any
    semi-supervised method dry-run on these scenes (profile=smoke) beside the fully labeled train set; the study
    with a labeled fraction is data=synthetic_semisup. Its scenes are generated on access (never up front), so it
    costs nothing unused. With data.split set, the scenes stand in for that split (stand_in_split): "train" is
    its labeled part.
    """
    if (split := stand_in_split(data_cfg)) is not None:
        return _semisup_streets(data_cfg, seed, split)
    pipelines = build_split_pipelines(data_cfg, CLASSES)
    datasets = {split: _streets(data_cfg, split, split, transform, seed) for split, transform in pipelines.items()}
    datasets["unlabeled"] = _streets(data_cfg, "train", "unlabeled", pipelines["train"], seed, pregenerate=False)
    return datasets


def synthetic_split(data_cfg) -> Split:
    """The seeded split of the data.train.num_images pool slots, named "0", "1", ... (scenes have no lists)."""
    if data_cfg.get("split") is not None:
        raise ConfigError(f"data.split={data_cfg.split!r}: synthetic scenes have no split lists; use data.split=null "
                          "with data.split_fraction and data.split_seed")
    pool = config_value(config_value(data_cfg, "train", "{num_images, size, domain}", "data"), "num_images",
                        "an int", "data.train")
    return resolve_split(data_cfg, lambda: [(str(i), None) for i in range(pool)])


def stand_in_split(data_cfg) -> Split | None:
    """data=synthetic standing in for a semi-supervised data set: a dry run (profile=smoke) of an experiment on a
    shipped split, e.g. data.split=u2pl/1_8, labels the same fraction (1/8) of the scene pool by the seeded rule;
    the source says what it stands in for ("seeded(0.125, 0) for u2pl/1_8"). None without data.split."""
    value = data_cfg.get("split")
    if value is None:
        return None
    fraction = re.fullmatch(r"[^/]+/(\d+)_(\d+)", str(value))
    if value not in shipped_splits() or fraction is None:
        raise ConfigError(f"data.split={value!r}: synthetic scenes have no split lists; they stand in only for a "
                          f"shipped split ({', '.join(shipped_splits())}), else use data.split=null")
    split = synthetic_split({"train": data_cfg.get("train"), "split": None, "split_seed": data_cfg.get("split_seed", 0),
                             "split_fraction": int(fraction[1]) / int(fraction[2])})
    return dataclasses.replace(split, source=f"{split.source} for {value}")


def build_synthetic_semisup(data_cfg, seed: int) -> dict:
    """{"train": the labeled slots' scenes, "unlabeled": the unlabeled slots' scenes, "val"}; see the module doc."""
    return _semisup_streets(data_cfg, seed, synthetic_split(data_cfg))


def _semisup_streets(data_cfg, seed: int, split: Split) -> dict:
    pipelines = build_split_pipelines(data_cfg, CLASSES)
    return {"train": _streets(data_cfg, "train", "train", pipelines["train"], seed,
                              scenes=[int(name) for name, _ in split.labeled]),
            "unlabeled": _streets(data_cfg, "train", "unlabeled", pipelines["train"], seed,
                                  scenes=[int(name) for name in split.unlabeled]),
            "val": _streets(data_cfg, "val", "val", pipelines["val"], seed)}
