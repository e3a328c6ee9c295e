"""Pillow images of any mode as 8-bit RGB, or as values in [0, 1] over their full range.

Real image collections mix modes: ImageNet has CMYK JPEGs and PNG files named ``.JPEG``, medical
exports are 16-bit grey (Pillow modes ``I;16``, ``I``) or float (``F``). None of these is an error:

* 8-bit modes (RGB, L, P, CMYK, YCbCr, RGBA, LA, PA, 1, ...): alpha is dropped (what
  ``convert("RGB")`` in timm and torchvision does), palettes with a transparent colour go through RGBA.
* 16-bit and 32-bit integer grey: divided by 65535 (``I;16*``; ``I`` whose values fit 16 bits), never
  clipped to 8 bits, which turns most of them into a constant image.
* Float grey (``F``) already in [0, 1] is used as is. Other float or 32-bit ranges have no natural
  scale: :func:`unit_range` raises ValueError asking for an intensity window.

Pillow is imported lazily.
"""

from __future__ import annotations

import numpy as np

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_DEPTH_MODES = SIXTEEN_BIT_MODES + ("I", "F")


def is_high_depth(img) -> bool:
    """True for Pillow's 16-bit, 32-bit integer and float modes (one grey channel)."""
    return img.mode in HIGH_DEPTH_MODES


def unit_range(img, window: tuple[float, float] | None = None) -> np.ndarray:
    """float32 (H, W) in [0, 1] of a grey image of any depth.

    ``window=(low, high)`` clips the stored values to it and scales (e.g. a CT window); otherwise 8-bit
    values are divided by 255, 16-bit by 65535, and float images must already lie in [0, 1].
    """
    mode = img.mode
    if not is_high_depth(img) and mode != "L":
        img = to_rgb8_image(img).convert("L")
        mode = "L"
    values = np.asarray(img, dtype=np.float64)
    if window is not None:
        low, high = (float(v) for v in window)
        if not high > low:
            raise ValueError(f"the window must have LOW < HIGH, got ({low}, {high})")
        return ((np.clip(values, low, high) - low) / (high - low)).astype(np.float32)
    if mode == "L":
        scale = 255.0
    elif mode in SIXTEEN_BIT_MODES or (mode == "I" and values.min(initial=0) >= 0 and values.max(initial=0) <= 65535):
        scale = 65535.0
    elif mode == "F" and values.size and np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1:
        scale = 1.0
    else:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        raise ValueError(f"a {'float' if mode == 'F' else '32-bit'} grey image with values in [{lo:g}, {hi:g}] "
                         "has no natural intensity range: give an intensity window")
    return (values / scale).astype(np.float32)


def to_rgb8_image(img):
    """An 8-bit RGB Pillow image of ``img`` (any mode; see the module docstring)."""
    if img.mode == "RGB":
        return img
    if is_high_depth(img):
        from PIL import Image

        grey = np.rint(unit_range(img) * 255.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode in ("P", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def to_rgb8(img) -> np.ndarray:
    """uint8 (H, W, 3) of a Pillow image of any mode."""
    array = np.asarray(to_rgb8_image(img), dtype=np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) after conversion, got shape {array.shape}")
    return np.ascontiguousarray(array)


def read_rgb8(path) -> np.ndarray:
    """uint8 (H, W, 3) of an image file of any format and mode Pillow reads (decoded completely)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode now, inside the with: truncated files raise here with the path in the traceback
        return to_rgb8(img)
