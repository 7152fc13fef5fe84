"""Training memory: an estimate made before the first step, and the measured peak of a process.

The estimate runs one forward pass and the labelled loss of the real model on the `meta` device (shapes only, no
memory, about a second for a ResNet-101 at 769²) and adds up the tensors autograd saves for backward, each storage
once, plus weights, gradients and optimiser state. Activations saved for backward dominate a segmentation
model's peak, which comes at the start of backward; the estimate leaves out the CUDA context and allocator
slack, as torch.cuda.max_memory_allocated does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

GiB = 2 ** 30
# Optimiser state per parameter, in parameter copies (SGD momentum: 1; AdamW: exp_avg and exp_avg_sq).
_OPTIMIZER_STATE = {"sgd": 1, "adamw": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    activations: float  # bytes saved for backward
    weights: float      # parameters + gradients + optimiser state (+ 16-bit weight copies under autocast)
    images: int
    crop: tuple[int, int]
    precision: str

    @property
    def total(self) -> float:
        return self.activations + self.weights

    def describe(self, available: float | None = None) -> str:
        line = (f"estimated peak training memory per device: {self.total / GiB:.1f} GiB ({self.activations / GiB:.1f} "
                f"GiB activations saved for backward at {self.images} image(s) of {self.crop[0]}x{self.crop[1]} in "
                f"{self.precision}, {self.weights / GiB:.2f} GiB weights, gradients and optimiser state; counted on "
                f"the meta device)")
        return line + (f"; {available / GiB:.1f} GiB available" if available is not None else "")

    def what_fits(self, available: float, per_device: int) -> str:
        """The settings whose estimate fits in `available` bytes, `per_device` being the images per device now.

        Activations scale with the images per device and with the crop's area; weights stay."""
        share = (available - self.weights) / self.activations
        if share <= 0:
            return f"the weights, gradients and optimiser state alone need {self.weights / GiB:.2f} GiB"
        options = []
        if (batch := int(per_device * share)) >= 1:
            options.append(f"train.max_batch_per_device={batch} (gradient accumulation keeps the global batch)")
        scale = min(1.0, share) ** 0.5
        crop = [max(8, int(side * scale) // 8 * 8) for side in self.crop]
        options.append(f"data.train_pipeline.crop=[{crop[0]},{crop[1]}]")
        return "it would fit with " + " or ".join(options)


def available_memory(device: torch.device) -> float | None:
    """Bytes a training step on `device` may use: on CUDA the free memory plus what PyTorch holds already (the
    model is there); on a CPU the host's MemAvailable, capped by the cgroup's memory limit (a container's or a SLURM
    job's, which the kernel enforces with SIGKILL) less its usage. None where neither can be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device))
    host = _meminfo_bytes("MemAvailable")
    limit = _cgroup_memory_left()
    if host is None or limit is None:
        return host if limit is None else limit
    return min(host, limit)


def _meminfo_bytes(field: str, meminfo: Path = Path("/proc/meminfo")) -> float | None:
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in text.splitlines() if line.startswith(f"{field}:")), None)
    return kib * 1024.0 if kib is not None else None


def _cgroup_memory_left(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's memory limit less its usage (cgroup v2, else v1); None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit, usage = (root / limit_file).read_text().strip(), (root / usage_file).read_text().strip()
        except OSError:
            continue
        # v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
        if limit == "max" or int(limit) >= 2 ** 60:
            return None
        return float(int(limit) - int(usage))
    return None


def saved_activation_bytes(fn, exclude=()) -> int:
    """Bytes of the tensors autograd saves while fn() runs, each storage counted once; `exclude`: tensors whose
    storage is not counted (the parameters)."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    # Holding the storages keeps their addresses from being reused by later tensors during fn().
    seen: dict[int, torch.UntypedStorage] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen.setdefault(storage._cdata, storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in seen.values())


def estimate_train_memory(cfg, num_classes: int, images: int, crop, labeled: int | None = None) -> MemoryEstimate:
    """Peak memory of one training step of the run config `cfg` at `images` per device and crop [h, w].

    Every stream's images go through the model once, the first `labeled` (default: all) into the labelled loss
    (the semi-supervised methods' other losses and extra passes, e.g. UniMatch's perturbed views, are not
    counted). bf16 and fp16 count the model's activations in 16 bits and the losses in fp32, as autocast computes
    them.
    """
    from .methods.labelled_loss import LabelledLoss
    from .models import build_model

    h, w = (int(v) for v in crop)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg["backbone"]["pretrained"] = "none"  # the shapes, not the weights
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes, hl=cfg.hl).train()
    if half is not None:
        model = model.to(half)
    params = [p for p in model.parameters() if p.requires_grad]
    labeled = images if labeled is None else labeled
    loss = LabelledLoss(cfg, labeled)
    img = torch.zeros(images, 3, h, w, device="meta", dtype=half or torch.float32)
    label = torch.zeros(labeled, h, w, device="meta", dtype=torch.int64)

    hl_map = torch.zeros(labeled, h, w, device="meta")  # the batch's stored HL map, used with hl.source=fixed

    def step():
        out = model(img)
        if "masks" in out:
            # Mask2Former: its criterion matches queries on the CPU, which meta tensors cannot do; what it saves
            # (a few sampled points per matched mask and stage) is small beside the network's activations.
            return
        out = {k: v[:labeled] for k, v in out.items()}
        loss(out, label, model.align_corners, hl_map=hl_map)
    activations = saved_activation_bytes(step, exclude=params)
    n_params = sum(p.numel() for p in params)
    copies = 2 + _OPTIMIZER_STATE.get(cfg.optim.name, 1)  # fp32 weights and gradients + optimiser state
    weights = n_params * 4 * copies + (n_params * 2 if half is not None else 0)
    return MemoryEstimate(float(activations), float(weights), images, (h, w), cfg.train.precision)


class PeakMemory:
    """Peak memory of this process since reset(): CUDA max_memory_allocated, or on Linux CPUs the resident set's
    high-water mark (VmHWM, reset through /proc/self/clear_refs); None where neither can be read."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)

    def gib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GiB
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return None
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
        return kib / 2 ** 20 if kib is not None else None
