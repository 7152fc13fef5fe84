"""Training-step benchmark: seconds per step (forward + backward + SGD) for model configs, baseline vs HL.

    python -m hlbench.bench --models pspnet_r18 deeplabv3plus_r50 --size 256 --batch 2 --steps 5

Runs the real Supervised step (mmseg-style losses, HL branch and its loss) on random non-zero data. The baseline
and HL steps of a model alternate, so process warm-up and a shared machine's drift hit both alike; reported are
the medians after warm-up. On CUDA it synchronises around each step and also reports peak memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_module

from .engine.distributed import plan_batches
from .engine.optim import build_optimizer
from .engine.precision import autocast
from .methods import build_method
from .models import build_model


class TrainStep:
    """One model config's training step on fixed random data; calling it runs and times one step (seconds)."""

    def __init__(self, model_name: str, hl: bool, size: int, batch: int, device: torch.device,
                 num_classes: int = 19, amp: bool = False):
        with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
            # Random weights time the same as ImageNet ones, so no weights file is needed.
            cfg = compose("config", overrides=[f"model={model_name}", "model.backbone.pretrained=none",
                                               f"hl.enabled={hl}", "logger=none"])
        self.device, self.precision = device, "bf16" if amp else "fp32"
        self.model = build_model(cfg.model, num_classes=num_classes, hl=hl).to(device).train()
        self.method = build_method(cfg)
        self.method.setup(self.model, plan_batches({"labeled": (batch, "--batch")}, 1, batch))
        self.optimizer = build_optimizer(self.method.param_groups(self.model), cfg.optim)
        g = torch.Generator().manual_seed(0)
        self.batch = {"img": torch.randn(batch, 3, size, size, generator=g).to(device),
                      "label": torch.randint(0, num_classes, (batch, size, size), generator=g).to(device)}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self) -> float:
        self._sync()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss, _ = self.method.step(self.model, {"labeled": self.batch}, 0)
        loss.backward()
        self.optimizer.step()
        self._sync()
        return time.perf_counter() - t0


def compare_steps(model_name: str, size: int, batch: int, steps: int, warmup: int, device: torch.device,
                  amp: bool = False) -> dict[bool, tuple[float, float | None]]:
    """{hl: (median s/step, peak GiB on CUDA else None)} for the baseline (False) and HL (True) model."""
    runs = {hl: TrainStep(model_name, hl, size, batch, device, amp=amp) for hl in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    peaks: dict[bool, float | None] = {}
    for hl, step in runs.items():
        # Peak memory is per model: measured over its own warm-up, which touches every buffer it needs.
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            step()
        peaks[hl] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    for _ in range(steps):
        for hl, step in runs.items():
            times[hl].append(step())
    return {hl: (statistics.median(times[hl]), peaks[hl]) for hl in runs}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["pspnet_r18", "deeplabv3plus_r50"])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="images per step (>= 2: pooled BN branches need it)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--steps and --warmup must be at least 1")
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.batch}x3x{args.size}x{args.size}, median of {args.steps} alternating steps after "
          f"{args.warmup} warm-up")
    print(f"{'model':<22}{'baseline s/step':>16}{'HL s/step':>12}{'HL/base':>9}{'peak GiB base/HL':>19}")
    for name in args.models:
        result = compare_steps(name, args.size, args.batch, args.steps, args.warmup, device, amp=args.amp)
        (tb, mb), (th, mh) = result[False], result[True]
        mem = f"{mb:.2f}/{mh:.2f}" if mb is not None else "–"
        print(f"{name:<22}{tb:>16.3f}{th:>12.3f}{th / tb:>9.2f}{mem:>19}")


if __name__ == "__main__":
    main()
