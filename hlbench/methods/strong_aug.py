"""Strong views and CutMix boxes shared by the semi-supervised methods, on device batches.

The parameters are drawn from torch's global RNG, whose state every checkpoint saves, so a resumed run draws the
same views. Images arrive normalised (the loop normalises every stream); colour operations undo the normalisation,
work on [0, 1] RGB as UniMatch's PIL pipeline does, and normalise again.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def _colour_jitter(x: torch.Tensor, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25) -> torch.Tensor:
    """torchvision ColorJitter(0.5, 0.5, 0.5, 0.25) on one 3×H×W [0, 1] image: the four ops in random order."""
    ops = {
        0: lambda im: TF.adjust_brightness(im, _uniform(1 - brightness, 1 + brightness)),
        1: lambda im: TF.adjust_contrast(im, _uniform(1 - contrast, 1 + contrast)),
        2: lambda im: TF.adjust_saturation(im, _uniform(1 - saturation, 1 + saturation)),
        3: lambda im: TF.adjust_hue(im, _uniform(-hue, hue)),
    }
    for k in torch.randperm(4).tolist():
        x = ops[k](x)
    return x


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """PIL's GaussianBlur(radius=sigma), which UniMatch uses: a Gaussian of std sigma, kernel out to 3 sigma."""
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def strong_view(img: torch.Tensor, mean, std, *, jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                blur_sigma=(0.1, 2.0)) -> torch.Tensor:
    """UniMatch's strong colour view of a normalised N×3×H×W batch, each image with its own draws:
    ColorJitter(0.5, 0.5, 0.5, 0.25) with p 0.8, grayscale with p 0.2, Gaussian blur sigma ~ U(0.1, 2) with p 0.5.

    Padded pixels go through the same colour ops, as UniMatch's PIL crop padding does (its black border is jittered
    and blurred with the image); the unsupervised losses leave them out through the ignore mask.
    """
    m = torch.as_tensor(mean, dtype=img.dtype, device=img.device).view(1, 3, 1, 1) / 255
    s = torch.as_tensor(std, dtype=img.dtype, device=img.device).view(1, 3, 1, 1) / 255
    rgb = (img * s + m).clamp(0, 1)
    out = []
    for x in rgb:
        if float(torch.rand(())) < jitter_p:
            x = _colour_jitter(x)
        if float(torch.rand(())) < gray_p:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if float(torch.rand(())) < blur_p:
            x = _blur(x, _uniform(*blur_sigma))
        out.append(x)
    return (torch.stack(out) - m) / s


def unimatch_box(h: int, w: int, p: float = 0.5, area=(0.02, 0.4), ratio=(0.3, 1 / 0.3),
                 device=None) -> torch.Tensor:
    """UniMatch's CutMix box as a bool H×W mask (True inside), empty with probability 1 - p.

    Area ~ U(0.02, 0.4) of the crop, aspect ratio ~ U(0.3, 1/0.3), w = floor(sqrt(area / r)), h = floor(sqrt(area r));
    ratio and corner (x0 in [0, W), y0 in [0, H), numpy's randint) are re-drawn until the box fits, as in the
    reference (dataset/transform.py obtain_cutmix_box).
    """
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    if float(torch.rand(())) > p:
        return mask
    size = _uniform(*area) * h * w
    while True:
        r = _uniform(*ratio)
        bw, bh = int(math.sqrt(size / r)), int(math.sqrt(size * r))
        x0, y0 = int(torch.randint(0, w, ())), int(torch.randint(0, h, ()))
        if x0 + bw <= w and y0 + bh <= h:
            break
    mask[y0:y0 + bh, x0:x0 + bw] = True
    return mask


def half_area_box(h: int, w: int, device=None) -> torch.Tensor:
    """U2PL's CutMix box as a bool H×W mask (True inside): half the image area, width ~ randint(W/2 + 1, W) (numpy's
    randint: W excluded), height = round(H W / 2 / width), at a random position."""
    bw = int(torch.randint(w // 2 + 1, w, ()))
    bh = min(h, round(h * w / 2 / bw))
    x0 = int(torch.randint(0, w - bw + 1, ()))
    y0 = int(torch.randint(0, h - bh + 1, ()))
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[y0:y0 + bh, x0:x0 + bw] = True
    return mask
