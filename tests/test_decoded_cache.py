"""data.decoded_cache: each file is decoded once; the items are exactly those of the uncached data set."""
import functools

import numpy as np
import pytest
import torch

import hlbench.data.files as files
from hlbench.compose import compose
from hlbench.data import Cityscapes, build_datasets
from hlbench.data.bad_samples import BadSampleError
from hlbench.data.decoded_cache import DecodedCache
from hlbench.data.sampling import SeededSamples
from hlbench.data.transforms import build_train_pipeline
from tests.test_datasets import make_cityscapes
from tests.test_splits import _cityscapes_cfg, _write_folder


def _counting(monkeypatch, name):
    calls = []
    real = getattr(files, name)

    @functools.wraps(real)  # the cache names entries by the reader's qualified name
    def reader(path):
        calls.append(str(path))
        return real(path)
    monkeypatch.setattr(files, name, reader)
    return calls


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


@pytest.mark.parametrize("train_ids", [False, True])
def test_cached_items_equal_decoded_ones_and_each_file_is_decoded_once(hydra_ctx, tmp_path, monkeypatch, train_ids):
    root = make_cityscapes(tmp_path / "cs", train_ids=train_ids)
    pipeline = build_train_pipeline(compose(["data=cityscapes_769",
                                                                 "data.train_pipeline.crop=[24,24]"]).data.train_pipeline)
    plain, cached = Cityscapes(root, "train", pipeline, aug_seed=3), Cityscapes(root, "train", pipeline, aug_seed=3)
    cached.decoded = DecodedCache(tmp_path / "cache")
    images = _counting(monkeypatch, "read_image")
    plain, cached = SeededSamples(plain), SeededSamples(cached)  # the training streams' per-sample seeding
    for epoch in range(3):
        for i in range(4):
            assert _same(plain[i, 10 * epoch + i], cached[i, 10 * epoch + i])
    # The plain set decodes every time; the cached one only in the first epoch.
    assert len(images) == 3 * 4 + 4
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 8  # 4 images, 4 labels


def test_an_edited_file_is_decoded_again_and_a_bad_one_is_never_cached(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    dataset = Cityscapes(root, "train")
    dataset.decoded = cache = DecodedCache(tmp_path / "cache")
    first = dataset[0]["img"].clone()
    image = dataset.pairs[0][0]
    replacement = np.ascontiguousarray(files.read_image(dataset.pairs[1][0])[..., ::-1])
    files.cv2.imwrite(str(image), replacement)
    assert torch.equal(dataset[0]["img"], dataset[1]["img"]) and not torch.equal(dataset[0]["img"], first)
    image.write_bytes(b"not a png")
    entries = sorted(cache.folder.glob("*.npy"))
    for _ in range(2):
        with pytest.raises(BadSampleError, match="not a readable image"):
            dataset[0]
    assert sorted(cache.folder.glob("*.npy")) == entries


def test_the_config_key_reaches_labeled_unlabeled_and_val_sets(hydra_ctx, tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    train = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit" / "train").rglob("*.png"))
    folder = _write_folder(tmp_path / "split", train[:1], train[1:])
    sets = build_datasets(_cityscapes_cfg(root, f"data.split={folder}", f"data.decoded_cache={tmp_path / 'c'}"), 0)
    assert {name: ds.decoded.folder for name, ds in sets.items()} == dict.fromkeys(sets, tmp_path / "c")
    sets["unlabeled"][0]
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1
