"""ImageNet backbone weights: which file a model config names, where it is found, and how to get it.

`model.backbone.pretrained` is `none` (train from scratch, an explicit choice), a bare file name looked up in
the weights folder (`weights_dir`, default $HLBENCH_WEIGHTS), or a path containing a `/`, used as is.

    python -m hlbench.weights list [--suite S]               # the files each suite needs, with URL and checksum
    python -m hlbench.weights check [--dir D] [--suite S]    # present? checksum right? (exit 1 if not)
    python -m hlbench.weights fetch [NAME ...] [--suite S] --dir D [--base-url URL]

The checksum is the torch.hub convention: the 8 hex digits in a published name start the file's sha256. It is
checked by `check` and `fetch`, not when a run loads the file.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .compose import compose, hydra_context
from .errors import ConfigError
from .paths import experiments_dir
from .suites import load_suite

NONE = "none"
OPENMMLAB_BASE_URL = "https://download.openmmlab.com/pretrain/third_party/"
MMCLS_CONVNEXT_URL = "https://download.openmmlab.com/mmclassification/v0/convnext/downstream/"
MMSEG_PRETRAIN_URL = "https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/"
CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownFile:
    sha256_prefix: str  # the publisher's checksum: the start of the file's sha256 ("" where none is published)
    source: str
    base_url: str = OPENMMLAB_BASE_URL
    page: str | None = None  # a page to download the file from by hand, where there is no direct link


# The files the reference starts from: mmcv's open-mmlab.json entries `open-mmlab://resnet{18,50,101}_v1c`.
KNOWN_WEIGHTS = {
    "resnet18_v1c-b5776b93.pth": KnownFile("b5776b93", "mmcv open-mmlab://resnet18_v1c (ResNetV1c-18, ImageNet)"),
    "resnet50_v1c-2cccc1ad.pth": KnownFile("2cccc1ad", "mmcv open-mmlab://resnet50_v1c (ResNetV1c-50, ImageNet)"),
    "resnet101_v1c-e67eebb6.pth": KnownFile("e67eebb6",
                                            "mmcv open-mmlab://resnet101_v1c (ResNetV1c-101, ImageNet)"),
    # mmseg's mmcls://mobilenet_v2: mmcls' own ImageNet training (71.9 % top-1), keys under `backbone.`.
    "mobilenet_v2_batch256_imagenet_20200708-3b2dc3af.pth": KnownFile(
        "3b2dc3af", "mmcls://mobilenet_v2 (MobileNetV2 x1.0, ImageNet)",
        "https://download.openmmlab.com/mmclassification/v0/mobilenet_v2/"),
    "mobilenet_v3_large-bc2c3fd3.pth": KnownFile("bc2c3fd3",
                                                 "mmcv open-mmlab://contrib/mobilenet_v3_large (ImageNet)"),
    # The official ResNeSt-101 with its stem keys renamed to mmseg's; the ResNeXt file's origin is undocumented.
    "resnest101_d2-f3b931b2.pth": KnownFile("f3b931b2", "mmcv open-mmlab://resnest101 (ResNeSt-101, ImageNet)"),
    "resnext101_64x4d-ee2c6f71.pth": KnownFile("ee2c6f71",
                                               "mmcv open-mmlab://resnext101_64x4d (ResNeXt-101 64x4d, ImageNet)"),
    # MSRA's HRNetV2 ImageNet classifiers (HRNet-Image-Classification), official key names, which mmseg's HRNet
    # keeps; their classification head (incre_modules, downsamp_modules, final_layer, classifier) goes unused.
    "hrnetv2_w18_small-b5a04e21.pth": KnownFile(
        "b5a04e21", "mmcv open-mmlab://msra/hrnetv2_w18_small (HRNetV2-W18-Small, ImageNet)"),
    "hrnetv2_w18-00eb2006.pth": KnownFile("00eb2006", "mmcv open-mmlab://msra/hrnetv2_w18 (HRNetV2-W18, ImageNet)"),
    "hrnetv2_w48-d2186c55.pth": KnownFile("d2186c55", "mmcv open-mmlab://msra/hrnetv2_w48 (HRNetV2-W48, ImageNet)"),
    # mmcls' ports of the official ConvNeXt-B files (keys under `backbone.`; of the four output norms at most norm3,
    # the classifier's final norm): the in1k one without EMA starts mmseg's Cityscapes UPerNet, the in21k one its
    # ADE20K UPerNet.
    "convnext-base_3rdparty_32xb128-noema_in1k_20220301-2a0ee547.pth": KnownFile(
        "2a0ee547", "mmcls convnext-base 3rdparty noema (ConvNeXt-B, ImageNet-1k)", MMCLS_CONVNEXT_URL),
    "convnext-base_3rdparty_in21k_20220301-262fd037.pth": KnownFile(
        "262fd037", "mmcls convnext-base 3rdparty in21k (ConvNeXt-B, ImageNet-21k)", MMCLS_CONVNEXT_URL),
    # The official Swin-T 1k, Swin-B and Swin-L 22k (window 12, 384) and NVlabs MiT files after mmseg's swin2mmseg /
    # mit2mmseg key conversion: they load under mmseg's names as they are.
    "swin_tiny_patch4_window7_224_20220317-1cdeb081.pth": KnownFile(
        "1cdeb081", "mmseg pretrain/swin (Swin-T window 7, 224, ImageNet-1k)", MMSEG_PRETRAIN_URL + "swin/"),
    "swin_base_patch4_window12_384_22k_20220317-e5c09f74.pth": KnownFile(
        "e5c09f74", "mmseg pretrain/swin (Swin-B window 12, 384, ImageNet-22k)", MMSEG_PRETRAIN_URL + "swin/"),
    "swin_large_patch4_window12_384_22k_20220412-6580f57d.pth": KnownFile(
        "6580f57d", "mmseg pretrain/swin (Swin-L window 12, 384, ImageNet-22k)", MMSEG_PRETRAIN_URL + "swin/"),
    "mit_b0_20220624-7e0fe6dd.pth": KnownFile("7e0fe6dd", "mmseg pretrain/segformer (MiT-B0, ImageNet-1k)",
                                              MMSEG_PRETRAIN_URL + "segformer/"),
    "mit_b3_20220624-13b1141c.pth": KnownFile("13b1141c", "mmseg pretrain/segformer (MiT-B3, ImageNet-1k)",
                                              MMSEG_PRETRAIN_URL + "segformer/"),
    "mit_b5_20220624-658746d9.pth": KnownFile("658746d9", "mmseg pretrain/segformer (MiT-B5, ImageNet-1k)",
                                              MMSEG_PRETRAIN_URL + "segformer/"),
    # The semi-supervised references' deep-stem ResNet-101 (U2PL's and UniMatch's READMEs link their own Google
    # Drive uploads, not known to differ; UniMatch's: https://drive.google.com/file/d/13jNMOEYkqBC3CimlSSw-sWRHVZEeROmK)
    "resnet101.pth": KnownFile("", "U2PL / UniMatch ImageNet ResNet-101 (deep stem), no checksum published",
                               page="https://drive.google.com/file/d/1nzSX8bX3zoRREn6WnoEeAPbKYPPOa-3Y/view"),
}


def url_of(name: str, base_url: str | None = None) -> str:
    base = base_url or KNOWN_WEIGHTS[name].base_url
    return base.rstrip("/") + "/" + name


def _pretrained_value(model_cfg) -> str:
    value = (model_cfg.get("backbone") or {}).get("pretrained")
    if value is None or str(value).strip() == "":
        unset = "null" if value is None else "empty"
        raise ConfigError(f"model.backbone.pretrained is {unset}; expected a weights file name (e.g. "
                          f"{next(iter(KNOWN_WEIGHTS))}), a path, or none (train from scratch)")
    return str(value).strip()


def _folder(weights_dir) -> Path | None:
    # An exported-but-empty HLBENCH_WEIGHTS means no folder, like an unset one.
    return Path(weights_dir).expanduser() if weights_dir not in (None, "") else None


def _where_to_get(name: str, folder: Path | None) -> str:
    if name not in KNOWN_WEIGHTS:
        return f"{name} is not a known download (known: {', '.join(KNOWN_WEIGHTS)}): put the file there yourself"
    if KNOWN_WEIGHTS[name].page:
        return f"download it by hand from {KNOWN_WEIGHTS[name].page} (no direct link) into {folder or '<folder>'}"
    return (f"get it from {url_of(name)} or with `python -m hlbench.weights fetch {name} "
            f"--dir {folder if folder else '<folder>'}`")


def resolve_pretrained(model_cfg, weights_dir) -> Path | None:
    """The backbone weights file that model_cfg names; None for `none`. ConfigError (one line) when missing."""
    value = _pretrained_value(model_cfg)
    if value == NONE:
        return None
    scratch = f"or set model.backbone.pretrained={NONE} to train from scratch"
    if "/" in value:
        path = Path(value).expanduser()
        if path.is_file():
            return path
        hint = f"; {_where_to_get(path.name, path.parent)}" if path.name in KNOWN_WEIGHTS else ""
        raise ConfigError(f"model.backbone.pretrained={value}: no such file{hint}, {scratch}")
    folder = _folder(weights_dir)
    if folder is None:
        raise ConfigError(f"model.backbone.pretrained={value}: no weights folder is set (export "
                          f"HLBENCH_WEIGHTS=<folder> or pass weights_dir=<folder>); {_where_to_get(value, None)}, "
                          f"{scratch}")
    path = folder / value
    if path.is_file():
        return path
    absent = "" if folder.is_dir() else "; the folder does not exist"
    raise ConfigError(f"model.backbone.pretrained={value}: not found in the weights folder {folder} (weights_dir / "
                      f"HLBENCH_WEIGHTS{absent}); {_where_to_get(value, folder)}, {scratch}")


def require_pretrained(cfg) -> Path | None:
    """resolve_pretrained for a composed run config: its model and its weights_dir."""
    return resolve_pretrained(cfg.model, cfg.get("weights_dir"))


def pretrained_name(cfg) -> str:
    """The backbone weights' file name, or "none": for W&B tags and the run summary."""
    value = _pretrained_value(cfg.model)
    return value if value == NONE else Path(value).name


# --- the command line -------------------------------------------------------------------------------------------

def _suite_experiments(suite: str | None) -> dict[str, list[str]]:
    suites = sorted(p.stem for p in (experiments_dir() / "suites").glob("*.yaml"))
    if suite is not None and suite not in suites:
        raise ConfigError(f"--suite {suite}: no file {experiments_dir() / 'suites' / (suite + '.yaml')}; "
                          f"known suites: {', '.join(suites)}")
    # The HL row of an experiment needs the same file as its baseline.
    return {s: list(dict.fromkeys(r.experiment for r in load_suite(s).runs)) for s in ([suite] if suite else suites)}


def needed_weights(suite: str | None = None) -> dict[str, dict[str, list[str]]]:
    """{suite: {pretrained value: [experiments]}} for one suite or all; values are names, paths or "none"."""
    needed = {}
    with hydra_context():
        for name, experiments in _suite_experiments(suite).items():
            needed[name] = {}
            for experiment in experiments:
                value = _pretrained_value(compose([f"experiment={experiment}"]).model)
                needed[name].setdefault(value, []).append(experiment)
    return needed


def _files(needed) -> list[str]:
    return sorted({value for per_suite in needed.values() for value in per_suite if value != NONE})


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_problem(path: Path, name: str) -> str | None:
    """None when path's sha256 starts with the published prefix, else a description of the mismatch."""
    prefix = KNOWN_WEIGHTS[name].sha256_prefix
    if not prefix:
        return None
    digest = sha256_of(path)
    return None if digest.startswith(prefix) else f"sha256 {digest[:16]}... does not start with {prefix}"


def _cmd_list(args) -> int:
    for suite, per_value in needed_weights(args.suite).items():
        print(f"{suite}:")
        for value, experiments in sorted(per_value.items()):
            used = f"{len(experiments)} experiments" if len(experiments) > 1 else experiments[0]
            if value == NONE:
                print(f"  none (from scratch)  [{used}]")
            elif value in KNOWN_WEIGHTS and KNOWN_WEIGHTS[value].page:
                known = KNOWN_WEIGHTS[value]
                print(f"  {value}  (no checksum)  by hand from {known.page}  {known.source}  [{used}]")
            elif value in KNOWN_WEIGHTS:
                known = KNOWN_WEIGHTS[value]
                print(f"  {value}  sha256 {known.sha256_prefix}...  {url_of(value)}  {known.source}  [{used}]")
            else:
                print(f"  {value}  (no published URL or checksum)  [{used}]")
    return 0


def _weights_folder(arg: str | None, command: str) -> Path:
    folder = _folder(arg if arg is not None else os.environ.get("HLBENCH_WEIGHTS"))
    if folder is None:
        raise ConfigError(f"{command}: no weights folder; pass --dir <folder> or export HLBENCH_WEIGHTS=<folder>")
    return folder


def _file_status(path: Path) -> tuple[bool, str]:
    """(usable, description) of one needed file."""
    if not path.is_file():
        part = path.with_name(path.name + ".part")
        if part.is_file():
            return False, f"MISSING (partial download {part.name}: {part.stat().st_size} bytes; fetch resumes it)"
        return False, "MISSING"
    if path.name not in KNOWN_WEIGHTS or not KNOWN_WEIGHTS[path.name].sha256_prefix:
        return True, "present (no published checksum to compare)"
    problem = _checksum_problem(path, path.name)
    return (False, f"BAD: {problem}") if problem else (True, "ok")


def _cmd_check(args) -> int:
    folder = _weights_folder(args.dir, "check")
    failures = 0
    for value in _files(needed_weights(args.suite)):
        path = Path(value).expanduser() if "/" in value else folder / value
        usable, status = _file_status(path)
        failures += not usable
        print(f"{path}: {status}")
    if failures:
        suite = f" --suite {args.suite}" if args.suite else ""
        print(f"{failures} file(s) missing or bad; `python -m hlbench.weights fetch{suite} --dir {folder}` gets "
              f"them", file=sys.stderr)
    return 1 if failures else 0


def fetch_file(name: str, folder: Path, base_url: str | None = None) -> Path:
    """Download a known file into folder, resuming its .part file; verified, then renamed into place."""
    if name not in KNOWN_WEIGHTS:
        raise ConfigError(f"fetch {name}: not a known file; known: {', '.join(KNOWN_WEIGHTS)}")
    if KNOWN_WEIGHTS[name].page:
        raise ConfigError(f"fetch {name}: no direct download; get it by hand from {KNOWN_WEIGHTS[name].page}")
    dest, url = folder / name, url_of(name, base_url)
    if dest.exists():
        problem = _checksum_problem(dest, name)
        if problem:
            raise ConfigError(f"{dest}: already exists but {problem}; left untouched (move it away to fetch again)")
        print(f"{dest}: already there, checksum ok")
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    total = None
    request = urllib.request.Request(url, headers={"User-Agent": "hlbench"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if offset and response.status != 206:  # the server ignored the range: start again
                offset = 0
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            with open(part, "ab" if offset else "wb") as f, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name) as bar:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        # 416: the range starts at the end, so the .part file is already complete; its checksum decides.
        if not (offset and err.code == 416):
            raise ConfigError(f"fetch {url}: HTTP {err.code} {err.reason}; expected the file {name}") from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        have = part.stat().st_size if part.is_file() else 0
        raise ConfigError(f"fetch {url}: {getattr(err, 'reason', err)} after {have} bytes; run fetch again to "
                          f"resume {part}") from err
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConfigError(f"fetch {url}: got {size} of {total} bytes; run fetch again to resume {part}")
    problem = _checksum_problem(part, name)
    if problem:
        part.unlink()
        raise ConfigError(f"fetch {url}: {problem} (the published checksum of {name}); removed the download, "
                          f"{dest} stays absent")
    os.replace(part, dest)
    print(f"{dest}: downloaded, checksum ok")
    return dest


def _cmd_fetch(args) -> int:
    folder = _weights_folder(args.dir, "fetch")
    names = args.names or [v for v in _files(needed_weights(args.suite)) if "/" not in v]
    failures = 0
    for name in names:
        try:
            fetch_file(name, folder, args.base_url)
        except ConfigError as err:
            print(f"hlbench.weights: {err}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hlbench.weights", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the weight files each suite's experiments need")
    listing.add_argument("--suite", help="one suite (default: all)")
    check = commands.add_parser("check", help="are the needed files in the folder, with the right checksum?")
    check.add_argument("--dir", help="the weights folder (default: $HLBENCH_WEIGHTS)")
    check.add_argument("--suite", help="one suite (default: all)")
    fetch = commands.add_parser("fetch", help="download, resume, verify and move into place")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="file names (default: what the suites need)")
    fetch.add_argument("--suite", help="the files of one suite")
    fetch.add_argument("--dir", help="the weights folder (default: $HLBENCH_WEIGHTS)")
    fetch.add_argument("--base-url", help="a mirror replacing the publisher's base URL")
    args = parser.parse_args(argv)
    try:
        return {"list": _cmd_list, "check": _cmd_check, "fetch": _cmd_fetch}[args.command](args)
    except ConfigError as err:
        print(f"hlbench.weights: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
