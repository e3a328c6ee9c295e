"""Training augmentations on numpy arrays: image (H, W, C) float32, label (H, W) int32.

Every random choice is drawn from the ``numpy.random.Generator`` passed in (grain's ``random_map``
derives it from the pipeline seed and the example's position), so a recipe is deterministic per seed.
Labels are only ever moved with nearest-neighbour (order 0) interpolation, so they keep their class set.

Recipes (``RECIPES``), each ending at the network size. Two options reach every recipe (the configs'
``data.image_order`` and ``data.rotate_degrees``): ``image_order`` is the spline order of the image resize
(0 nearest, 1 bilinear, 3 cubic) and ``rotate_degrees`` = d bounds the random rotation. The official
recipes draw an integer angle like ``np.random.randint(-d, d)``, i.e. in [-d, d - 1], and their rot90 takes
any k in 0..3 also for non-square slices (ACDC's), whose height and width then swap before the resize.

* ``transunet`` (TransUNet's ``RandomGenerator``, the official Synapse and ACDC recipe of Jan-Feb 2025, the
  paper's): p=0.5 rot90 + flip, else p=0.5 rotation by an integer angle in [-d, d - 1] (d = 20; order 0 for
  image and label, same size, zero fill), then the resize (Synapse cubic, ACDC nearest).
* ``synapse`` (official ``RandomGenerator``, Oct 2025): p=0.1 brightness/contrast, p=0.1 random crop
  (ratio U(0.8, 1.2) capped at 1, nearest resize back), then the resize (nearest). No rotation.
* ``acdc`` (official trainer, Oct 2025): p=0.5 rot90 + flip, p=0.3 rotation in [-d, d - 1] (d = 30; order 0,
  same size), p=0.3 brightness/contrast, p=0.3 random crop, then the resize (nearest).
* ``binary`` (our choice; the official code gives no recipe for the binary datasets): the resize first
  (bilinear, also for the rotation below; the native images are up to 1920x1072), then p=0.5 horizontal flip, p=0.5 vertical flip,
  rot90 by a uniform k (k in {0, 2} for non-square sizes), p=0.3 rotation by U(-d, d) degrees (d = 15;
  bilinear image, nearest label, zero fill), p=0.3 brightness/contrast.
* ``none``: the resize only (bilinear image, nearest label). No rotation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

ImageLabel = tuple[np.ndarray, np.ndarray]


def resize(array: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resizes the two leading axes of (H, W) or (H, W, C) to ``size`` with spline ``order`` (0 = nearest)."""
    from scipy import ndimage

    height, width = int(size[0]), int(size[1])
    if array.shape[:2] == (height, width):
        return array
    factors = (height / array.shape[0], width / array.shape[1]) + (1.0,) * (array.ndim - 2)
    out = ndimage.zoom(array, factors, order=order)
    if out.shape[:2] != (height, width):  # zoom rounds the output shape; never expected, checked anyway
        raise RuntimeError(f"resize produced {out.shape[:2]}, wanted {(height, width)}")
    return out


def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int], image_order: int) -> ImageLabel:
    """Resizes image (with ``image_order``) and label (nearest) to ``size``."""
    return resize(image, size, image_order).astype(np.float32), resize(label, size, 0).astype(np.int32)


def rot90_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> ImageLabel:
    """Rotation by k * 90 degrees (k in 0..3; a non-square slice swaps its sides) then a flip along a random
    axis (TransUNet ``random_rot_flip``)."""
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))
    image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
    return np.flip(image, axis).copy(), np.flip(label, axis).copy()


def rotate(image: np.ndarray, label: np.ndarray, angle: float, *, image_order: int) -> ImageLabel:
    """Rotation about the centre by ``angle`` degrees, same size, zero fill; label nearest."""
    from scipy import ndimage

    image = ndimage.rotate(image, angle, axes=(1, 0), order=image_order, reshape=False)
    label = ndimage.rotate(label, angle, axes=(1, 0), order=0, reshape=False)
    return image.astype(np.float32), label


def brightness_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x * (1 + U(-0.2, 0.2)), then (x - mean) * U(0.8, 1.2) + mean, then clipped as the official code does.

    The clip range is chosen from the *transformed* image: [0, 1] when its maximum is at most 1, else
    [0, 255]. So a [0, 1] image brightened past 1 keeps its values above 1 (only negatives are cut), as
    in the official ``random_brightness_contrast``.
    """
    image = image * (1.0 + rng.uniform(-0.2, 0.2))
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.8, 1.2) + mean
    high = 1.0 if image.max() <= 1.0 else 255.0
    return np.clip(image, 0.0, high).astype(np.float32)


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> ImageLabel:
    """Crop of ratio U(0.8, 1.2) (capped at the full size) at a random position, nearest-resized back."""
    height, width = label.shape
    ratio = min(rng.uniform(0.8, 1.2), 1.0)
    crop_h, crop_w = max(1, int(height * ratio)), max(1, int(width * ratio))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    image = image[top:top + crop_h, left:left + crop_w]
    label = label[top:top + crop_h, left:left + crop_w]
    return resize(image, (height, width), 0), resize(label, (height, width), 0)


# ----------------------------------------------------------------------------- recipes


def official_angle(rng: np.random.Generator, degrees: int) -> int:
    """An integer angle in [-degrees, degrees - 1], as the official ``np.random.randint(-degrees, degrees)``.

    ``degrees`` 0 gives 0 (no draw): the rotation branch still runs but leaves the example as it is.
    """
    return int(rng.integers(-degrees, degrees)) if degrees else 0


def transunet_recipe(image, label, rng, *, size, image_order: int = 3, rotate_degrees: int = 20) -> ImageLabel:
    """TransUNet's ``RandomGenerator``, the paper-time Synapse / ACDC recipe (see the module docstring)."""
    if rng.random() > 0.5:
        image, label = rot90_flip(image, label, rng)
    elif rng.random() > 0.5:
        image, label = rotate(image, label, official_angle(rng, rotate_degrees), image_order=0)
    return resize_pair(image, label, size, image_order=image_order)


def synapse_recipe(image, label, rng, *, size, image_order: int = 0, rotate_degrees: int = 0) -> ImageLabel:
    """The official Synapse training augmentation of Oct 2025 (see the module docstring); no rotation."""
    del rotate_degrees
    if rng.random() < 0.1:
        image = brightness_contrast(image, rng)
    if rng.random() < 0.1:
        image, label = random_crop(image, label, rng)
    return resize_pair(image, label, size, image_order=image_order)


def acdc_recipe(image, label, rng, *, size, image_order: int = 0, rotate_degrees: int = 30) -> ImageLabel:
    """The official ACDC training augmentation of Oct 2025 (see the module docstring)."""
    if rng.random() < 0.5:
        image, label = rot90_flip(image, label, rng)
    if rng.random() < 0.3:
        image, label = rotate(image, label, official_angle(rng, rotate_degrees), image_order=0)
    if rng.random() < 0.3:
        image = brightness_contrast(image, rng)
    if rng.random() < 0.3:
        image, label = random_crop(image, label, rng)
    return resize_pair(image, label, size, image_order=image_order)


def binary_recipe(image, label, rng, *, size, image_order: int = 1, rotate_degrees: int = 15) -> ImageLabel:
    """Our augmentation for the binary datasets (see the module docstring)."""
    image, label = resize_pair(image, label, size, image_order=image_order)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < 0.5:
        image, label = image[::-1], label[::-1]
    k = int(rng.integers(0, 4)) if size[0] == size[1] else 2 * int(rng.integers(0, 2))
    image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
    if rng.random() < 0.3:
        image, label = rotate(image, label, float(rng.uniform(-rotate_degrees, rotate_degrees)),
                              image_order=image_order)
    if rng.random() < 0.3:
        image = brightness_contrast(image, rng)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.int32)


def no_recipe(image, label, rng, *, size, image_order: int = 1, rotate_degrees: int = 0) -> ImageLabel:
    """The resize only (see the module docstring)."""
    del rng, rotate_degrees
    return resize_pair(image, label, size, image_order=image_order)


RECIPES: dict[str, Callable[..., ImageLabel]] = {
    "transunet": transunet_recipe,
    "synapse": synapse_recipe,
    "acdc": acdc_recipe,
    "binary": binary_recipe,
    "none": no_recipe,
}


def augment(name: str, image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
            size: tuple[int, int], **options) -> ImageLabel:
    """Applies recipe ``name`` and returns (image (h, w, C) float32, label (h, w) int32) at ``size``."""
    if name not in RECIPES:
        raise ValueError(f"unknown augmentation {name!r}; expected one of {tuple(RECIPES)}")
    if image.ndim == 2:
        image = image[..., None]
    image, label = RECIPES[name](image, label, rng, size=tuple(size), **options)
    return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label, np.int32)


def check_size(image_size: Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` as ints; ValueError unless two positive numbers."""
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width) of positive ints, got {image_size!r}")
    return size


OPTIONS = ("image_order", "rotate_degrees")


def check_options(options: Mapping[str, Any]) -> dict[str, int]:
    """The recipe options as ints; ValueError naming an unknown option or a bad value."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {unknown}; expected some of {OPTIONS}")
    checked = {name: int(value) for name, value in options.items()}
    if not 0 <= checked.get("image_order", 0) <= 5:
        raise ValueError(f"image_order must be a spline order in 0..5 (0 nearest, 1 bilinear, 3 cubic), "
                         f"got {options['image_order']!r}")
    if checked.get("rotate_degrees", 0) < 0:
        raise ValueError(f"rotate_degrees must be >= 0, got {options['rotate_degrees']!r}")
    return checked


class RecipeTransform:
    """Recipe ``recipe`` as a picklable grain random map: (example dict, rng) -> {"image", "label"} at ``size``.

    ``options`` (``image_order``, ``rotate_degrees``; see the module docstring) go to the recipe; the ones
    not given keep the recipe's default.
    """

    def __init__(self, recipe: str, size: Sequence[int], **options: Any):
        if recipe not in RECIPES:
            raise ValueError(f"unknown augmentation {recipe!r}; expected one of {tuple(RECIPES)}")
        self.recipe, self.size, self.options = recipe, check_size(size), check_options(options)

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, label = augment(self.recipe, example["image"], example["label"], rng, size=self.size, **self.options)
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return f"RecipeTransform({self.recipe!r}, size={self.size}, options={self.options})"
