"""RandAugment: every operation at the extreme levels on odd-sized RGB and grey uint8 images, the
geometric and enhance ops against their formulas, and whole policies.

Pixel ops are checked against numpy re-derivations of timm's level formulas; the others must return an
8-bit image of the same size and mode without raising (Pillow 13 refused posterize with 0 bits, which
the increasing set reaches at magnitude 10 and the plain set at magnitude 0).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rwkvunet_jax.data import randaugment as ra

SIZES = ((17, 23), (1, 5), (31, 9))
OP_SETS = {"increasing": ra.INCREASING_OPS, "plain": ra.PLAIN_OPS}


def _rgb(h=24, w=20, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _images():
    rng = np.random.default_rng(0)
    for h, w in SIZES:
        yield Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
        grey.flat[:2] = (0, 255)  # both ends of the range present
        yield Image.fromarray(grey)


def _levels():
    rng = np.random.default_rng(1)
    draws = [ra.draw_level(ra.RandAugmentPolicy(magnitude=m, magnitude_std=s), rng)
             for m, s in ((9, 0.5), (10, 2.0), (0, 2.0), (9, 0.5))]
    assert all(0.0 <= d <= 10.0 for d in draws)
    return [0.0, 10.0, *draws]


def _expected(name: str, x: np.ndarray, level: float) -> np.ndarray | None:
    """timm's level -> argument rule and the op, in numpy; None for ops not re-derived here."""
    x = x.astype(np.int64)
    if name == "Invert":
        return 255 - x
    if name in ("PosterizeIncreasing", "Posterize"):
        bits = int(level / 10 * 4)
        bits = 4 - bits if name == "PosterizeIncreasing" else bits
        keep = (0xFF << (8 - bits)) & 0xFF  # 0 bits keeps nothing: black
        return x & keep
    if name in ("SolarizeIncreasing", "Solarize"):
        threshold = min(256, int(level / 10 * 256))
        threshold = 256 - threshold if name == "SolarizeIncreasing" else threshold
        return np.where(x >= threshold, 255 - x, x)
    if name == "SolarizeAdd":
        add = int(level / 10 * 110)
        return np.where(x < 128, np.minimum(x + add, 255), x)
    return None


@pytest.mark.parametrize("op_set", sorted(OP_SETS))
def test_every_op_at_every_level_keeps_size_and_dtype_and_pixel_ops_match_numpy(op_set):
    ops = OP_SETS[op_set]
    assert len(ops) == 15
    checked = set()
    for img in _images():
        x = np.asarray(img)
        for level in _levels():
            for name, op in ops.items():
                out = op(img, level, np.random.default_rng(2))
                y = np.asarray(out)
                assert out.mode == img.mode and out.size == img.size, (name, level, img.mode, img.size)
                assert y.dtype == np.uint8 and y.shape == x.shape, (name, level)
                expected = _expected(name, x, level)
                if expected is not None:
                    np.testing.assert_array_equal(y, expected, err_msg=f"{name} at level {level} ({img.mode})")
                    checked.add(name)
    assert len(checked) == 4  # invert, posterize, solarize, solarize-add of this set


def test_posterize_with_zero_bits_is_black_and_eight_bits_is_identity():
    img = next(_images())
    assert not np.asarray(ra.posterize_increasing(img, 10.0, None)).any()
    assert not np.asarray(ra.posterize_plain(img, 0.0, None)).any()
    np.testing.assert_array_equal(np.asarray(ra.posterize(img, 8)), np.asarray(img))


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m10-n4-mstd3-p1.0-inc1", "rand-m0-n4-mstd3-p1",
                                    "rand-m9-mstd0.5"])
def test_rand_augment_never_raises_on_rgb_or_grey(policy):
    parsed = ra.RandAugmentPolicy.parse(policy)
    assert parsed.increasing == policy.endswith("inc1")  # timm: no "inc" -> the plain set
    for seed, img in enumerate(list(_images()) * 20):
        out = ra.rand_augment(img, np.random.default_rng(seed), parsed)
        assert out.size == img.size and out.mode == img.mode and np.asarray(out).dtype == np.uint8


def test_brightness_scales_by_one_plus_or_minus_the_level():
    img = _rgb()
    x = np.asarray(img).astype(np.float64)
    out = np.asarray(ra.brightness_increasing(img, 5, np.random.default_rng(3))).astype(np.float64)
    candidates = [np.clip(x * f, 0, 255) for f in (1.45, 0.55)]
    assert min(np.abs(out - c).max() for c in candidates) <= 1.0


def test_translate_moves_pixels_by_the_level_fraction_and_fills_with_the_mean_pixel():
    img = _rgb(h=10, w=20)
    x = np.asarray(img)
    out = np.asarray(ra.translate_x_rel(img, 10, np.random.default_rng(1)))
    shift = 9  # 0.45 * 20 pixels
    left = np.full_like(x, ra.FILL)
    left[:, : 20 - shift] = x[:, shift:]  # content moved left
    right = np.full_like(x, ra.FILL)
    right[:, shift:] = x[:, : 20 - shift]  # content moved right
    assert any(np.abs(out.astype(int) - ref.astype(int)).max() <= 1 for ref in (left, right))


def test_rand_augment_is_deterministic_per_seed_and_varies_across_seeds():
    img = _rgb(32, 32)
    policy = ra.RandAugmentPolicy.parse("rand-m9-mstd0.5-inc1")
    assert policy == ra.RandAugmentPolicy(magnitude=9.0, num_ops=2, magnitude_std=0.5, prob=0.5, increasing=True)
    outs = [np.asarray(ra.rand_augment(img, np.random.default_rng(s), policy)) for s in (7, 7)]
    np.testing.assert_array_equal(outs[0], outs[1])
    distinct = {np.asarray(ra.rand_augment(img, np.random.default_rng(s), policy)).tobytes() for s in range(12)}
    assert len(distinct) > 4
    with pytest.raises(ValueError, match="policy"):
        ra.RandAugmentPolicy.parse("rand-x9")


def test_policy_strings_take_timms_defaults_for_omitted_fields_and_refuse_unknown_ones():
    timm_defaults = dict(magnitude=10.0, num_ops=2, magnitude_std=0.0, magnitude_max=10.0, prob=0.5, increasing=False)
    assert ra.RandAugmentPolicy.parse("rand") == ra.RandAugmentPolicy(**timm_defaults)
    assert ra.RandAugmentPolicy.parse("rand-n3") == ra.RandAugmentPolicy(**{**timm_defaults, "num_ops": 3})
    assert ra.RandAugmentPolicy.parse("rand-inc1-mmax15-p0.8-mstd1-m12") == ra.RandAugmentPolicy(
        magnitude=12.0, num_ops=2, magnitude_std=1.0, magnitude_max=15.0, prob=0.8, increasing=True)
    for bad, match in (("rand-w0", "'w0'"), ("rand-tweights", "transform sets"), ("rand-m9-m8", "twice"),
                       ("rand-n2.5", "integer"), ("rand-m1.2.3", "not a number"), ("rand-mmax0", "magnitude_max"),
                       ("rand-p2", "prob"), ("augmix-m9", "start with 'rand'"), ("rand-", "''")):
        with pytest.raises(ValueError, match=match):
            ra.RandAugmentPolicy.parse(bad)


def test_level_draws_follow_the_std_rule_and_clip_to_the_ceiling():
    def levels(policy: str) -> np.ndarray:
        rng = np.random.default_rng(0)
        parsed = ra.RandAugmentPolicy.parse(policy)
        return np.array([ra.draw_level(parsed, rng) for _ in range(4000)])

    assert set(levels("rand-m7")) == {7.0}
    clipped = levels("rand-m9-mstd3")  # P(N(9, 3) > 10) = 1 - Phi(1/3) = 0.3694 of the draws sit at 10
    assert clipped.max() == 10.0 and clipped.min() >= 0.0 and abs(np.mean(clipped == 10.0) - 0.3694) < 0.03
    assert levels("rand-m9-mstd3-mmax20").max() > 12.0  # mmax lifts the ceiling
    uniform = levels("rand-m8-mstd101")  # std above 100: uniform on [0, magnitude]
    assert uniform.min() >= 0.0 and uniform.max() <= 8.0 and abs(uniform.mean() - 4.0) < 0.15
