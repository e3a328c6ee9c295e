"""A small synthetic multi-organ dataset for the CPU demo and the tests.

Each 2-D image holds a body (an ellipse slightly darker than the organs around it, label 0) with one
instance of every organ class, placed at a random position and orientation inside the body, never
touching another organ (so labels are overlap-free by construction):

====  =========  ===================================  ==============  ====================
 k    name       shape                                 mean intensity  texture
====  =========  ===================================  ==============  ====================
 1    liver      large ellipse                         0.62            smooth, low frequency
 2    kidney     bean (ellipse with a notch)           0.86            fine grain
 3    spleen     lobed blob (radial harmonics)         0.42            stripes
 4    vessel     capsule (long, thin)                  0.98            none
 5    tumour     round lobed blob                      0.26            spots
====  =========  ===================================  ==============  ====================

The image is blurred slightly (partial-volume edges), multiplied by a smooth bias field and given
Gaussian noise; organ intensities jitter per image. Classes differ in intensity, texture and shape, so a
small network separates them, but one threshold does not.

On disk it uses the Synapse (TransUNet) layout, so the demo runs the real Synapse reader::

    <root>/phantom.json                              parameters, class names
    <root>/train_npz/phantom_train_<NNNN>.npz        'image' (H, W) float32 in [0, 1], 'label' (H, W) uint8
    <root>/{val,test}_vol_h5/phantom_<split>_<NN>.npy.h5   'image', 'label' (D, H, W): D independent images
    <root>/lists_Synapse/{train,val_vol,test_vol}.txt

Every image is drawn from its own generator seeded by (seed, split, index): a dataset is identical per
seed, and the train images do not change when the val/test counts do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

FORMAT = "rwkvunet-phantom-v1"
CLASS_NAMES = ("background", "liver", "kidney", "spleen", "vessel", "tumour")
MAX_CLASSES = len(CLASS_NAMES)
DEFAULT_NUM_CLASSES = 5
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# Per organ: shape, size (fractions of the shorter image side), mean intensity, texture.
_ORGANS = (
    ("ellipse", (0.21, 0.15), 0.62, "smooth"),
    ("bean", (0.13, 0.09), 0.86, "grain"),
    ("blob", (0.12, 0.0), 0.42, "stripes"),
    ("capsule", (0.16, 0.055), 0.98, "none"),
    ("blob", (0.10, 0.0), 0.26, "spots"),
)
_BODY_LEVEL = 0.12


def _shape_mask(kind: str, size: tuple[float, float], yy, xx, center, angle, rng) -> np.ndarray:
    dy, dx = yy - center[0], xx - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    a, b = size
    if kind == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "bean":
        notch = u ** 2 + (v - 1.05 * b) ** 2 <= (0.6 * b) ** 2
        return ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & ~notch
    if kind == "blob":
        phi = np.arctan2(v, u)
        radius = np.full_like(phi, a)
        for m in (2, 3, 4):
            radius += a * rng.uniform(0.0, 0.12) * np.cos(m * phi + rng.uniform(0, 2 * np.pi))
        return np.hypot(u, v) <= radius
    if kind == "capsule":
        return np.hypot(np.maximum(np.abs(u) - a, 0.0), v) <= b
    raise ValueError(f"unknown shape {kind!r}")


def _texture(kind: str, shape: tuple[int, int], yy, xx, rng) -> np.ndarray:
    from scipy import ndimage

    if kind == "none":
        return np.zeros(shape, np.float32)
    if kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(4.0, 6.0)
        return 0.07 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    sigma = {"smooth": min(shape) / 10, "grain": 0.8, "spots": 1.2}[kind]
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    field /= field.std() + 1e-8
    if kind == "spots":
        return np.where(field > 1.0, 0.09, -0.03)
    return field * (0.04 if kind == "smooth" else 0.07)


def _place_organs(rng, shape, num_organs, yy, xx, body) -> list[np.ndarray] | None:
    from scipy import ndimage

    side = min(shape)
    occupied = np.zeros(shape, bool)
    masks = []
    for k in range(num_organs):
        kind, (a, b), _, _ = _ORGANS[k]
        for _ in range(40):
            scale = rng.uniform(0.85, 1.15) * side
            extent = 1.4 * (a + b) * scale  # bounds every shape's reach from its centre (blob lobes too)
            # Centres uniform in the body ellipse shrunk by the shape's half width: most draws fit the body
            # without crowding the large organs into the middle.
            margin = (b or a) * scale
            radius, theta = np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            center = (shape[0] / 2 + radius * np.sin(theta) * max(0.47 * shape[0] - margin, 0.0),
                      shape[1] / 2 + radius * np.cos(theta) * max(0.47 * shape[1] - margin, 0.0))
            # Evaluate the shape only in the window it can reach.
            top, left = max(int(center[0] - extent) - 1, 0), max(int(center[1] - extent) - 1, 0)
            window = (slice(top, int(center[0] + extent) + 2), slice(left, int(center[1] + extent) + 2))
            mask = np.zeros(shape, bool)
            mask[window] = _shape_mask(kind, (a * scale, b * scale), yy[window], xx[window], center,
                                       rng.uniform(0, np.pi), rng)
            if mask.sum() >= 8 and not (mask & ~body).any() and not (mask & occupied).any():
                masks.append(mask)
                occupied |= ndimage.binary_dilation(mask, iterations=2)
                break
        else:
            return None
    return masks


def render_phantom(rng: np.random.Generator, image_size: tuple[int, int] = (64, 64),
                   num_classes: int = DEFAULT_NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """One phantom image: (image float32 (H, W) in [0, 1], label uint8 (H, W) in [0, num_classes))."""
    from scipy import ndimage

    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")
    shape = (int(image_size[0]), int(image_size[1]))
    if min(shape) < 32:
        raise ValueError(f"phantom images need a side of at least 32 pixels, got {shape}")
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    body = ((yy - cy) / (0.47 * shape[0])) ** 2 + ((xx - cx) / (0.47 * shape[1])) ** 2 <= 1.0

    masks = None
    while masks is None:  # rejection sampling; a full layout is found within a few tries
        masks = _place_organs(rng, shape, num_classes - 1, yy, xx, body)

    image = body * (_BODY_LEVEL + _texture("smooth", shape, yy, xx, rng))
    label = np.zeros(shape, np.uint8)
    for k, mask in enumerate(masks, start=1):
        _, _, level, texture = _ORGANS[k - 1]
        level = level + rng.uniform(-0.03, 0.03)
        image = np.where(mask, level + _texture(texture, shape, yy, xx, rng), image)
        label[mask] = k
    image = ndimage.gaussian_filter(image, 0.6)
    bias = ndimage.gaussian_filter(rng.standard_normal(shape), min(shape) / 4)
    image = image * (1.0 + 0.1 * bias / (bias.std() + 1e-8))
    image = image + rng.normal(0.0, 0.035, shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label


def _image(seed: int, split: str, index: int, image_size, num_classes):
    return render_phantom(np.random.default_rng([seed, _SPLIT_CODE[split], index]), image_size, num_classes)


def _write_volumes(tmp: Path, split: str, count: int, per_volume: int, seed: int, image_size, num_classes):
    import h5py

    folder = tmp / f"{split}_vol_h5"
    folder.mkdir()
    names = []
    for v, start in enumerate(range(0, count, per_volume)):
        pairs = [_image(seed, split, i, image_size, num_classes) for i in range(start, min(start + per_volume, count))]
        name = f"phantom_{split}_{v:02d}"
        with h5py.File(folder / f"{name}.npy.h5", "w") as f:
            f.create_dataset("image", data=np.stack([p[0] for p in pairs]))
            f.create_dataset("label", data=np.stack([p[1] for p in pairs]))
        names.append(name)
    (tmp / "lists_Synapse" / f"{split}_vol.txt").write_text("\n".join(names) + "\n")


def write_phantom_dataset(root: str | Path, *, num_train: int = 240, num_val: int = 32, num_test: int = 48,
                          image_size: tuple[int, int] = (64, 64), num_classes: int = DEFAULT_NUM_CLASSES,
                          seed: int = 0, slices_per_volume: int = 8, overwrite: bool = False) -> Path:
    """Writes the phantom dataset to ``root`` (layout in the module docstring) and returns ``root``.

    A dataset already at ``root`` with the same parameters is reused; one with other parameters raises
    FileExistsError unless ``overwrite``. The dataset is written to a temporary folder and moved into
    place, so an interrupted run never leaves a half-written dataset behind.
    """
    root = Path(root)
    for name, count in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if count < 1:
            raise ValueError(f"{name} must be positive, got {count}")
    if slices_per_volume < 1:
        raise ValueError(f"slices_per_volume must be positive, got {slices_per_volume}")
    meta = {"format": FORMAT, "num_classes": int(num_classes), "class_names": list(CLASS_NAMES[:num_classes]),
            "image_size": [int(s) for s in image_size], "seed": int(seed), "num_train": int(num_train),
            "num_val": int(num_val), "num_test": int(num_test), "slices_per_volume": int(slices_per_volume)}
    render_phantom(np.random.default_rng(0), image_size, num_classes)  # validates the arguments early

    if root.exists():
        meta_file = root / "phantom.json"
        if meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
            return root
        if not overwrite and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and does not hold a phantom dataset with these parameters "
                                  "(pass overwrite=True to replace it)")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (tmp / "train_npz").mkdir()
        (tmp / "lists_Synapse").mkdir()
        names = []
        for i in range(num_train):
            image, label = _image(seed, "train", i, image_size, num_classes)
            names.append(f"phantom_train_{i:04d}")
            np.savez(tmp / "train_npz" / f"{names[-1]}.npz", image=image, label=label)
        (tmp / "lists_Synapse" / "train.txt").write_text("\n".join(names) + "\n")
        _write_volumes(tmp, "val", num_val, slices_per_volume, seed, image_size, num_classes)
        _write_volumes(tmp, "test", num_test, slices_per_volume, seed, image_size, num_classes)
        (tmp / "phantom.json").write_text(json.dumps(meta, indent=2) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def read_phantom_meta(root: str | Path) -> dict:
    """The parameters a phantom dataset was written with (``<root>/phantom.json``)."""
    from rwkvunet_jax.data.base import require_file

    meta = json.loads(require_file(Path(root) / "phantom.json", "phantom dataset description").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{Path(root) / 'phantom.json'}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta
