"""The contract every labelled data set meets, which the loop, the evaluator, the tracker and the analysis rely on.

A new data set (hlbench/data/<name>.py, added to build_datasets) is a torch Dataset with these attributes and
items; tests/test_datasets.py checks each shipped one against it.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

# Item keys: "img" uint8 3×H×W (normalised on the device, hlbench.data.normalize_batch), "label" int64 H×W in
# train ids (255 = ignore), "hard" the ground-truth hardness bitmask (an empty tensor where the data has none),
# "index" the item's index; a pipeline that pads adds "img_hw", the un-padded size.
ITEM_KEYS = ("img", "label", "hard", "index")


@runtime_checkable
class SegmentationData(Protocol):
    """classes: the class names in train-id order; palette: one RGB colour per class; hard_bits: {hardness kind:
    bit} of the "hard" masks ({} where the data has no ground-truth hardness)."""

    classes: list[str]
    palette: list[tuple[int, int, int]]
    hard_bits: dict[str, int]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict: ...
