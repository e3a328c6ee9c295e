"""RandAugment on PIL images: the operations, their magnitude-to-argument rules and the policy.

Written from the published descriptions (Cubuk et al. 2020, "RandAugment"; the timm policy string
``rand-m9-mstd0.5-inc1`` used by the official pretraining): each image gets ``num_ops`` operations
drawn uniformly with replacement, each applied with probability ``prob``, at a magnitude drawn per
operation from ``N(magnitude, magnitude_std)`` clipped to ``[0, 10]``. ``inc1`` selects the
"increasing" operation set (:data:`INCREASING_OPS`), where a larger magnitude always means a stronger
distortion; without it (``inc0``, timm's default) the plain set (:data:`PLAIN_OPS`) is used, whose
posterize, solarize and enhance ops weaken as the magnitude grows.

Posterize keeps ``bits`` in 0..8 most significant bits of each channel. timm's levels reach 0 bits
(increasing set at magnitude 10, plain set at magnitude 0); Pillow < 13 computed its mask
``~(2 ** (8 - bits) - 1)`` for that too, which zeroes every pixel, and Pillow 13 rejects ``bits=0``.
:func:`posterize` applies the same mask through its own lookup table, so 0 bits gives a black image
as it did in the reference runs, on every Pillow version.

Every random choice comes from the ``numpy.random.Generator`` passed in, so a grain ``random_map``
seed makes the whole pipeline reproducible and resumable. Pillow is imported lazily. Crops, colour
jitter and the ImageNet mean/std are in :mod:`rwkvunet_jax.data.image_ops`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rwkvunet_jax.data.image_ops import IMAGENET_MEAN, random_resample

MAX_LEVEL = 10.0
# Mean ImageNet pixel, (124, 116, 104): what geometric ops paint into the area they uncover (as timm's
# create_transform sets img_mean for RandAugment).
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)

# Strongest setting of each operation (reached at level 10).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE_FRACTION = 0.45
MAX_ENHANCE_DELTA = 0.9
MAX_SOLARIZE_ADD = 110


def _pil():
    from PIL import Image, ImageEnhance, ImageOps

    return Image, ImageEnhance, ImageOps


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img, matrix: Sequence[float], rng: np.random.Generator):
    Image, _, _ = _pil()
    return img.transform(img.size, Image.Transform.AFFINE, tuple(matrix), resample=random_resample(rng),
                         fillcolor=_fill(img))


def _fill(img):
    return FILL if img.mode == "RGB" else FILL[0]


# ----------------------------------------------------------------------------- operations
# Each takes (PIL image, level in [0, 10], rng) and returns a PIL image.


def auto_contrast(img, level, rng):
    return _pil()[2].autocontrast(img)


def equalize(img, level, rng):
    return _pil()[2].equalize(img)


def invert(img, level, rng):
    return _pil()[2].invert(img)


def rotate(img, level, rng):
    degrees = _signed(level / MAX_LEVEL * MAX_ROTATE_DEGREES, rng)
    return img.rotate(degrees, resample=random_resample(rng), fillcolor=_fill(img))


def _point(img, lut: Sequence[int]):
    """The same 256-entry lookup table applied to every band of an 8-bit image (L, RGB, ...)."""
    return img.point(list(lut) * len(img.getbands()))


def posterize(img, bits: int):
    """Keeps the ``bits`` (0..8) most significant bits of every channel; 0 bits gives a black image.

    Pillow's own mask (``~(2 ** (8 - bits) - 1)``) in a lookup table of ours, because Pillow >= 13
    refuses ``bits=0``, which timm's levels produce (see the module docstring).
    """
    bits = int(bits)
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1)
    return _point(img, [i & mask for i in range(256)])


def posterize_increasing(img, level, rng):
    return posterize(img, 4 - int(level / MAX_LEVEL * 4))  # 4 bits at level 0 down to 0 bits at 10


def posterize_plain(img, level, rng):
    return posterize(img, int(level / MAX_LEVEL * 4))  # 0 bits at level 0 up to 4 bits at 10


def solarize(img, threshold: int):
    """Inverts the pixels ``>= threshold`` (256: none, 0: all)."""
    return _point(img, [255 - i if i >= threshold else i for i in range(256)])


def solarize_increasing(img, level, rng):
    return solarize(img, 256 - int(level / MAX_LEVEL * 256))


def solarize_plain(img, level, rng):
    return solarize(img, min(256, int(level / MAX_LEVEL * 256)))


def solarize_add(img, level, rng, threshold: int = 128):
    add = int(level / MAX_LEVEL * MAX_SOLARIZE_ADD)
    return _point(img, [min(255, i + add) if i < threshold else i for i in range(256)])


def _enhancer(name: str, increasing: bool) -> Callable:
    def op(img, level, rng):
        if increasing:  # 1 +- 0.9 level / 10: no change at level 0
            factor = 1.0 + _signed(level / MAX_LEVEL * MAX_ENHANCE_DELTA, rng)
        else:  # 0.1 at level 0 up to 1.9 at level 10, no random sign
            factor = level / MAX_LEVEL * 2 * MAX_ENHANCE_DELTA + (1.0 - MAX_ENHANCE_DELTA)
        return getattr(_pil()[1], name)(img).enhance(factor)

    op.__name__ = f"{name.lower()}_{'increasing' if increasing else 'plain'}"
    return op


color_increasing = _enhancer("Color", True)
contrast_increasing = _enhancer("Contrast", True)
brightness_increasing = _enhancer("Brightness", True)
sharpness_increasing = _enhancer("Sharpness", True)
color_plain = _enhancer("Color", False)
contrast_plain = _enhancer("Contrast", False)
brightness_plain = _enhancer("Brightness", False)
sharpness_plain = _enhancer("Sharpness", False)


def shear_x(img, level, rng):
    shear = _signed(level / MAX_LEVEL * MAX_SHEAR, rng)
    return _affine(img, (1, shear, 0, 0, 1, 0), rng)


def shear_y(img, level, rng):
    shear = _signed(level / MAX_LEVEL * MAX_SHEAR, rng)
    return _affine(img, (1, 0, 0, shear, 1, 0), rng)


def translate_x_rel(img, level, rng):
    pixels = _signed(level / MAX_LEVEL * MAX_TRANSLATE_FRACTION, rng) * img.size[0]
    return _affine(img, (1, 0, pixels, 0, 1, 0), rng)


def translate_y_rel(img, level, rng):
    pixels = _signed(level / MAX_LEVEL * MAX_TRANSLATE_FRACTION, rng) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, pixels), rng)


INCREASING_OPS: dict[str, Callable] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "PosterizeIncreasing": posterize_increasing,
    "SolarizeIncreasing": solarize_increasing,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": color_increasing,
    "ContrastIncreasing": contrast_increasing,
    "BrightnessIncreasing": brightness_increasing,
    "SharpnessIncreasing": sharpness_increasing,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}

# timm's ``_RAND_TRANSFORMS`` (policy without ``inc1``): the same operations, but posterize, solarize and
# the four enhancers use the original levels that weaken as the magnitude grows.
PLAIN_OPS: dict[str, Callable] = {
    **{k: v for k, v in INCREASING_OPS.items()
       if k in ("AutoContrast", "Equalize", "Invert", "Rotate", "SolarizeAdd")},
    "Posterize": posterize_plain,
    "Solarize": solarize_plain,
    "Color": color_plain,
    "Contrast": contrast_plain,
    "Brightness": brightness_plain,
    "Sharpness": sharpness_plain,
    **{k: v for k, v in INCREASING_OPS.items() if k in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")},
}


# ----------------------------------------------------------------------------- RandAugment


@dataclass(frozen=True)
class RandAugmentPolicy:
    """Parsed ``rand-m<M>-n<N>-mstd<S>-p<P>-inc<0|1>`` policy (timm's naming)."""

    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.5
    prob: float = 0.5
    increasing: bool = True

    @property
    def ops(self) -> dict[str, Callable]:
        """The operation set the policy draws from."""
        return INCREASING_OPS if self.increasing else PLAIN_OPS

    @classmethod
    def parse(cls, policy: str) -> RandAugmentPolicy:
        parts = policy.split("-")
        if not parts or parts[0] != "rand":
            raise ValueError(f"RandAugment policy must start with 'rand', got {policy!r}")
        values: dict[str, Any] = {}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|inc|m|n|p)([0-9.]+)", part)
            if not match:
                raise ValueError(f"unknown RandAugment policy field {part!r} in {policy!r}")
            key, value = match.groups()
            if key == "m":
                values["magnitude"] = float(value)
            elif key == "n":
                values["num_ops"] = int(value)
            elif key == "mstd":
                values["magnitude_std"] = float(value)
            elif key == "p":
                values["prob"] = float(value)
            else:
                values["increasing"] = bool(int(value))
        # timm's default without "inc" is the plain set.
        values.setdefault("increasing", False)
        return cls(**values)


def draw_level(policy: RandAugmentPolicy, rng: np.random.Generator) -> float:
    """One operation's level: ``N(magnitude, magnitude_std)`` clipped to [0, 10] (the magnitude if std 0)."""
    level = policy.magnitude
    if policy.magnitude_std > 0:
        level = rng.normal(policy.magnitude, policy.magnitude_std)
    return float(np.clip(level, 0.0, MAX_LEVEL))


def rand_augment(img, rng: np.random.Generator, policy: RandAugmentPolicy = RandAugmentPolicy()):
    """Applies ``policy.num_ops`` random operations of ``policy.ops`` to an 8-bit PIL image (L or RGB)."""
    ops = policy.ops
    names = list(ops)
    for index in rng.integers(len(names), size=policy.num_ops):
        if rng.random() >= policy.prob:
            continue
        img = ops[names[int(index)]](img, draw_level(policy, rng), rng)
    return img
