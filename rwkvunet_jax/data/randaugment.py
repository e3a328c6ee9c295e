"""RandAugment on PIL images: the operations, their magnitude-to-argument rules and the policy.

Written from the published descriptions (Cubuk et al. 2020, "RandAugment") and timm's policy strings
(the official pretraining used ``rand-m9-mstd0.5-inc1``): each image gets ``num_ops`` operations drawn
uniformly with replacement, each applied with probability ``prob``, at a level drawn per operation
from ``N(magnitude, magnitude_std)`` (uniform on ``[0, magnitude]`` when the std exceeds 100) and
clipped to ``[0, magnitude_max]``. ``inc1`` selects the "increasing" operation set
(:data:`INCREASING_OPS`), where a larger level always means a stronger distortion; without it
(``inc0``, timm's default) the plain set (:data:`PLAIN_OPS`) is used, whose posterize, solarize and
enhance ops weaken as the level grows. :meth:`RandAugmentPolicy.parse` reads the policy strings with
timm's defaults for omitted fields.

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

# Level at which each op reaches the settings below (timm's _LEVEL_DENOM); levels up to 10 unless the
# policy's ``mmax`` allows more, which extrapolates the same rules.
LEVEL_SCALE = 10.0
# Mean ImageNet pixel, (124, 116, 104): what geometric ops paint into the area they uncover (as timm's
# create_transform sets img_mean for RandAugment).
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)

# Setting of each operation at level 10 (the strongest, unless ``mmax`` allows higher levels).
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
# Each takes (PIL image, level >= 0, rng) and returns a PIL image; the level is 0..10 unless the policy's
# ``mmax`` allows more, and the clamps below keep timm's arguments for such levels.


def auto_contrast(img, level, rng):
    return _pil()[2].autocontrast(img)


def equalize(img, level, rng):
    return _pil()[2].equalize(img)


def invert(img, level, rng):
    return _pil()[2].invert(img)


def rotate(img, level, rng):
    degrees = _signed(level / LEVEL_SCALE * MAX_ROTATE_DEGREES, rng)
    return img.rotate(degrees, resample=random_resample(rng), fillcolor=_fill(img))


def _point(img, lut: Sequence[int]):
    """The same 256-entry lookup table applied to every band of an 8-bit image (L, RGB, ...)."""
    return img.point(list(lut) * len(img.getbands()))


def posterize(img, bits: int):
    """Keeps the ``bits`` (0..8) most significant bits of every channel; 0 bits gives a black image, and
    so do the negative counts the increasing op reaches above level 10 (``mmax``), as in Pillow < 13.

    Pillow's own mask (``~(2 ** (8 - bits) - 1)``) in a lookup table of ours, because Pillow >= 13
    refuses ``bits=0``, which timm's levels produce (see the module docstring).
    """
    bits = int(bits)
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - max(bits, 0)) - 1)
    return _point(img, [i & mask for i in range(256)])


def posterize_increasing(img, level, rng):
    return posterize(img, 4 - int(level / LEVEL_SCALE * 4))  # 4 bits at level 0 down to 0 bits at 10


def posterize_plain(img, level, rng):
    return posterize(img, int(level / LEVEL_SCALE * 4))  # 0 bits at level 0 up to 4 bits at 10


def solarize(img, threshold: int):
    """Inverts the pixels ``>= threshold`` (256: none, 0: all)."""
    return _point(img, [255 - i if i >= threshold else i for i in range(256)])


def _solarize_threshold(level: float) -> int:
    return min(256, int(level / LEVEL_SCALE * 256))  # 0 at level 0 up to 256 (no pixel) at 10


def solarize_increasing(img, level, rng):
    return solarize(img, 256 - _solarize_threshold(level))


def solarize_plain(img, level, rng):
    return solarize(img, _solarize_threshold(level))


def solarize_add(img, level, rng, threshold: int = 128):
    add = min(128, int(level / LEVEL_SCALE * MAX_SOLARIZE_ADD))
    return _point(img, [min(255, i + add) if i < threshold else i for i in range(256)])


def _enhancer(name: str, increasing: bool) -> Callable:
    def op(img, level, rng):
        if increasing:  # 1 +- 0.9 level / 10: no change at level 0, never below 0.1
            factor = max(0.1, 1.0 + _signed(level / LEVEL_SCALE * MAX_ENHANCE_DELTA, rng))
        else:  # 0.1 at level 0 up to 1.9 at level 10, no random sign
            factor = level / LEVEL_SCALE * 2 * MAX_ENHANCE_DELTA + (1.0 - MAX_ENHANCE_DELTA)
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
    shear = _signed(level / LEVEL_SCALE * MAX_SHEAR, rng)
    return _affine(img, (1, shear, 0, 0, 1, 0), rng)


def shear_y(img, level, rng):
    shear = _signed(level / LEVEL_SCALE * MAX_SHEAR, rng)
    return _affine(img, (1, 0, 0, shear, 1, 0), rng)


def translate_x_rel(img, level, rng):
    pixels = _signed(level / LEVEL_SCALE * MAX_TRANSLATE_FRACTION, rng) * img.size[0]
    return _affine(img, (1, 0, pixels, 0, 1, 0), rng)


def translate_y_rel(img, level, rng):
    pixels = _signed(level / LEVEL_SCALE * MAX_TRANSLATE_FRACTION, rng) * img.size[1]
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

# timm's ``_RAND_TRANSFORMS`` in its order (policy without ``inc1``): the same operations, but posterize,
# solarize and the four enhancers use the original levels that weaken as the magnitude grows.
PLAIN_OPS: dict[str, Callable] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "Rotate": rotate,
    "Posterize": posterize_plain,
    "Solarize": solarize_plain,
    "SolarizeAdd": solarize_add,
    "Color": color_plain,
    "Contrast": contrast_plain,
    "Brightness": brightness_plain,
    "Sharpness": sharpness_plain,
    "ShearX": shear_x,
    "ShearY": shear_y,
    "TranslateXRel": translate_x_rel,
    "TranslateYRel": translate_y_rel,
}


# ----------------------------------------------------------------------------- RandAugment


# timm's section keys: magnitude, number of ops, magnitude std, magnitude ceiling, prob, increasing set.
_POLICY_FIELD = re.compile(r"(mstd|mmax|inc|m|n|p)(\d[0-9.]*)")


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A ``rand-m<M>-n<N>-mstd<S>-mmax<X>-p<P>-inc<0|1>`` policy; the defaults are timm's for omitted fields.

    ``magnitude_std`` above 100 means a level drawn uniformly from ``[0, magnitude]`` (timm's rule).
    """

    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_SCALE
    prob: float = 0.5
    increasing: bool = False

    def __post_init__(self):
        if self.magnitude < 0 or self.magnitude_std < 0 or self.magnitude_max <= 0:
            raise ValueError(f"RandAugment needs magnitude >= 0, magnitude_std >= 0 and magnitude_max > 0, got {self}")
        if self.num_ops < 0 or not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"RandAugment needs num_ops >= 0 and prob in [0, 1], got {self}")

    @property
    def ops(self) -> dict[str, Callable]:
        """The operation set the policy draws from."""
        return INCREASING_OPS if self.increasing else PLAIN_OPS

    @classmethod
    def parse(cls, policy: str) -> RandAugmentPolicy:
        """Reads a timm RandAugment string, e.g. ``rand-m9-mstd0.5-inc1``; fields in any order.

        Omitted fields keep timm's defaults (magnitude 10, 2 ops, std 0, ceiling 10, prob 0.5, plain op
        set). timm's transform sets (``t<name>``: weighted choice, the 3-Augment ops) are not implemented
        and raise, as does any other unknown or repeated field.
        """
        parts = policy.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment policy must start with 'rand', got {policy!r}")
        values: dict[str, Any] = {}
        for part in parts[1:]:
            match = _POLICY_FIELD.fullmatch(part)
            if not match:
                hint = " (timm's transform sets 't<name>' are not supported)" if part.startswith("t") else ""
                raise ValueError(f"unknown RandAugment policy field {part!r} in {policy!r}{hint}; "
                                 "known: m<magnitude>, n<ops>, mstd<std>, mmax<ceiling>, p<prob>, inc<0|1>")
            key, value = match.groups()
            name = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max",
                    "p": "prob", "inc": "increasing"}[key]
            if name in values:
                raise ValueError(f"RandAugment policy field {key!r} given twice in {policy!r}")
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"RandAugment policy field {part!r} in {policy!r} is not a number") from None
            if key in ("n", "inc") and number != int(number):
                raise ValueError(f"RandAugment policy field {part!r} in {policy!r} must be an integer")
            values[name] = int(number) if key == "n" else bool(number) if key == "inc" else number
        return cls(**values)


def draw_level(policy: RandAugmentPolicy, rng: np.random.Generator) -> float:
    """One operation's level: ``N(magnitude, magnitude_std)`` (the magnitude if std 0, uniform on
    ``[0, magnitude]`` if std > 100), clipped to ``[0, magnitude_max]``."""
    level = policy.magnitude
    if policy.magnitude_std > 100:
        level = rng.uniform(0.0, policy.magnitude)
    elif policy.magnitude_std > 0:
        level = rng.normal(policy.magnitude, policy.magnitude_std)
    return float(np.clip(level, 0.0, policy.magnitude_max))


def rand_augment(img, rng: np.random.Generator, policy: RandAugmentPolicy):
    """Applies ``policy.num_ops`` random operations of ``policy.ops`` to an 8-bit PIL image (L or RGB)."""
    ops = policy.ops
    names = list(ops)
    for index in rng.integers(len(names), size=policy.num_ops):
        if rng.random() >= policy.prob:
            continue
        img = ops[names[int(index)]](img, draw_level(policy, rng), rng)
    return img
