"""Thread-safe .npy/.npz reading (rwkvunet_jax.data.npyio) against np.load, and readers under contention.

The contention test provokes python/cpython gh-106905 the way a loaded machine does (frequent thread
switches, garbage collections running finalizers while ``ast`` builds a tree): ``np.load`` from several
threads then fails with ``SystemError: AST constructor recursion depth mismatch`` on CPython 3.11.7.
"""

from __future__ import annotations

import gc
import io
import sys
import threading

import numpy as np
import pytest

from rwkvunet_jax.data.base import read_h5, read_npz_slice
from rwkvunet_jax.data.npyio import read_npy, read_npy_stream, read_npz

ARRAYS = {
    "f32": np.random.default_rng(0).random((5, 7), dtype=np.float32),
    "f64_big_endian": np.arange(12, dtype=">f8").reshape(3, 4),
    "u8": np.arange(30, dtype=np.uint8).reshape(2, 3, 5),
    "bool": np.array([[True, False], [False, True]]),
    "f16_fortran": np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3)),
    "scalar": np.array(3.5),
    "empty": np.zeros((0, 4), np.int16),
    "one_dim": np.arange(9, dtype=np.int64),
    "unicode": np.array(["case0001", "liver"]),
    "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),  # the locked ast path
}


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_arrays_equal_np_load(tmp_path, compressed):
    path = tmp_path / "a.npz"
    (np.savez_compressed if compressed else np.savez)(path, **ARRAYS)
    ours = read_npz(path)
    with np.load(path) as reference:
        assert sorted(ours) == sorted(reference.files)
        for key in reference.files:
            assert ours[key].dtype == reference[key].dtype and ours[key].shape == reference[key].shape, key
            np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
            assert ours[key].flags.writeable


def test_npy_files_of_every_header_version(tmp_path):
    for version in ((1, 0), (2, 0), (3, 0)):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, ARRAYS["f64_big_endian"], version=version)
        buffer.seek(0)
        np.testing.assert_array_equal(read_npy_stream(buffer), ARRAYS["f64_big_endian"])
    np.save(tmp_path / "x.npy", ARRAYS["f16_fortran"])
    np.testing.assert_array_equal(read_npy(tmp_path / "x.npy"), np.load(tmp_path / "x.npy"))


def test_bad_files_fail_with_the_path(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not an npz file")
    with pytest.raises(ValueError, match="junk.npz: not an .npz archive"):
        read_npz(tmp_path / "junk.npz")
    np.savez(tmp_path / "s.npz", image=np.zeros((2, 2)), other=np.zeros(1))
    with pytest.raises(ValueError, match=r"expected arrays \['image', 'label'\], found \['image', 'other'\]"):
        read_npz_slice(tmp_path / "s.npz")
    np.savez(tmp_path / "o.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled"):
        read_npz(tmp_path / "o.npz")
    np.save(tmp_path / "t.npy", np.zeros(100))
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-16])
    with pytest.raises(ValueError, match="truncated"):
        read_npy(tmp_path / "t.npy")


class _Finalized:
    """Cyclic garbage with a finalizer: collecting it runs Python code, where threads switch."""

    def __init__(self):
        self.me = self

    def __del__(self):
        pass


def _hammer(read, items, threads=8, calls=400):
    """Calls ``read(item)`` from ``threads`` threads at once under heavy switching and GC; returns the
    exceptions and the results of the first round."""
    errors, first = [], {}
    old_interval, old_threshold = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(50)
    barrier = threading.Barrier(threads)

    def work(k):
        barrier.wait()
        for n in range(calls):
            _Finalized()
            item = items[(k + n) % len(items)]
            try:
                result = read(item)
            except Exception as err:  # collected and reported below
                errors.append(f"{type(err).__name__}: {err}")
            else:
                first.setdefault(item, result)

    try:
        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(old_interval)
        gc.set_threshold(*old_threshold)
    return errors, first


def test_npz_slices_read_from_many_threads_at_once(tmp_path):
    rng = np.random.default_rng(1)
    files, expected = [], {}
    for i in range(8):
        path = tmp_path / f"case0001_slice{i:03d}.npz"
        image, label = rng.random((24, 20)).astype(np.float32), rng.integers(0, 9, (24, 20)).astype(np.float32)
        np.savez(path, image=image, label=label)
        files.append(path)
        expected[path] = (image, label.astype(np.int32))
    errors, results = _hammer(read_npz_slice, files)
    assert not errors, f"{len(errors)} of 3200 reads failed, e.g. {errors[0]}"
    for path, (image, label) in expected.items():
        np.testing.assert_array_equal(results[path][0], image)
        np.testing.assert_array_equal(results[path][1], label)


def test_h5_slices_read_from_many_threads_at_once(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(2)
    volumes = {}
    for v in range(3):
        path = tmp_path / f"case{v:04d}.npy.h5"
        image, label = rng.random((6, 16, 12)).astype(np.float32), rng.integers(0, 4, (6, 16, 12))
        with h5py.File(path, "w") as f:
            f["image"], f["label"] = image, label
        volumes[path] = (image, label)
    items = [(path, z) for path in volumes for z in range(6)]
    errors, results = _hammer(lambda item: read_h5(*item), items, calls=150)
    assert not errors, f"{len(errors)} reads failed, e.g. {errors[0]}"
    for (path, z), (image, label) in results.items():
        np.testing.assert_array_equal(image, volumes[path][0][z])
        np.testing.assert_array_equal(label, volumes[path][1][z])
