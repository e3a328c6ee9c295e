"""PIL image operations of the ImageNet recipe: random resized crop, colour jitter, resize + centre crop.

Also the ImageNet mean and standard deviation (the trainer normalises with them; RandAugment fills
uncovered areas with the mean pixel) and the resampling filters, including timm's "random"
interpolation (bilinear or bicubic per image). RandAugment lives in
:mod:`rwkvunet_jax.data.randaugment`.

Every random choice comes from the ``numpy.random.Generator`` passed in, so a grain ``random_map``
seed makes the whole pipeline reproducible and resumable. Pillow is imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resample(rng: np.random.Generator):
    """Bilinear or bicubic with equal odds (timm's ``interpolation="random"``)."""
    from PIL import Image

    return (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]


def resample_filter(name: str):
    """The PIL resampling filter called ``name`` (nearest, bilinear, bicubic, lanczos)."""
    from PIL import Image

    filters = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
    if name not in filters:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {sorted(filters)} or 'random'")
    return filters[name]


def color_jitter(img, rng: np.random.Generator, strength: float = 0.4):
    """Brightness, contrast and saturation each scaled by U(1 - s, 1 + s), in a random order."""
    from PIL import ImageEnhance

    enhancers = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for index in rng.permutation(len(enhancers)):
        factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        img = enhancers[int(index)](img).enhance(factor)
    return img


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` covering a random area fraction in ``scale`` with an
    aspect ratio log-uniform in ``ratio``; after 10 failed draws, the largest central crop whose aspect
    ratio lies in ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img, size: int, rng: np.random.Generator, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        interpolation: str = "random"):
    """Crops a random box (:func:`random_resized_crop_box`) and resizes it to ``size`` x ``size``."""
    left, top, w, h = random_resized_crop_box(img.size[0], img.size[1], rng, scale, ratio)
    resample = random_resample(rng) if interpolation == "random" else resample_filter(interpolation)
    return img.resize((size, size), resample=resample, box=(left, top, left + w, top + h))


def resize_shorter_and_center_crop(img, size: int, *, crop_pct: float = 0.875, interpolation: str = "bicubic"):
    """Evaluation view: shorter side to ``int(size / crop_pct)`` (256 for 224), then the central
    ``size`` x ``size`` crop."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
    short = int(math.floor(size / crop_pct))
    width, height = img.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    img = img.resize((new_w, new_h), resample=resample_filter(interpolation))
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))
