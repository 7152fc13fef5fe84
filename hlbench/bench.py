"""Training-step benchmark: seconds per step (forward + backward + SGD) for model configs, baseline vs HL.

    python -m hlbench.bench --models pspnet_r18 deeplabv3plus_r50 --size 256 --batch 2 --steps 5

Runs the real Supervised step (mmseg-style losses, HL branch and its loss) on random non-zero data; reports the
median over timed steps after warm-up. On CUDA it synchronises around each step and also reports peak memory.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_module

from .engine.optim import build_optimizer
from .methods import build_method
from .models import build_model


def step_times(model_name: str, hl: bool, size: int, batch: int, steps: int, warmup: int, device: torch.device,
               num_classes: int = 19, amp: bool = False) -> tuple[float, float | None]:
    """Median seconds per training step and peak memory (GiB, CUDA only) for one model config."""
    with initialize_config_module(config_module="hlbench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model_name}", f"hl.enabled={hl}", "logger=none"])
    model = build_model(cfg.model, num_classes=num_classes, hl=hl).to(device).train()
    method = build_method(cfg, ignore_index=255)
    optimizer = build_optimizer(model, cfg.optim)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(batch, 3, size, size, generator=g).to(device)
    label = torch.randint(0, num_classes, (batch, size, size), generator=g).to(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss, _ = method(model, {"img": img, "label": label})
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


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
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.batch}x3x{args.size}x{args.size}, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'model':<22}{'baseline s/step':>16}{'HL s/step':>12}{'HL/base':>9}{'peak GiB base/HL':>19}")
    for name in args.models:
        (tb, mb), (th, mh) = (step_times(name, hl, args.size, args.batch, args.steps, args.warmup, device,
                                         amp=args.amp) for hl in (False, True))
        mem = f"{mb:.2f}/{mh:.2f}" if mb is not None else "–"
        print(f"{name:<22}{tb:>16.3f}{th:>12.3f}{th / tb:>9.2f}{mem:>19}")


if __name__ == "__main__":
    main()
