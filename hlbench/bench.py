"""Training-speed benchmark: the real training step per model, baseline vs HL, under each speed switch, next to
its FLOPs and the device's compute floor; a torchvision peer, evaluation and data loading in the same run.

    python -m hlbench.bench --models pspnet_r18 deeplabv3plus_r50 --size 256 --batch 2   # CPU: s/step, HL/base
    python -m hlbench.bench --quick                      # the prepared GPU run (< 8 min on one H100/H200)
    python -m hlbench.bench --quick --tiny --device cpu  # the same plan at toy sizes (what CI runs)
    python -m hlbench.bench --flops                      # FLOPs only: the HL share of the breadth rows' models

Every measurement runs on fixed random non-zero data (GEMMs on zeros run faster): a few warm-up steps (the first
one, reported apart, holds torch.compile's compile time and cudnn.benchmark's autotuning), then timed steps; the
steps of the models measured under one switch setting alternate, so a shared machine's drift hits them alike.
Reported are medians. FLOPs come from PyTorch's flop counter (hlbench.flops: conv and matmul, forward + loss +
backward), run once per model on a copy: on the `meta` device for a GPU run (no GPU time or memory), on the CPU
itself for a CPU run (meta's Python kernels are slower than the CPU's). The floor is FLOPs / the datasheet peak of
the setting's precision.
Every model is timed with the data config BENCH_DATA (Cityscapes 769: its 19 classes and normalisation) unless
--overrides names another (--tiny: the smoke profile's synthetic scenes).
Results go to <out>/bench.json and <out>/bench.md, rewritten after every group, so a killed run keeps its rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from .atomic_files import atomic_write
from .compose import compose
from .engine.distributed import plan_batches
from .engine.optim import build_optimizer
from .engine.precision import allow_tf32, autocast
from .errors import ConfigError
from .flops import count_flops, device_name, device_peak
from .labels import IGNORE_INDEX
from .memory import GiB, PeakMemory, estimate_train_memory
from .methods import build_method
from .models import build_model

# The data config every model is timed with: its classes and normalisation (a --overrides data=... replaces it).
BENCH_DATA = "cityscapes_769"
# --tiny: the smoke profile's tiny model of each model's family in its place (hlbench/conf/model/tiny/), at toy sizes.
# --flops with no --models: the models of the authors' breadth rows (Cityscapes backbones, ADE20K transformers,
# SegFormer), each with the data config of its experiment, whose train crop and classes it is counted at.
FLOP_TABLE = [("ocrnet_hr18s", "cityscapes_512x1024"), ("ocrnet_hr18", "cityscapes_512x1024"),
              ("ocrnet_hr48", "cityscapes_512x1024"), ("fcn_hr18s", "cityscapes_512x1024"),
              ("fcn_hr18", "cityscapes_512x1024"), ("bisenetv2", "cityscapes_1024x1024"),
              ("pspnet_mobilenetv2", "cityscapes_512x1024"), ("lraspp_mobilenetv3", "cityscapes_512x1024"),
              ("upernet_resnest101", "cityscapes_769"), ("upernet_resnext101", "cityscapes_769"),
              ("upernet_convnext_b", "cityscapes_769"), ("upernet_convnext_b", "ade20k_640"),
              ("upernet_swin_b", "ade20k_512"), ("upernet_swin_b", "ade20k_640"),
              ("segformer_mit_b0", "ade20k_512_multiple32"), ("segformer_mit_b3", "ade20k_512_multiple32"),
              ("segformer_mit_b5", "ade20k_640_multiple32")]
TINY = {"size": 64, "batch": 2, "warmup": 1, "steps": 1, "eval_hw": (96, 160), "eval_crop": 64, "eval_stride": 48,
        "loader_hw": (128, 256)}


@dataclass(frozen=True)
class Setup:
    """One combination of the speed switches. precision: fp32 (TF32 off) | tf32 (fp32 with TF32 convolutions and
    matmuls: PyTorch's default for cuDNN convolutions, and the reference's A100 runs) | bf16 (autocast)."""
    precision: str = "fp32"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    compile: bool = False

    FLAGS = {"cl": "channels_last", "bm": "cudnn_benchmark", "compile": "compile"}

    @classmethod
    def parse(cls, label: str) -> Setup:
        """"bf16+cl+bm+compile" -> Setup; cl = channels_last, bm = cudnn.benchmark."""
        precision, *flags = label.split("+")
        if precision not in ("fp32", "tf32", "bf16") or not set(flags) <= set(cls.FLAGS):
            raise ConfigError(f"setup {label!r}: expected fp32|tf32|bf16 followed by any of "
                              f"{', '.join('+' + f for f in cls.FLAGS)}")
        return cls(precision, **{cls.FLAGS[f]: True for f in flags})

    @property
    def label(self) -> str:
        return "+".join([self.precision] + [short for short, attr in self.FLAGS.items() if getattr(self, attr)])

    def inactive(self, device: torch.device) -> list[str]:
        """The switches that do nothing on `device`: TF32 and cudnn.benchmark are CUDA switches (bf16 autocast runs
        on a CPU too)."""
        if device.type == "cuda":
            return []
        return (["tf32"] if self.precision == "tf32" else []) + (["bm"] if self.cudnn_benchmark else [])

    def apply(self, device: torch.device) -> None:
        if device.type == "cuda":
            allow_tf32(self.precision != "fp32")
            torch.backends.cudnn.benchmark = self.cudnn_benchmark

    @property
    def autocast_precision(self) -> str:
        return "bf16" if self.precision == "bf16" else "fp32"


def _data_choice(overrides) -> list[str]:
    return [] if any(o.startswith("data=") for o in overrides) else [f"data={BENCH_DATA}"]


def bench_config(model_name: str, hl: bool, overrides=()):
    """The run config a model is timed with: BENCH_DATA unless the overrides name a data config, random weights
    (they time the same as ImageNet ones, so no weights file is needed)."""
    return compose([f"model={model_name}", *_data_choice(overrides), "model.backbone.pretrained=none",
                    f"hl.enabled={hl}", "logger=none", *overrides])


def bench_data(overrides=()):
    """The data config of the bench (its classes and normalisation), for what is timed without a model config."""
    return compose([*_data_choice(overrides), *overrides]).data


def parse_size(text: str):
    """--size: "769" (a square crop, an int) or "512x1024" (H x W, a pair)."""
    h, _, w = str(text).partition("x")
    if not h.isdigit() or (w and not w.isdigit()):
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected a crop like 769 or 512x1024 (H x W)")
    return (int(h), int(w)) if w else int(h)


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _size_label(size) -> str:
    if size is None:
        return "each model's data crop"
    h, w = _hw(size)
    return f"{h}²" if h == w else f"{h}×{w}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_bench_model(cfg, batch: int, device: torch.device):
    """(model in train mode, set-up method) of a bench config, built on `device` (meta: shapes only)."""
    with torch.device(device):
        model = build_model(cfg.model, num_classes=int(cfg.data.num_classes), hl=cfg.hl).train()
    method = build_method(cfg)
    method.setup(model, plan_batches({"labeled": (batch, "--batch")}, 1, batch))
    return model, method


def _counting_device(device: torch.device) -> torch.device:
    """Where FLOPs are counted (see the module docstring)."""
    return torch.device("meta") if device.type == "cuda" else torch.device("cpu")


def _random_batch(batch: int, size, device: torch.device, channels_last: bool, num_classes: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h, w = _hw(size)
    img = torch.randn(batch, 3, h, w, generator=g).to(device)
    label = torch.randint(0, num_classes, (batch, h, w), generator=g).to(device)
    return {"img": img.contiguous(memory_format=torch.channels_last) if channels_last else img, "label": label}


def train_step_flops(cfg, data: dict, batch: int) -> int:
    """FLOPs of one training step (the method's step and backward) of a bench config on `data`, counted on the
    device the data lie on (meta: shapes only)."""
    model, method = build_bench_model(cfg, batch, data["img"].device)

    def step():
        loss, _ = method.step(model, {"labeled": data}, 0)
        loss.backward()
    return count_flops(step)


def _timed_step(step, loss_fn) -> float:
    """Seconds of one training step of `step` (a TrainStep or PeerStep): `loss_fn()` under its setup, backward,
    optimiser step, with the device synchronised at both ends."""
    step.setup.apply(step.device)
    _sync(step.device)
    t0 = time.perf_counter()
    step.optimizer.zero_grad(set_to_none=True)
    with autocast(step.device, step.setup.autocast_precision):
        loss = loss_fn()
    loss.backward()
    step.optimizer.step()
    _sync(step.device)
    return time.perf_counter() - t0


class TrainStep:
    """One model config's training step (the method's step, backward, optimiser step) on fixed random data;
    calling it runs and times one step (seconds). `flops` is the step's count, from the same code on a copy."""

    def __init__(self, model_name: str, hl: bool, size: int, batch: int, device: torch.device,
                 setup: Setup = Setup(), hl_head_channels: int | None = None, overrides=(), counts: dict | None = None):
        """counts: FLOP counts and memory estimates already made (a Context's), by what they depend on, so that groups
        measuring the same model share them; None: this step's own."""
        self.key = (model_name, hl, hl_head_channels, tuple(overrides), size, batch)
        self.counts = {} if counts is None else counts
        channels = "null" if hl_head_channels is None else hl_head_channels
        self.cfg = bench_config(model_name, hl, (*overrides, f"hl.head_channels={channels}",
                                                 f"train.precision={setup.autocast_precision}"))
        self.device, self.setup, self.size, self.batch = device, setup, size, batch
        self.model, self.method = build_bench_model(self.cfg, batch, device)
        if setup.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.method.param_groups(self.model), self.cfg.optim)
        self.train_model = torch.compile(self.model) if setup.compile else self.model
        self.data = _random_batch(batch, size, device, setup.channels_last, int(self.cfg.data.num_classes))
        if ("flops", self.key) not in self.counts:
            self.counts["flops", self.key] = self._count_flops()
        self.flops = self.counts["flops", self.key]

    def _count_flops(self) -> int:
        device = _counting_device(self.device)
        return train_step_flops(self.cfg, {k: v.to(device) for k, v in self.data.items()}, self.batch)

    def memory_estimate_gib(self) -> float:
        key = ("memory", *self.key, self.setup.autocast_precision)
        if key not in self.counts:
            self.counts[key] = estimate_train_memory(self.cfg, int(self.cfg.data.num_classes), self.batch,
                                                     _hw(self.size)).total / GiB
        return self.counts[key]

    def __call__(self) -> float:
        return _timed_step(self, lambda: self.method.step(self.train_model, {"labeled": self.data}, 0)[0])


class PeerStep:
    """The peer: torchvision's deeplabv3_resnet101 (random init, aux head) trained as its reference scripts do,
    CE + 0.5 aux CE and SGD (lr 0.01, momentum 0.9, weight decay 1e-4), in a plain loop."""

    name = "torchvision deeplabv3_resnet101"

    def __init__(self, size: int, batch: int, device: torch.device, num_classes: int, setup: Setup = Setup(),
                 counts: dict | None = None):
        self.device, self.setup, self.num_classes = device, setup, num_classes
        counts = {} if counts is None else counts
        self.model = self._build(device)
        if setup.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.train_model = torch.compile(self.model) if setup.compile else self.model
        self.data = _random_batch(batch, size, device, setup.channels_last, num_classes)
        key = ("flops", "peer", size, batch, num_classes)
        if key not in counts:
            counting = _counting_device(device)
            copy = self._build(counting)
            data = {k: v.to(counting) for k, v in self.data.items()}
            counts[key] = count_flops(lambda: self._loss(copy, data).backward())
        self.flops = counts[key]

    def _build(self, device):
        from torchvision.models.segmentation import deeplabv3_resnet101
        with torch.device(device):
            return deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=self.num_classes,
                                       aux_loss=True).train()

    @staticmethod
    def _loss(model, data):
        out = model(data["img"])
        return (F.cross_entropy(out["out"], data["label"], ignore_index=IGNORE_INDEX)
                + 0.5 * F.cross_entropy(out["aux"], data["label"], ignore_index=IGNORE_INDEX))

    def __call__(self) -> float:
        return _timed_step(self, lambda: self._loss(self.train_model, self.data))


def time_steps(steps: dict, warmup: int, iters: int, device: torch.device) -> dict[str, dict]:
    """{name: {"first_s", "median_s", "peak_gib"}} for callables that run and time one step each.

    Peak memory is per step, measured over its own warm-up (which touches every buffer it needs); the timed steps
    of all of them then alternate.
    """
    peak, out = PeakMemory(device), {}
    for name, step in steps.items():
        peak.reset()
        first = step()
        for _ in range(warmup - 1):
            step()
        out[name] = {"first_s": first, "peak_gib": peak.gib()}
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            times[name].append(step())
    for name in steps:
        out[name]["median_s"] = statistics.median(times[name])
    return out


@dataclass
class Member:
    """A model of a group: "model" is a model config name, or "peer" for the torchvision loop."""
    model: str
    hl: bool = False
    hl_head_channels: int | None = None

    @property
    def name(self) -> str:
        if self.model == "peer":
            return PeerStep.name
        return self.model + ("+HL" if self.hl else "") + (f"(HL {self.hl_head_channels} ch)"
                                                          if self.hl_head_channels else "")


@dataclass
class Group:
    """Models timed together (alternating) under one setup; kind: train | components | eval | loader | flops (counted
    only, with the data config `data` where given)."""
    kind: str
    setup: Setup = Setup()
    members: list[Member] = field(default_factory=list)
    data: str | None = None
    steps: int | None = None     # timed steps, at most the run's --steps (None: --steps)
    reserve_s: float = 15.0      # run only while at least this much of the time budget is left

    @property
    def title(self) -> str:
        return f"{self.kind} {self.setup.label}: " + ", ".join(m.name for m in self.members)


def quick_plan(models, light_channels: int = 64) -> list[Group]:
    """The prepared GPU run: per model the reference's precision, each switch alone on the HL model, all eager
    switches together with baseline, HL and the light HL head, the per-component times; then the peer,
    evaluation, loading, and last torch.compile (the most expensive to try)."""
    groups = []
    for m in models:
        base, hl = Member(m), Member(m, True)
        groups += [Group("train", Setup("tf32"), [base, hl]),
                   Group("train", Setup("fp32"), [hl], steps=3),
                   Group("train", Setup("bf16"), [hl]),
                   Group("train", Setup("bf16", cudnn_benchmark=True), [hl]),
                   Group("train", Setup("bf16", channels_last=True), [hl]),
                   Group("train", Setup("bf16", True, True), [base, hl, Member(m, True, light_channels)]),
                   Group("components", Setup("bf16", True, True), [hl])]
    groups += [Group("train", Setup("tf32"), [Member("peer")]),
               Group("train", Setup("bf16", True, True), [Member("peer")]),
               Group("eval", Setup("tf32", cudnn_benchmark=True), [Member(models[0], True)]),
               Group("loader")]
    groups += [Group("train", Setup("bf16", True, True, True), [Member(m, True)], reserve_s=150) for m in models]
    groups += [Group("train", Setup("bf16", True, True, True), [Member(m)], reserve_s=150) for m in models]
    return groups


def cli_plan(args) -> list[Group]:
    members = lambda m: [Member(m), Member(m, True)] + ([Member(m, True, args.light_channels)]  # noqa: E731
                                                         if args.light_channels else [])
    groups = [Group("train", Setup.parse(s), members(m)) for m in args.models for s in args.setups]
    if args.components:
        groups += [Group("components", Setup.parse(args.setups[-1]), [Member(m, True)]) for m in args.models]
    if args.peer:
        groups += [Group("train", Setup.parse(s), [Member("peer")]) for s in args.setups]
    if args.eval and args.models:
        groups.append(Group("eval", Setup.parse(args.setups[0]), [Member(args.models[0], True)]))
    if args.loader:
        groups.append(Group("loader"))
    return groups


# ---------------------------------------------------------------------------------------------------------------
# Measurements: each returns a list of result rows (dicts).

def _derived(row: dict, flops: int, seconds: float, batch: int, device: str, precision: str) -> dict:
    peak = device_peak(device, precision)
    row.update({"tflop_per_step": flops / 1e12, "images_per_s": batch / seconds,
                "achieved_tflops": flops / seconds / 1e12,
                "peak_tflops": peak / 1e12 if peak else None,
                "fraction_of_peak": flops / seconds / peak if peak else None,
                "floor_ms": flops / peak * 1e3 if peak else None})
    return row


def measure_train(group: Group, ctx) -> list[dict]:
    steps, members = {}, {}
    for m in group.members:
        if m.model == "peer":
            steps[m.name] = PeerStep(ctx.peer_size or ctx.size, ctx.batch, ctx.device,
                                     int(bench_data(ctx.overrides).num_classes), group.setup, ctx.counts)
        else:
            steps[m.name] = TrainStep(m.model, m.hl, ctx.size, ctx.batch, ctx.device, group.setup, m.hl_head_channels,
                                      ctx.overrides, ctx.counts)
        members[m.name] = m
    timed = time_steps(steps, ctx.warmup, min(group.steps or ctx.steps, ctx.steps), ctx.device)
    rows = []
    for name, t in timed.items():
        m, step = members[name], steps[name]
        row = {"kind": "train", "name": name, "model": m.model, "hl": m.hl, "hl_head_channels": m.hl_head_channels,
               "setup": group.setup.label, "batch": ctx.batch,
               "size": (ctx.peer_size or ctx.size) if m.model == "peer" else ctx.size,
               "ms_per_step": t["median_s"] * 1e3,
               "first_step_s": t["first_s"], "peak_gib": t["peak_gib"],
               "estimated_gib": step.memory_estimate_gib() if isinstance(step, TrainStep) else None}
        if group.setup.compile:
            row["compile_s"] = t["first_s"] - t["median_s"]
        rows.append(_derived(row, step.flops, t["median_s"], ctx.batch, ctx.device_name, group.setup.precision))
    return rows


def measure_components(group: Group, ctx) -> list[dict]:
    """Forward + backward of each part of an HL model alone, as in training: backbone, decode and aux heads with
    their input gradient (it flows on to the backbone), the HL head on detached features (no input gradient)."""
    m = group.members[0]
    step = TrainStep(m.model, True, ctx.size, ctx.batch, ctx.device, group.setup, m.hl_head_channels, ctx.overrides,
                     ctx.counts)
    model, img = step.model, step.data["img"]
    with torch.no_grad(), autocast(ctx.device, group.setup.autocast_precision):
        feats = model.backbone(img)
    counting = _counting_device(ctx.device)
    copy, _ = build_bench_model(step.cfg, step.batch, counting)

    def part(name, with_input_grad):
        def run(model, img, feats):
            if name == "backbone":
                outs = model.backbone(img)
            else:
                inputs = tuple(f.detach().requires_grad_(with_input_grad) for f in feats)
                out = getattr(model, name)(inputs)
                outs = out.values() if isinstance(out, dict) else [out]  # a list of aux heads: one per head
            sum(o.float().mean() for o in outs).backward()
        return run

    parts = {"backbone": part("backbone", True), "decode_head": part("decode_head", True),
             "auxiliary_head": part("auxiliary_head", True), "hl_head": part("hl_head", False)}
    parts = {k: v for k, v in parts.items() if k == "backbone" or getattr(model, k) is not None}
    # The count runs without autocast: fp32 copies of bf16 features (FLOPs do not depend on the dtype).
    copy_img, copy_feats = img.float().to(counting), tuple(f.float().to(counting) for f in feats)

    def timer(run):
        def call():
            group.setup.apply(ctx.device)
            _sync(ctx.device)
            t0 = time.perf_counter()
            with autocast(ctx.device, group.setup.autocast_precision):
                run(model, img, feats)
            _sync(ctx.device)
            return time.perf_counter() - t0
        return call

    # The whole step alternates with its parts, so what they leave out (losses, upsampling, optimiser) is timed
    # under the same conditions.
    timed = time_steps({**{k: timer(v) for k, v in parts.items()}, "full step": step}, ctx.warmup,
                       group.steps or ctx.steps, ctx.device)
    counts = {name: count_flops(lambda run=run: run(copy, copy_img, copy_feats)) for name, run in parts.items()}
    counts["full step"] = step.flops
    rows = []
    for name, flops in counts.items():
        row = {"kind": "components", "name": name, "model": m.model, "setup": group.setup.label, "batch": ctx.batch,
               "size": ctx.size, "ms_per_step": timed[name]["median_s"] * 1e3}
        rows.append(_derived(row, flops, timed[name]["median_s"], ctx.batch, ctx.device_name, group.setup.precision))
    return rows


class _RandomImages(torch.utils.data.Dataset):
    """Val items of a given image size (labels at the original size, as a test-time resize leaves them), with no
    hardness mask."""

    hard_bits: dict[str, int] = {}

    def __init__(self, n, img_hw, label_hw, num_classes: int):
        self.n, self.img_hw, self.label_hw, self.num_classes = n, img_hw, label_hw, num_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"img": torch.randint(0, 256, (3, *self.img_hw), generator=g, dtype=torch.uint8),
                "label": torch.randint(0, self.num_classes, self.label_hw, generator=g), "hard": torch.empty(0),
                "index": i}


def measure_eval(group: Group, ctx) -> list[dict]:
    """hlbench's evaluator on Cityscapes-sized images with the 769 protocol (slide windows, logits averaged)."""
    from .engine.evaluator import evaluate
    from .models.segmentor import window_starts

    m = group.members[0]
    cfg = bench_config(m.model, True, ctx.overrides)
    model = build_bench_model(cfg, 2, ctx.device)[0]
    h, w = ctx.eval_hw
    crop, stride = [ctx.eval_crop] * 2, [ctx.eval_stride] * 2
    eval_cfg = OmegaConf.create({"mode": "slide", "crop": crop, "stride": stride, "window_batch": 8,
                                 "batch_size": 1, "hl_auroc": False})
    n_classes = int(cfg.data.num_classes)
    group.setup.apply(ctx.device)
    classes = [str(c) for c in range(n_classes)]
    evaluate(model, _RandomImages(1, (h, w), (h - 1, w - 1), n_classes), eval_cfg, cfg.data, ctx.device,
             classes)  # warm-up
    n = ctx.eval_images
    _sync(ctx.device)
    t0 = time.perf_counter()
    evaluate(model, _RandomImages(n, (h, w), (h - 1, w - 1), n_classes), eval_cfg, cfg.data, ctx.device, classes)
    _sync(ctx.device)
    seconds = (time.perf_counter() - t0) / n
    counting = _counting_device(ctx.device)
    copy = build_bench_model(cfg, 2, counting)[0].eval()
    img = torch.zeros(1, 3, h, w, device=counting)
    flops = count_flops(lambda: copy.predict(img, "slide", crop, stride, 8))
    windows = len(window_starts(h, crop[0], stride[0])) * len(window_starts(w, crop[1], stride[1]))
    row = {"kind": "eval", "name": f"{m.model} slide {crop[0]}/{stride[0]}", "model": m.model,
           "setup": group.setup.label, "image": f"{h}x{w}", "windows_per_image": windows, "images": n,
           "s_per_image": seconds, "cityscapes_val_min": seconds * 500 / 60}
    return [_derived(row, flops, seconds, 1, ctx.device_name, group.setup.precision)]


def measure_flops(group: Group, ctx) -> list[dict]:
    """Each member's train-step FLOPs per image, counted on `meta` (nothing built on the device, nothing timed), at
    --size or else the data config's train crop."""
    rows = []
    for m in group.members:
        channels = "null" if m.hl_head_channels is None else m.hl_head_channels
        data = [f"data={group.data}"] if group.data else []
        cfg = bench_config(m.model, m.hl, (*ctx.overrides, *data, f"hl.head_channels={channels}"))
        hw = _hw(ctx.size if ctx.size is not None else cfg.data.train_pipeline.crop)
        flops = train_step_flops(cfg, _random_batch(ctx.batch, hw, torch.device("meta"), False,
                                                    int(cfg.data.num_classes)), ctx.batch)
        rows.append({"kind": "flops", "name": m.name, "model": m.model, "hl": m.hl,
                     "hl_head_channels": m.hl_head_channels, "data": group.data or BENCH_DATA,
                     "size": _size_label(hw), "batch": ctx.batch, "tflop_per_image": flops / ctx.batch / 1e12})
    return rows


def measure_loader(group: Group, ctx) -> list[dict]:
    """The loader benchmark (decode + the Cityscapes 769 train pipeline, one core) on mock scenes, decoding every time
    and through data.decoded_cache."""
    from .data.loader_bench import loader_rate
    from .data.mock import write_mock
    from .data.prepare import prepare_labels

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        write_mock("cityscapes", root, ctx.loader_images, ctx.loader_hw)
        prepare_labels("cityscapes", root)
        rates = {"": loader_rate("cityscapes", root, ctx.loader_items),
                 ", decoded cache": loader_rate("cityscapes", root, ctx.loader_items,
                                                decoded_cache=Path(tmp) / "decoded")}
    size = "x".join(map(str, ctx.loader_hw)) if ctx.loader_hw else "1024x2048"
    return [{"kind": "loader", "name": f"cityscapes_769 pipeline, mock {size} PNGs{via}", "items_per_s_per_core": rate,
             "ms_per_item": 1000 / rate, "items": ctx.loader_items} for via, rate in rates.items()]


MEASURE = {"train": measure_train, "components": measure_components, "eval": measure_eval, "loader": measure_loader,
           "flops": measure_flops}


# ---------------------------------------------------------------------------------------------------------------
# Report

def _f(v, fmt="{:.1f}"):
    return "n/a" if v is None else fmt.format(v)


def _setup(row: dict) -> str:
    inactive = row.get("inactive_switches")
    return row["setup"] + (f" ({', '.join(inactive)} inactive here)" if inactive else "")


def markdown(result: dict) -> str:
    env, rows = result["env"], result["rows"]
    mem = "peak GiB (CUDA max allocated)" if env["device"].startswith("cuda") else "peak GiB (process RSS)"
    lines = [f"# hlbench.bench — {env['device_name']}", "",
             f"- command: `{env['command']}`", f"- date: {env['date']}", f"- torch {env['torch']}, batch "
             f"{env['batch']}, crop {_size_label(env['size'])}, {env['warmup']} warm-up + {env['steps']} timed steps (median)"
             + (f", overrides {' '.join(env['overrides'])}" if env["overrides"] else ""),
             "- floor = counted train-step FLOPs / datasheet peak of the setup's precision", ""]
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        lines += ["## Training step", "",
                  f"| model | setup | ms/step | img/s | {mem} | est. GiB | TFLOP/step | TFLOP/s | % of peak | "
                  "floor ms | first step s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in train:
            pct = None if r["fraction_of_peak"] is None else 100 * r["fraction_of_peak"]
            lines.append(f"| {r['name']} | {_setup(r)} | {r['ms_per_step']:.1f} | {r['images_per_s']:.2f} | "
                         f"{_f(r['peak_gib'], '{:.2f}')} | {_f(r['estimated_gib'], '{:.2f}')} | "
                         f"{r['tflop_per_step']:.3f} | {r['achieved_tflops']:.2f} | {_f(pct)} | {_f(r['floor_ms'])} | "
                         f"{r['first_step_s']:.1f} |")
        cost = []
        for r in train:
            base = next((b for b in train if b["model"] == r["model"] and b["setup"] == r["setup"] and not b["hl"]),
                        None)
            if r["hl"] and base is not None:
                head = f"{r['hl_head_channels']} ch" if r["hl_head_channels"] else "copy of the decode head"
                cost.append(f"| {r['model']} | {_setup(r)} | {head} | {r['ms_per_step'] / base['ms_per_step']:.3f} "
                            f"| {r['tflop_per_step'] / base['tflop_per_step']:.3f} |")
        if cost:
            lines += ["", "## HL cost (HL step / baseline step, same setup)", "",
                      "| model | setup | HL head | time ratio | FLOP ratio |", "|---|---|---|---:|---:|", *cost]
        peers = [r for r in train if r["model"] == "peer"]
        hl_rows = [r for r in train if r["hl"] and not r["hl_head_channels"]]
        ours = [max((r for r in hl_rows if r["model"] == m), key=lambda r: r["images_per_s"])
                for m in dict.fromkeys(r["model"] for r in hl_rows)]  # each model's fastest setup
        if peers and ours:
            best_peer = max(peers, key=lambda r: r["images_per_s"])
            lines += ["", "## Against the torchvision loop", "",
                      "| hlbench + HL, fastest setup | setup | img/s | × peer best "
                      f"({best_peer['setup']}, {best_peer['images_per_s']:.2f} img/s) | × peer at torch defaults |",
                      "|---|---|---:|---:|---:|"]
            default = next((p for p in peers if p["setup"] == "tf32"), None)
            for r in ours:
                vs_default = r["images_per_s"] / default["images_per_s"] if default else None
                lines.append(f"| {r['model']} | {_setup(r)} | {r['images_per_s']:.2f} | "
                             f"{r['images_per_s'] / best_peer['images_per_s']:.2f} | {_f(vs_default, '{:.2f}')} |")
    comps = [r for r in rows if r["kind"] == "components"]
    for model in dict.fromkeys(r["model"] for r in comps):
        part = [r for r in comps if r["model"] == model]
        step = next((r for r in part if r["name"] == "full step"), None)
        part = [r for r in part if r is not step]
        t_all, f_all = sum(r["ms_per_step"] for r in part), sum(r["tflop_per_step"] for r in part)
        lines += ["", f"## Where the time goes: {model}+HL, {_setup(part[0])} (forward + backward of each part "
                  "alone)", "", "| part | ms | time share | GFLOP | FLOP share | TFLOP/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in part:
            lines.append(f"| {r['name']} | {r['ms_per_step']:.1f} | {100 * r['ms_per_step'] / t_all:.1f} % | "
                         f"{r['tflop_per_step'] * 1e3:.1f} | {100 * r['tflop_per_step'] / f_all:.1f} % | "
                         f"{r['achieved_tflops']:.2f} |")
        if step:
            lines.append(f"| rest of the step (losses, upsampling, optimiser; whole step {step['ms_per_step']:.1f} ms) "
                         f"| {step['ms_per_step'] - t_all:.1f} | | | | |")
    evals = [r for r in rows if r["kind"] == "eval"]
    if evals:
        lines += ["", "## Evaluation (hlbench evaluator, fp32)", "", "| model, protocol | setup | image | windows | "
                  "s/image | Cityscapes val (500) min | TFLOP/s |", "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['name']} | {_setup(r)} | {r['image']} | {r['windows_per_image']} | {r['s_per_image']:.3f} | "
                  f"{r['cityscapes_val_min']:.1f} | {r['achieved_tflops']:.2f} |" for r in evals]
    loaders = [r for r in rows if r["kind"] == "loader"]
    if loaders:
        fastest = max((r["images_per_s"] for r in train if r["hl"] and r["model"] != "peer"), default=None)
        lines += ["", "## Data loading (one core)", "", "| pipeline | items/s per core | ms/item | workers for the "
                  "fastest HL step |", "|---|---:|---:|---:|"]
        for r in loaders:
            workers = fastest / r["items_per_s_per_core"] if fastest else None
            lines.append(f"| {r['name']} | {r['items_per_s_per_core']:.1f} | {r['ms_per_item']:.1f} | "
                         f"{_f(workers)} |")
    flop_rows = [r for r in rows if r["kind"] == "flops"]
    if flop_rows:
        lines += ["", "## HL FLOP share (train step per image, counted on meta; HL share = the HL branch's part of "
                  "the HL step)", "", "| model | data | crop | baseline TFLOP | + HL (ratio) | HL share | + light HL |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for model, data in dict.fromkeys((r["model"], r["data"]) for r in flop_rows):
            part = [r for r in flop_rows if (r["model"], r["data"]) == (model, data)]
            base = next(r["tflop_per_image"] for r in part if not r["hl"])
            hl = next((r["tflop_per_image"] for r in part if r["hl"] and not r["hl_head_channels"]), None)
            light = next((r for r in part if r["hl_head_channels"]), None)
            lines.append(f"| {model} | {data} | {part[0]['size']} | {base:.3f} | "
                         + (f"{hl:.3f} ({hl / base:.3f}×) | {100 * (hl - base) / hl:.1f} % | " if hl else "n/a | n/a | ")
                         + (f"{light['tflop_per_image'] / base:.3f}× ({light['hl_head_channels']} ch) |" if light
                            else "n/a |"))
    if result["skipped"] or result["failed"]:
        lines += ["", "## Not measured", ""] + [f"- {s['group']}: {s['reason']}" for s in result["skipped"]]
        lines += [f"- {f['group']}: FAILED, {f['error']}" for f in result["failed"]]
    return "\n".join(lines) + "\n"


@dataclass
class Context:
    device: torch.device
    device_name: str
    size: int | tuple | None   # a square crop, (H, W), or None (--flops: each model's data crop)
    batch: int
    warmup: int
    steps: int
    overrides: tuple = ()
    eval_hw: tuple = (1025, 2049)
    eval_crop: int = 769
    eval_stride: int = 513
    eval_images: int = 4
    loader_hw: tuple | None = None
    loader_images: int = 4
    loader_items: int = 16
    tiny: bool = False
    peer_size: int | None = None  # None: the models' crop
    counts: dict = field(default_factory=dict)  # FLOP counts and memory estimates, shared by the groups


def run_plan(groups: list[Group], ctx: Context, out: Path, budget_s: float | None, command: str) -> dict:
    start = time.perf_counter()
    result = {"env": {"command": command, "date": datetime.now().isoformat(timespec="seconds"),
                      "device": str(ctx.device), "device_name": ctx.device_name, "torch": torch.__version__,
                      "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "size": ctx.size,
                      "batch": ctx.batch, "warmup": ctx.warmup, "steps": ctx.steps, "threads": torch.get_num_threads(),
                      "overrides": list(ctx.overrides),
                      "budget_s": budget_s},
              "rows": [], "skipped": [], "failed": []}
    for group in groups:
        inactive = group.setup.inactive(ctx.device) if group.kind != "loader" else []
        reason = None
        if inactive and not ctx.tiny:
            reason = f"{'+'.join(inactive)} need(s) CUDA"
        elif group.setup.compile and ctx.tiny:
            reason = "torch.compile is not tried at --tiny sizes (its compile time is the point)"
        left = None if budget_s is None else budget_s - (time.perf_counter() - start)
        if reason is None and left is not None and left < group.reserve_s:
            reason = f"time budget: {left:.0f} s left, the group needs ~{group.reserve_s:.0f} s"
        if reason:
            result["skipped"].append({"group": group.title, "reason": reason})
            print(f"skipped {group.title}: {reason}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            rows = MEASURE[group.kind](group, ctx)
        except Exception as err:  # noqa: BLE001 - one failing switch (e.g. out of memory) must not lose the run
            result["failed"].append({"group": group.title, "error": f"{type(err).__name__}: {err}"})
            print(f"FAILED {group.title}: {type(err).__name__}: {err}", flush=True)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for r in rows:
            if inactive:  # --tiny on a CPU: the plan's code runs, these switches do nothing
                r["inactive_switches"] = inactive
        result["rows"] += rows
        for r in rows:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if v is not None}
            print(json.dumps(shown), flush=True)
        print(f"# {group.title}: {time.perf_counter() - t0:.1f} s", flush=True)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        result["env"]["elapsed_s"] = time.perf_counter() - start
        write_results(result, out)
    write_results(result, out)
    return result


def write_results(result: dict, out: Path) -> None:
    atomic_write(out / "bench.json", lambda p: p.write_text(json.dumps(result, indent=1)))
    atomic_write(out / "bench.md", lambda p: p.write_text(markdown(result)))


def main(argv=None) -> dict:
    import sys

    p = argparse.ArgumentParser(prog="python -m hlbench.bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=None, help="model configs (default: pspnet_r18 deeplabv3plus_r50; "
                   "--quick: pspnet_r101 deeplabv3plus_r101); none: only --peer, --loader")
    p.add_argument("--size", type=parse_size, default=None, help="crop, 769 or 512x1024 (H x W) (default 256; "
                   "--quick 769; --flops each model's data crop)")
    p.add_argument("--batch", type=int, default=None, help="images per step, >= 2 (default 2; --quick 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; --quick 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, >= 1 (default 2; --quick 3)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--setups", nargs="+", default=None,
                   help="switch settings, e.g. fp32 tf32 bf16+cl+bm+compile (default: fp32 on CPU, tf32 bf16+cl+bm "
                        "on CUDA)")
    p.add_argument("--light-channels", type=int, default=None, help="also time an HL head with this many channels")
    p.add_argument("--components", action="store_true", help="time backbone and heads alone (last setup)")
    p.add_argument("--peer", action="store_true", help="also time torchvision's deeplabv3_resnet101 loop")
    p.add_argument("--eval", action="store_true", help="also time evaluation (slide windows, first model)")
    p.add_argument("--loader", action="store_true", help="also time the Cityscapes train pipeline on mock data")
    p.add_argument("--overrides", nargs="+", default=[], help="Hydra overrides for every model, e.g. "
                   "model.backbone.depth=18")
    p.add_argument("--quick", action="store_true", help="the prepared GPU run (see quick_plan)")
    p.add_argument("--flops", action="store_true", help="only count train-step FLOPs on meta: baseline, HL and the "
                   "light HL head (--light-channels, default 64) of --models, default the breadth rows' models "
                   "(FLOP_TABLE) at their data configs' crops")
    p.add_argument("--tiny", action="store_true", help="toy sizes and each model's tiny family model (CPU tests)")
    p.add_argument("--budget-s", type=float, default=None, help="skip groups once this many seconds have passed "
                   "(default: 450 with --quick, none otherwise)")
    p.add_argument("--out", type=Path, default=None, help="folder for bench.json and bench.md "
                   "(default outputs/bench/<date-time>)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    quick = {"models": ["pspnet_r101", "deeplabv3plus_r101"], "size": 769, "batch": 8, "steps": 10, "warmup": 3}
    plain = {"models": ["pspnet_r18", "deeplabv3plus_r50"], "size": 256, "batch": 2, "steps": 5, "warmup": 2}
    defaults = {**(quick if args.quick else plain), **(TINY if args.tiny else {})}
    for key in ("models", "size", "batch", "steps", "warmup"):
        if getattr(args, key) is None and not (args.flops and key in ("models", "size")):
            setattr(args, key, defaults[key])
    if args.warmup < 1 or args.steps < 1 or args.batch < 2:
        p.error("--steps and --warmup must be at least 1, --batch at least 2 (pooled BN branches need it)")
    args.setups = args.setups or (["tf32", "bf16+cl+bm"] if device.type == "cuda" else ["fp32"])
    try:
        for s in args.setups:
            Setup.parse(s)
    except ConfigError as err:
        p.error(str(err))
    if args.quick and not args.models:
        p.error("--quick needs at least one model")
    if args.flops:
        light = args.light_channels or 64
        entries = [(m, None) for m in args.models] if args.models else FLOP_TABLE
        groups = [Group("flops", members=[Member(m), Member(m, True), Member(m, True, light)], data=data)
                  for m, data in entries]
    else:
        groups = quick_plan(args.models) if args.quick else cli_plan(args)
    ctx = Context(device, device_name(device), args.size, args.batch, args.warmup, args.steps, tuple(args.overrides))
    if args.tiny:
        # The peer keeps its full ResNet-101, so it runs at a smaller toy crop.
        ctx = replace(ctx, tiny=True, peer_size=32, overrides=("profile=smoke", *args.overrides),
                      eval_hw=TINY["eval_hw"], eval_crop=TINY["eval_crop"], eval_stride=TINY["eval_stride"],
                      eval_images=1, loader_hw=TINY["loader_hw"], loader_images=1, loader_items=2)
    budget = args.budget_s if args.budget_s is not None else (450.0 if args.quick else None)
    out = args.out or Path("outputs") / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    command = "python -m hlbench.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"device {ctx.device_name}, torch {torch.__version__}, batch {args.batch}, crop {_size_label(args.size)}, "
          f"{args.warmup} warm-up + median of {args.steps} steps; {len(groups)} groups; results in {out}", flush=True)
    result = run_plan(groups, ctx, out, budget, command)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
