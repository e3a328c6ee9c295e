"""The synthetic phantom dataset: layout, determinism, label structure, class separability."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from rwkvunet_jax import data
from rwkvunet_jax.data.phantom import CLASS_NAMES, render_phantom, write_phantom_dataset

PARAMS = dict(num_train=10, num_val=5, num_test=4, image_size=(48, 64), num_classes=5, slices_per_volume=3)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom") / "ph", seed=7, **PARAMS)


def test_layout_and_readers(root):
    assert json.loads((root / "phantom.json").read_text())["class_names"] == list(CLASS_NAMES[:5])
    train, val, test = (data.get_source("phantom", root, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (10, 5, 4)
    assert repr(train).startswith("NpzSliceSource(dataset='phantom'")
    vols = data.get_volumes("phantom", root, "val")
    assert [v["image"].shape for v in vols] == [(3, 48, 64), (2, 48, 64)]
    ex = train[0]
    assert ex["image"].shape == (48, 64, 1) and ex["image"].dtype == np.float32
    assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert data.num_classes("phantom", root) == 5
    assert data.default_image_size("phantom", root) == (48, 64)


def test_every_image_holds_each_organ_once_and_organs_never_touch(root):
    for split in ("train", "test"):
        for ex in data.get_source("phantom", root, split):
            label = ex["label"]
            assert set(np.unique(label)) == set(range(5))
            for k in range(1, 5):
                _, components = ndimage.label(label == k)
                assert components == 1
                # Organs are separated by background: growing one never reaches another.
                grown = ndimage.binary_dilation(label == k, structure=np.ones((3, 3)))
                assert set(np.unique(label[grown])) <= {0, k}


def test_deterministic_per_seed_and_independent_of_other_splits(tmp_path, root):
    again = write_phantom_dataset(tmp_path / "again", seed=7, **PARAMS)
    other = write_phantom_dataset(tmp_path / "other", seed=8, **PARAMS)
    more_val = write_phantom_dataset(tmp_path / "more_val", seed=7, **{**PARAMS, "num_val": 9})
    a = data.get_source("phantom", root, "train")
    b = data.get_source("phantom", again, "train")
    c = data.get_source("phantom", other, "train")
    d = data.get_source("phantom", more_val, "train")
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        np.testing.assert_array_equal(a[i]["label"], d[i]["label"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    va, vb = data.get_volumes("phantom", root, "test"), data.get_volumes("phantom", again, "test")
    np.testing.assert_array_equal(va[1]["image"], vb[1]["image"])


def test_existing_dataset_is_reused_or_protected(tmp_path):
    path = write_phantom_dataset(tmp_path / "ph", seed=1, **PARAMS)
    stamp = (path / "phantom.json").stat().st_mtime_ns
    assert write_phantom_dataset(path, seed=1, **PARAMS) == path
    assert (path / "phantom.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match=str(path)):
        write_phantom_dataset(path, seed=2, **PARAMS)
    write_phantom_dataset(path, seed=2, overwrite=True, **PARAMS)
    assert json.loads((path / "phantom.json").read_text())["seed"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_classes_differ_in_intensity():
    rng = np.random.default_rng(0)
    means = {k: [] for k in range(6)}
    for _ in range(20):
        image, label = render_phantom(rng, (64, 64), 6)
        for k in range(6):
            means[k].append(image[ndimage.binary_erosion(label == k, iterations=2)].mean())
    levels = sorted(np.mean(v) for v in means.values())
    assert min(np.diff(levels)) > 0.08


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        render_phantom(np.random.default_rng(0), (64, 64), 7)
    with pytest.raises(ValueError, match="at least 32"):
        render_phantom(np.random.default_rng(0), (16, 64), 3)
    with pytest.raises(ValueError, match="num_val"):
        write_phantom_dataset("/nonexistent/never", num_val=0)
