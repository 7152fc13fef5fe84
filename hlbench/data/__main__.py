"""`python -m hlbench.data prepare|check|bench|mock`: label conversion, layout validation, loading throughput,
and synthetic scenes in a real layout for trying all of them before the data set is on disk."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hlbench.data.loader_bench import BENCH, loader_rate
from hlbench.data.mock import DEFAULT_SIZES, write_mock
from hlbench.data.prepare import KNOWN_COUNTS, PREPARED, check_dataset, prepare_labels
from hlbench.engine.cores import usable_cores
from hlbench.errors import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hlbench.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write the train-id labels (Cityscapes, GTA5, Total-Text) or the patches "
                                          "(iSAID) the data set reads from the raw download (resumable)")
    prep.add_argument("dataset", choices=sorted(PREPARED))
    check = sub.add_parser("check", help="validate the layout, decode every image and label; exit code 2 on errors")
    check.add_argument("dataset", choices=sorted(KNOWN_COUNTS))
    check.add_argument("--quick", action="store_true",
                       help="read only the images' headers: quicker, but a truncated or corrupt image passes")
    for p in (prep, check):
        p.add_argument("--root", required=True, type=Path)
        p.add_argument("--workers", type=int, default=usable_cores(),
                       help="parallel processes (default: the cores this process may use)")
    timing = sub.add_parser("bench", help="train items per second per core (decode + augmentation)")
    timing.add_argument("dataset", choices=sorted(BENCH))
    timing.add_argument("--root", required=True, type=Path)
    timing.add_argument("--n", type=int, default=50)
    timing.add_argument("--config", default=None, help="data config name for the train pipeline")
    timing.add_argument("--decoded-cache", type=Path, default=None,
                        help="read through a decode-once cache in this folder (data.decoded_cache)")
    mock = sub.add_parser("mock", help="write synthetic street scenes in a data set's real layout (new folder)")
    mock.add_argument("dataset", choices=sorted(DEFAULT_SIZES))
    mock.add_argument("--root", required=True, type=Path)
    mock.add_argument("--n", type=int, default=8, help="images per split")
    mock.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="default: the data set's native resolution")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as err:  # bad roots and files: one line naming them; anything else keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "prepare":
        written, skipped = prepare_labels(args.dataset, args.root, args.workers)
        print(f"{args.dataset}: wrote {written} {PREPARED[args.dataset]}, {skipped} already present")
        return 0
    if args.command == "check":
        counts, errors, warnings = check_dataset(args.dataset, args.root, args.workers, decode=not args.quick)
        for line in warnings:
            print(f"warning: {line}")
        for line in errors:
            print(f"error: {line}")
        print(", ".join(f"{split}: {count} image/label pairs" for split, count in counts.items()) or "no pairs")
        return 2 if errors else 0
    if args.command == "mock":
        images = write_mock(args.dataset, args.root, args.n, args.size)
        print(f"{args.dataset}: wrote {len(images)} synthetic image/label pairs under {args.root}")
        return 0
    rate = loader_rate(args.dataset, args.root, args.n, args.config, args.decoded_cache)
    via = " through the decoded cache" if args.decoded_cache else ""
    print(f"{args.dataset}: {rate:.2f} train items/s per core{via} ({1000 / rate:.1f} ms/item, n={args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
