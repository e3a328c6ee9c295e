"""Augmentation recipes against independent numpy/scipy re-derivations of the official code's steps."""

import numpy as np
import pytest
from scipy import ndimage

from rwkvunet_jax.data import augment as augment_module
from rwkvunet_jax.data.augment import RecipeTransform, augment, brightness_contrast, resize_pair


def slice_example(seed, shape=(40, 52), classes=(0, 1, 2, 5)):
    """A CT-like slice: smooth image in [0, 1] and a blocky label map holding ``classes``."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random(shape), 2.0)
    image = (image - image.min()) / (image.max() - image.min())
    label = np.zeros(shape, np.int32)
    for i, value in enumerate(classes[1:]):
        top, left = 4 + 10 * i, 6 + 12 * i
        label[top:top + 9, left:left + 11] = value
    return image.astype(np.float32), label


def transunet_reference(image, label, rng, size, image_order, degrees=20):
    """TransUNet's RandomGenerator written from its source, drawing from ``rng`` in the same order."""
    if rng.random() > 0.5:
        k = rng.integers(0, 4)
        image, label = np.rot90(image, k), np.rot90(label, k)
        axis = rng.integers(0, 2)
        image, label = np.flip(image, axis=axis).copy(), np.flip(label, axis=axis).copy()
    elif rng.random() > 0.5:
        angle = rng.integers(-degrees, degrees)  # np.random.randint(-20, 20): 20 is never drawn
        image = ndimage.rotate(image, angle, order=0, reshape=False)
        label = ndimage.rotate(label, angle, order=0, reshape=False)
    x, y = image.shape
    if (x, y) != tuple(size):
        image = ndimage.zoom(image, (size[0] / x, size[1] / y), order=image_order)
        label = ndimage.zoom(label, (size[0] / x, size[1] / y), order=0)
    return image, label


@pytest.mark.parametrize("image_order", [3, 0])
def test_transunet_recipe_matches_the_reference_draw_for_draw(image_order):
    for seed in range(24):
        image, label = slice_example(seed)
        got_image, got_label = augment("transunet", image, label, np.random.default_rng(seed), size=(56, 48),
                                       image_order=image_order, rotate_degrees=20)
        ref_image, ref_label = transunet_reference(image, label, np.random.default_rng(seed), (56, 48), image_order)
        assert got_image.shape == (56, 48, 1) and got_label.shape == (56, 48)
        np.testing.assert_allclose(got_image[..., 0], ref_image, atol=1e-5)
        np.testing.assert_array_equal(got_label, ref_label)


def test_transunet_branch_frequencies_angles_and_label_set(monkeypatch):
    calls = {"rot_flip": 0, "rotate": []}
    real_rot_flip, real_rotate = augment_module.rot90_flip, augment_module.rotate

    def spy_rot_flip(*args, **kwargs):
        calls["rot_flip"] += 1
        return real_rot_flip(*args, **kwargs)

    def spy_rotate(image, label, angle, *, image_order):
        calls["rotate"].append((angle, image_order))
        return real_rotate(image, label, angle, image_order=image_order)

    monkeypatch.setattr(augment_module, "rot90_flip", spy_rot_flip)
    monkeypatch.setattr(augment_module, "rotate", spy_rotate)
    image, label = slice_example(0, shape=(16, 16))
    n = 4000
    for seed in range(n):
        _, out = augment("transunet", image, label, np.random.default_rng(seed), size=(16, 16))
        assert set(np.unique(out)) <= {0, 1, 2, 5}
    # p 0.5 rot90 + flip, else p 0.5 rotation: 1/2 and 1/4 of the draws (5 binomial sigmas).
    for count, p in ((calls["rot_flip"], 0.5), (len(calls["rotate"]), 0.25)):
        assert abs(count - n * p) < 5 * np.sqrt(n * p * (1 - p)), (count, p)
    angles = [angle for angle, _ in calls["rotate"]]
    assert all(isinstance(a, int) for a in angles) and set(angles) == set(range(-20, 20))
    assert {order for _, order in calls["rotate"]} == {0}  # the image rotates with order 0, as the label


def test_acdc_recipe_rotates_by_the_official_randint_range(monkeypatch):
    angles = []
    monkeypatch.setattr(augment_module, "rotate",
                        lambda image, label, angle, *, image_order: (angles.append(angle) or (image, label)))
    image, label = slice_example(1, shape=(16, 16))
    for seed in range(1500):
        augment("acdc", image, label, np.random.default_rng(seed), size=(16, 16), rotate_degrees=30)
    assert set(angles) == set(range(-30, 30))  # np.random.randint(-30, 30)


def test_cubic_resize_is_scipy_zoom_order_3():
    image, label = slice_example(3, shape=(100, 120))
    out_image, out_label = resize_pair(image[..., None], label, (224, 224), image_order=3)
    np.testing.assert_allclose(out_image[..., 0], ndimage.zoom(image.astype(np.float64), (2.24, 224 / 120), order=3),
                               atol=1e-5)
    np.testing.assert_array_equal(out_label, ndimage.zoom(label, (2.24, 224 / 120), order=0))


def brightness_contrast_reference(image, rng):
    """The official random_brightness_contrast: the clip range is read off the transformed image."""
    image = image.astype(np.float64) * (1 + rng.uniform(-0.2, 0.2))
    image = (image - image.mean()) * rng.uniform(0.8, 1.2) + image.mean()
    return np.clip(image, 0, 1) if image.max() <= 1 else np.clip(image, 0, 255)


def test_brightness_contrast_clips_after_the_transform_as_the_official_code():
    image, _ = slice_example(5)
    above_one = clipped_at_one = 0
    for seed in range(60):
        out = brightness_contrast(image[..., None], np.random.default_rng(seed))[..., 0]
        ref = brightness_contrast_reference(image, np.random.default_rng(seed))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        above_one += out.max() > 1.0
        clipped_at_one += out.max() <= 1.0
        assert out.min() >= 0.0
    assert above_one > 5 and clipped_at_one > 5  # both clip ranges occur: brightened values above 1 survive


def test_options_reach_the_recipe_and_bad_ones_are_named():
    image, label = slice_example(7)
    transform = RecipeTransform("none", (56, 48), image_order=3)
    out = transform({"image": image, "label": label}, np.random.default_rng(0))
    np.testing.assert_allclose(out["image"][..., 0], ndimage.zoom(image, (56 / 40, 48 / 52), order=3), atol=1e-5)
    with pytest.raises(ValueError, match="unknown augmentation option"):
        RecipeTransform("transunet", (16, 16), rot_flip=True)
    with pytest.raises(ValueError, match="image_order"):
        RecipeTransform("transunet", (16, 16), image_order=7)
    with pytest.raises(ValueError, match="rotate_degrees"):
        RecipeTransform("acdc", (16, 16), rotate_degrees=-1)
