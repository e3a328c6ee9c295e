"""Decoded files of every kind ImageNet holds (CMYK JPEGs, grey, PNGs named .JPEG, palette and alpha, a
truncated and an empty file) through the ``:b`` pretraining source and transform: nothing raises, every
image comes out uint8 at the network size, and only the two unreadable files are replaced."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rwkvunet_jax.commands.parsing import load_config
from rwkvunet_jax.data import imagenet as inet
from rwkvunet_jax.data.bad_examples import BAD_INDEX, ReadAndTransform
from rwkvunet_jax.data.pipeline import train_iterator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KINDS = ("noise", "structured", "grey", "cmyk", "palette_alpha_png", "rgba_png", "la_png", "grey16_png",
         "bilevel_png", "tiny", "strip")


def _pixels(rng, h, w, kind_index):
    if kind_index % 3 == 0:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if kind_index % 3 == 1:  # gradients and stripes, sometimes constant black or white
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 16 * 16], -1)
        return base.astype(np.uint8)
    return np.full((h, w, 3), 255 * int(rng.integers(2)), np.uint8)


def write_messy_imagefolder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` small images of the kinds in :data:`KINDS` (every file named ``.JPEG``) in four class
    folders, plus ``bad/truncated.JPEG`` and ``bad/empty.JPEG``. Writes ``expected.npz``: the RGB each
    lossless file must decode to, by file name."""
    rng = np.random.default_rng(seed)
    expected = {}
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        h, w = (int(v) for v in rng.integers(3, 64, size=2) | 1)  # odd sizes
        if kind == "tiny":
            h, w = (1, 1) if i % 2 else (2, 3)
        elif kind == "strip":
            h, w = (1, 97) if i % 2 else (97, 1)
        rgb = _pixels(rng, h, w, i // len(KINDS))
        folder = root / f"n{i % 4:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{kind}_{i:05d}.JPEG"
        if kind in ("noise", "structured", "tiny", "strip"):
            Image.fromarray(rgb).save(path, format="JPEG", quality=90)
        elif kind == "grey":
            Image.fromarray(rgb[..., 0]).save(path, format="JPEG")
        elif kind == "cmyk":
            Image.fromarray(rgb).convert("CMYK").save(path, format="JPEG", quality=95)
            expected["cmyk/" + path.name] = rgb  # lossy: compared loosely
        elif kind == "palette_alpha_png":
            palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
            index = rng.integers(0, 16, (h, w), dtype=np.uint8)
            img = Image.fromarray(index, mode="P")
            img.putpalette(palette.reshape(-1).tolist())
            img.info["transparency"] = 3
            img.save(path, format="PNG", transparency=3)
            expected[path.name] = palette[index]
        elif kind == "rgba_png":
            alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
            Image.fromarray(np.concatenate([rgb, alpha], -1)).save(path, format="PNG")
            expected[path.name] = rgb
        elif kind == "la_png":
            alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
            Image.fromarray(np.stack([rgb[..., 0], alpha], -1), mode="LA").save(path, format="PNG")
            expected[path.name] = np.repeat(rgb[..., :1], 3, -1)
        elif kind == "grey16_png":
            grey16 = rng.integers(0, 65536, (h, w), dtype=np.uint16)
            Image.fromarray(grey16).save(path, format="PNG")
            expected[path.name] = np.repeat(np.rint(grey16 / 257.0).astype(np.uint8)[..., None], 3, -1)
        elif kind == "bilevel_png":
            bits = rng.integers(0, 2, (h, w)).astype(bool)
            Image.fromarray(bits).save(path, format="PNG")
            expected[path.name] = np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1)
    bad = root / "n00000003"
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (bad / "truncated.JPEG").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (bad / "empty.JPEG").write_bytes(b"")
    np.savez(root.parent / f"{root.name}_expected.npz", **expected)
    return root


def b_transform() -> inet.TrainTransform:
    """The training transform of ``configs/pretrain_imagenet.py:b``."""
    config = load_config(f"{CONFIGS / 'pretrain_imagenet.py'}:b")
    aug = config.aug
    return inet.TrainTransform(config.data.image_size, randaugment=aug.randaugment or None,
                               color_jitter=aug.color_jitter,
                               color_jitter_with_randaugment=aug.color_jitter_with_randaugment, hflip=aug.hflip,
                               scale=tuple(aug.scale), ratio=tuple(aug.ratio), interpolation=aug.interpolation)


def _check_folder(root: Path, seed: int) -> None:
    source = inet.ImageFolderSource(root)
    unreadable = {i for i in range(len(source)) if Path(source.describe(i)).name in ("truncated.JPEG", "empty.JPEG")}
    assert len(unreadable) == 2

    expected = np.load(root.parent / f"{root.name}_expected.npz")
    for i in range(len(source)):
        if i in unreadable:
            continue
        image = source[i]["image"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        name = Path(source.describe(i)).name
        if name in expected.files:  # lossless files: exactly the RGB written (alpha dropped)
            np.testing.assert_array_equal(image, expected[name], err_msg=name)
        elif "cmyk/" + name in expected.files:  # not inverted, not channel-swapped: within JPEG error
            diff = np.abs(image.astype(int) - expected["cmyk/" + name].astype(int))
            assert diff.mean() < 12, (name, diff.mean())

    transform = ReadAndTransform(source, b_transform())
    size = transform.transform.image_size
    replaced = set()
    for i in range(len(source)):
        out = transform(i, np.random.default_rng([seed, i]))
        assert out["image"].shape == (size, size, 3) and out["image"].dtype == np.uint8
        if out[BAD_INDEX] >= 0:
            assert out[BAD_INDEX] == i
            replaced.add(i)
    assert replaced == unreadable


def test_three_hundred_real_files_through_the_b_transform(tmp_path):
    _check_folder(write_messy_imagefolder(tmp_path / "train", 300), seed=0)


@pytest.mark.slow
def test_three_thousand_real_files_through_the_b_transform(tmp_path):
    _check_folder(write_messy_imagefolder(tmp_path / "train", 3000, seed=1), seed=1)


def test_train_iterator_replaces_unreadable_files_the_same_way_every_run(tmp_path):
    root = write_messy_imagefolder(tmp_path / "train", 40)
    source = inet.ImageFolderSource(root)
    runs = []
    for _ in range(2):
        it = train_iterator(source, inet.TrainTransform(16), batch_size=7, seed=5)
        runs.append([next(it) for _ in range(12)])  # two epochs of 42 examples
    flagged = np.concatenate([b[BAD_INDEX] for b in runs[0]])
    names = {Path(source.describe(i)).name for i in flagged[flagged >= 0]}
    assert names == {"truncated.JPEG", "empty.JPEG"}
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a[BAD_INDEX], b[BAD_INDEX])
