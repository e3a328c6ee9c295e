"""Segmenting image files, array slices and NIfTI volumes with a predict function (``rwkvunet predict``).

Inputs (any size; each is resized to the network size, and the label map back with nearest neighbour):

* Images (PNG, JPEG, BMP, TIFF): 8-bit images as grey or RGB (whichever the model takes; palette, alpha
  and CMYK files are converted), values / 255. 16-bit and 32-bit grey (Pillow modes ``I;16``, ``I``) are
  divided by 65535 and float images (``F``) must lie in [0, 1]: never clipped to 8 bits. Bilinear resize.
  Mask: ``<name>_mask.png`` (pixel value = class index).
* ``.npy`` / ``.npz`` 2-D slices (H, W) or (H, W, C), values as stored (``.npz``: array ``image``, else the
  first). Cubic resize. Mask: ``<name>_mask.npy`` / ``<name>_mask.npz`` (key ``label``).
* NIfTI volumes (``.nii``, ``.nii.gz``): segmented slice by slice along the last spatial axis as stored,
  cubic resize. Trailing axes of length 1 (``(X, Y, Z, 1)``) are squeezed; real 4-D data is refused.
  Mask: ``<name>_mask.nii.gz`` with the input's shape, affine and header.

``window=(LOW, HIGH)`` clips the stored values of any input to [LOW, HIGH] and scales them to [0, 1]
(e.g. the CT window -125 275 of the Synapse preprocessing). An input that is constant after reading, or
a 16-bit image that uses a small part of its range, gets a warning: the mask of such an image means little.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class InputWarning(UserWarning):
    """An input was read, but what the network sees is probably not what the user meant."""


def input_kind(path: Path) -> str | None:
    """"image", "array", "nifti", or None for an unsupported file name."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    if Path(path).suffix.lower() in ARRAY_SUFFIXES:
        return "array"
    return None


def check_input(path: Path) -> Path:
    """``path`` if it is an existing file of a supported kind; FileNotFoundError / ValueError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    if input_kind(path) is None:
        raise ValueError(f"unsupported input {path}: expected an image ({', '.join(IMAGE_SUFFIXES)}), "
                         f".npy/.npz or .nii/.nii.gz")
    return path


def input_stem(path: Path) -> str:
    """The file name without its (double) suffix: 'case0001' for 'case0001.nii.gz'."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


# ----------------------------------------------------------------------------- readers


def apply_window(array: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """float32 ``array``, clipped to ``window`` and scaled to [0, 1] when one is given."""
    if window is None:
        return np.asarray(array, np.float32)
    low, high = (float(v) for v in window)
    if not high > low:
        raise ValueError(f"--window needs LOW < HIGH, got {low:g} {high:g}")
    return ((np.clip(array, low, high) - low) / (high - low)).astype(np.float32)


def _warn(message: str) -> None:
    warnings.warn(message, InputWarning, stacklevel=3)


def read_image(path: Path, in_chans: int, window: tuple[float, float] | None = None,
               warn: Callable[[str], None] = _warn) -> np.ndarray:
    """float32 (H, W, 1) or (H, W, 3) in [0, 1] of an image file (see the module docstring); ``warn``
    receives a note when a 16-bit image uses a small part of its range."""
    from PIL import Image

    from rwkvunet_jax.data.decode import is_high_depth, to_rgb8_image, unit_range

    with Image.open(path) as img:
        img.load()
        if is_high_depth(img):
            try:
                image = unit_range(img, window)[..., None]
            except ValueError as err:
                raise ValueError(f"{err} (--window LOW HIGH)") from None
            if window is None and img.mode != "F":
                _warn_if_dim(path, np.asarray(img), warn)
            return image
        rgb = to_rgb8_image(img)
        eight_bit = np.asarray(rgb.convert("L") if in_chans == 1 else rgb)
    image = apply_window(eight_bit, window) if window is not None else eight_bit.astype(np.float32) / 255.0
    return image[..., None] if image.ndim == 2 else image


def read_array(path: Path) -> np.ndarray:
    """float32 array of a ``.npy`` file, or of an ``.npz`` archive's ``image`` (else its first) array."""
    from rwkvunet_jax.data.npyio import read_npy, read_npz

    if Path(path).suffix.lower() == ".npy":
        return np.asarray(read_npy(path), np.float32)
    arrays = read_npz(path)
    if not arrays:
        raise ValueError(f"{path} holds no arrays")
    return np.asarray(arrays["image"] if "image" in arrays else next(iter(arrays.values())), np.float32)


def squeeze_volume(volume: np.ndarray, path: Path) -> np.ndarray:
    """A NIfTI data array as (X, Y, Z): trailing length-1 axes dropped, 2-D given Z = 1; ValueError for
    real 4-D (or higher) data, naming its shape."""
    shape = volume.shape
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim != 3:
        raise ValueError(f"{path} has shape {shape}: predict segments 3-D volumes (X, Y, Z); split the "
                         f"axes beyond the third into separate files first")
    return volume


def _warn_if_constant(path: Path, image: np.ndarray, warn: Callable[[str], None]) -> None:
    if image.size and float(image.max()) == float(image.min()):
        warn(f"{path}: every value is {float(image.min()):g} after reading (check --window); the mask of a "
             "constant image means nothing")


def _warn_if_dim(path: Path, raw: np.ndarray, warn: Callable[[str], None]) -> None:
    if raw.size and 0 < raw.max() < 65535 / 16:
        warn(f"{path}: a 16-bit image with values in [{raw.min()}, {raw.max()}] is scaled by 65535, so the network "
             f"sees a dark image; pass --window {raw.min()} {raw.max()} to use its own range")


# ----------------------------------------------------------------------------- the predictor


class Predictor:
    """Reads an input file, segments it at the network size and writes the mask and an overlay.

    ``warn`` receives the notes about suspicious inputs (default: ``warnings.warn`` with :class:`InputWarning`).
    """

    def __init__(self, predict_fn, *, in_chans: int, image_size, batch_size: int, tta: str | bool, window=None,
                 warn: Callable[[str], None] = _warn):
        self.predict_fn = predict_fn
        self.in_chans = in_chans
        self.image_size = tuple(image_size)
        self.batch_size = batch_size
        self.tta = tta
        self.window = None if window is None else tuple(float(v) for v in window)
        self.warn = warn

    def segment(self, slices: np.ndarray, *, order: int) -> np.ndarray:
        """Label maps (N, H, W) of slices (N, H, W, C) at their own size (resize ``order`` in, nearest out)."""
        from rwkvunet_jax.eval.inference import labels_from_probabilities, predict_probabilities
        from rwkvunet_jax.eval.volumes import resize_slices

        slices = self._channels(slices)
        h, w = slices.shape[1:3]
        network_input = resize_slices(slices, self.image_size, order=order).astype(np.float32)
        probs = predict_probabilities(self.predict_fn, network_input, batch_size=self.batch_size, tta=self.tta)
        return resize_slices(labels_from_probabilities(probs), (h, w), order=0).astype(np.int32)

    def predict_file(self, path: Path, outdir: Path) -> list[Path]:
        """Segments one input file into ``outdir``; returns the files written (mask, overlay)."""
        from rwkvunet_jax.eval.report import save_overlay_png

        path = Path(path)
        kind, stem = input_kind(path), input_stem(path)
        if kind == "nifti":
            return self._predict_nifti(path, outdir, stem)
        if kind == "image":
            image = read_image(path, self.in_chans, self.window, self.warn)
        else:
            image = apply_window(read_array(path), self.window)
            if image.ndim == 2:
                image = image[..., None]
            if image.ndim != 3:
                raise ValueError(f"expected a 2-D slice (H, W) or (H, W, C), got shape {image.shape}")
        _warn_if_constant(path, image, self.warn)
        label = self.segment(image[None], order=1 if kind == "image" else 3)[0]
        if kind == "image":
            mask_path = outdir / f"{stem}_mask.png"
            _write_png(mask_path, label)
        elif path.suffix.lower() == ".npz":
            mask_path = outdir / f"{stem}_mask.npz"
            np.savez_compressed(mask_path, label=label.astype(np.uint8))
        else:
            mask_path = outdir / f"{stem}_mask.npy"
            np.save(mask_path, label.astype(np.uint8))
        overlay = save_overlay_png(outdir / f"{stem}_overlay.png", image, label)
        return [mask_path, overlay]

    def _predict_nifti(self, path: Path, outdir: Path, stem: str) -> list[Path]:
        import nibabel as nib

        from rwkvunet_jax.eval.report import save_overlay_png

        img = nib.load(str(path))
        stored = np.asarray(img.dataobj, dtype=np.float32)
        volume = apply_window(squeeze_volume(stored, path), self.window)
        _warn_if_constant(path, volume, self.warn)
        slices = np.moveaxis(volume, -1, 0)[..., None]  # (Z, X, Y, 1): slices along the last axis
        labels = self.segment(slices, order=3)
        mask = np.moveaxis(labels, 0, -1).astype(np.uint8).reshape(stored.shape)  # the input's own shape
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        mask_path = outdir / f"{stem}_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask, img.affine, header), str(mask_path))
        z = int(np.argmax((labels > 0).reshape(len(labels), -1).sum(axis=1)))
        overlay = save_overlay_png(outdir / f"{stem}_overlay.png", slices[z], labels[z])
        return [mask_path, overlay]

    def _channels(self, slices: np.ndarray) -> np.ndarray:
        c = slices.shape[-1]
        if c == self.in_chans:
            return slices
        if c == 1 and self.in_chans == 3:
            return np.repeat(slices, 3, axis=-1)
        if c == 3 and self.in_chans == 1:
            return slices.mean(axis=-1, keepdims=True)
        raise ValueError(f"input has {c} channels but the model takes {self.in_chans}")


def _write_png(path: Path, label: np.ndarray) -> None:
    from PIL import Image

    if label.max(initial=0) > 255:
        raise ValueError(f"{label.max()} classes do not fit an 8-bit PNG")
    Image.fromarray(label.astype(np.uint8)).save(path)
