"""Semi-supervised splits: the lists U2PL and UniMatch published, a user's own lists, seeded splits, unlabeled images.

A split divides a train list into a labeled and an unlabeled part. `data.split` selects it:
  <source>/<fraction>   a list pair shipped in hlbench/data/splits/ (see its PROVENANCE.md), e.g. u2pl/1_16;
  a folder path         a user's labeled.txt + unlabeled.txt, in either list format;
  null                  a seeded split of the train list (`data.split_fraction`, `data.split_seed`; `seeded_split`).

List formats, one entry per line, paths relative to the data root:
  U2PL      `<image>`; the label is derived: leading `leftImg8bit/` -> `gtFine/`, trailing `leftImg8bit.png` ->
            `gtFine_labelTrainIds.png`;
  UniMatch  `<image> <label>`.
Lines are split with `splitlines()` and blank lines dropped, because several published files lack a trailing
newline.

A split's identity (`Split.record()`) is its source, the sha256 of each list and the counts. For list files the
sha256 is that of the file's bytes, so it can be compared with `sha256sum` of the upstream file; for a seeded split
it is that of the list written in the U2PL format: each image path followed by "\\n", in train-list order.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch.utils.data import Dataset

from hlbench.data.bad_samples import BadSampleLog
from hlbench.data.decoded_cache import read_through
from hlbench.data.files import read_image
from hlbench.data.transforms import PAD_KEY, Compose, ToTensor, sample_rng
from hlbench.errors import ConfigError

SPLITS_DIR = Path(__file__).with_name("splits")
LIST_FILES = ("labeled.txt", "unlabeled.txt")
_IMAGE_ROOT, _IMAGE_SUFFIX = "leftImg8bit/", "leftImg8bit.png"
_LABEL_ROOT, _LABEL_SUFFIX = "gtFine/", "gtFine_labelTrainIds.png"


def shipped_splits() -> list[str]:
    """The `data.split` names of the shipped list pairs, e.g. ["u2pl/1_16", ..., "unimatch/1_8"]."""
    return sorted(folder.relative_to(SPLITS_DIR).as_posix() for folder in SPLITS_DIR.glob("*/*")
                  if (folder / LIST_FILES[0]).is_file())


def derived_label(image: str) -> str | None:
    """The label path of a U2PL-format image path, or None when the path does not follow the Cityscapes layout."""
    if not (image.startswith(_IMAGE_ROOT) and image.endswith(_IMAGE_SUFFIX)):
        return None
    return _LABEL_ROOT + image[len(_IMAGE_ROOT):-len(_IMAGE_SUFFIX)] + _LABEL_SUFFIX


def read_split_list(path) -> list[tuple[str, str]]:
    """[(image, label)] from a list file in either format; ConfigError naming the file and line of a bad entry."""
    path = Path(path)
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ConfigError(f"{path}:{number}: expected '<image>' (U2PL) or '<image> <label>' (UniMatch), "
                              f"got {len(fields)} fields: {line.strip()!r}")
        label = fields[1] if len(fields) == 2 else derived_label(fields[0])
        if label is None:
            raise ConfigError(f"{path}:{number}: cannot derive the label of {fields[0]!r}: a one-path line must "
                              f"be {_IMAGE_ROOT}...{_IMAGE_SUFFIX} (U2PL); write '<image> <label>' otherwise")
        entries.append((fields[0], label))
    if not entries:
        raise ConfigError(f"{path}: the list is empty")
    return entries


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Split:
    """A labeled / unlabeled division of a train list, with the identity that goes into run records.

    Args:
        source: "u2pl/1_8", a folder path, or "seeded(<fraction>, <seed>)" (+ " for <shipped split>" where synthetic
            scenes stand in for it).
        labeled: (image, label) per labeled entry, relative to the data root; label is None where the data set
            generates labels rather than reading files (synthetic scenes).
        unlabeled: image per unlabeled entry (any label a list names is not used).
    """
    source: str
    labeled: tuple[tuple[str, str | None], ...]
    unlabeled: tuple[str, ...]
    labeled_sha256: str
    unlabeled_sha256: str

    def record(self) -> dict:
        """The split's identity for env.json, the summary and W&B."""
        return {"source": self.source, "labeled_sha256": self.labeled_sha256,
                "unlabeled_sha256": self.unlabeled_sha256, "num_labeled": len(self.labeled),
                "num_unlabeled": len(self.unlabeled)}


def load_split(value: str) -> Split:
    """The shipped list pair named `value` (e.g. "u2pl/1_16"), else the folder `value` holding the two lists."""
    shipped = value in shipped_splits()
    folder = SPLITS_DIR / value if shipped else Path(value).expanduser()
    if not all((folder / name).is_file() for name in LIST_FILES):
        raise ConfigError(f"data.split={value!r} is neither a shipped split ({', '.join(shipped_splits())}) nor a "
                          f"folder holding {' and '.join(LIST_FILES)}")
    source = value if shipped else str(folder.resolve())
    labeled, unlabeled = (read_split_list(folder / name) for name in LIST_FILES)
    both = {image for image, _ in labeled} & {image for image, _ in unlabeled}
    if both:
        raise ConfigError(f"data.split={value!r}: {len(both)} images are in both {' and '.join(LIST_FILES)}, "
                          f"e.g. {min(both)}")
    return Split(source, tuple(labeled), tuple(image for image, _ in unlabeled),
                 *(_sha256((folder / name).read_bytes()) for name in LIST_FILES))


def seeded_split(train: Sequence[tuple[str, str | None]], fraction: float, seed: int) -> Split:
    """Labels ⌈fraction·N⌉ of the N train entries (the published counts 100/186/372/744/1488 of 2975 follow the
    same rounding): those whose sha256("<seed>:<image>") is smallest.

    The rule depends only on (image paths, fraction, seed), not on the list order, the platform or a library's
    random stream; with one seed, a smaller fraction's labeled set lies inside a larger one's. Both parts keep the
    train list's order.
    """
    count = math.ceil(round(fraction * len(train), 6))  # the rounding keeps 0.1 x 2970 at 297, not 298
    if not 1 <= count < len(train):
        raise ConfigError(f"data.split_fraction={fraction} labels {count} of {len(train)} train images; expected "
                          "at least 1 labeled and 1 unlabeled")
    rank = sorted(train, key=lambda entry: (_sha256(f"{seed}:{entry[0]}".encode()), entry[0]))
    chosen = {image for image, _ in rank[:count]}
    labeled = tuple(entry for entry in train if entry[0] in chosen)
    unlabeled = tuple(image for image, _ in train if image not in chosen)
    return Split(f"seeded({fraction}, {seed})", labeled, unlabeled,
                 _sha256("".join(f"{image}\n" for image, _ in labeled).encode()),
                 _sha256("".join(f"{image}\n" for image in unlabeled).encode()))


def resolve_split(data_cfg, train_list: Callable[[], Sequence[tuple[str, str | None]]]) -> Split:
    """The split `data.split` selects; `train_list()` gives the train entries a seeded split draws from."""
    value, fraction, seed = (data_cfg.get(key) for key in ("split", "split_fraction", "split_seed"))
    if value is not None:
        if fraction is not None:
            raise ConfigError(f"data.split_fraction={fraction} applies to a seeded split (data.split=null), but "
                              f"data.split={value!r}")
        if not isinstance(value, str):
            raise ConfigError(f"data.split={value!r} is not valid; expected a shipped split name, a folder or null")
        return load_split(value)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"data.split_fraction={fraction!r} is not valid; expected a number in (0, 1) for a "
                          "seeded split (data.split=null)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"data.split_seed={seed!r} is not valid; expected an integer")
    return seeded_split(train_list(), float(fraction), seed)


def unlabeled_sample(img: np.ndarray, index: int) -> dict:
    """The pipeline input of an unlabeled image: no label, and the padding mask (all image so far)."""
    return {"img": img, PAD_KEY: np.zeros(img.shape[:2], np.uint8), "index": int(index)}


class UnlabeledImages(Dataset):
    """Image files without labels; items are {"img", "pad", "index"} and what the pipeline adds ("img_hw").

    Args:
        images: image paths.
        aug_seed: mixed into each item's augmentation Generator (see transforms.sample_rng).
    """

    def __init__(self, images: Sequence[Path], transform=None, aug_seed: int = 0):
        if not images:
            raise ConfigError("no unlabeled images")
        self.images, self.aug_seed = [Path(p) for p in images], int(aug_seed)
        self.bad_samples = BadSampleLog(size=len(self.images))
        self.decoded = None  # a DecodedCache (data.decoded_cache), or decode every time
        self.transform = transform if transform is not None else Compose([ToTensor()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = read_through(self.decoded, read_image, self.images[index])
        return self.transform(unlabeled_sample(image, index), sample_rng(self.aug_seed))
