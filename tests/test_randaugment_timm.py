"""RandAugment against timm, the implementation the official pretraining ran (``rand-m9-mstd0.5-inc1``).

Every operation of ours is compared with timm's operation of the same name at magnitudes 0, 5, 9, 10
and 15 (the last under ``mmax20``), with both signs and both random resampling filters, on RGB and grey
uint8 images; policy strings and level draws are compared with timm's parser and ``AugmentOp``.

timm needs torchvision at package import, which cannot sit beside the pinned torch, so CI installs it
with ``pip install --no-deps`` and this file loads ``timm/data/auto_augment.py`` (stdlib, Pillow and
numpy only) by path. Without timm the file is skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rwkvunet_jax.data import randaugment as ra


def _load_timm_file(relative: str):
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (CI: pip install --no-deps timm==1.0.31)", allow_module_level=True)
    path = Path(spec.submodule_search_locations[0]) / relative
    module_spec = importlib.util.spec_from_file_location(f"_timm_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


taa = _load_timm_file("data/auto_augment.py")
timm_constants = _load_timm_file("data/constants.py")

MAGNITUDES = (0, 5, 9, 10, 15)
# What timm's create_transform hands RandAugment for ImageNet: the mean pixel as fill.
RECIPE_HPARAMS = dict(translate_const=100,
                      img_mean=tuple(min(255, round(255 * x)) for x in timm_constants.IMAGENET_DEFAULT_MEAN))
# For single ops the ceiling is raised so that magnitude 15 reaches them unclipped, as mmax20 does.
OP_HPARAMS = {**RECIPE_HPARAMS, "magnitude_max": 20}


class _TimmRandom:
    """Stands in for the ``random`` module inside timm's file: fixed sign and filter, scripted draws."""

    def __init__(self, negative: bool = False, filter_index: int = 0, z: float = 0.0, t: float = 0.0):
        self.negative, self.filter_index, self.z, self.t = negative, filter_index, z, t

    def random(self) -> float:
        return 1.0 if self.negative else 0.0  # timm negates when random() > 0.5

    def choice(self, seq):
        return seq[self.filter_index]

    def gauss(self, mu: float, sigma: float) -> float:
        return mu + self.z * sigma

    def uniform(self, a: float, b: float) -> float:
        return a + self.t * (b - a)


class _OurRng:
    """The same fixed choices through the ``numpy.random.Generator`` methods our ops call."""

    def __init__(self, negative: bool = False, filter_index: int = 0, z: float = 0.0, t: float = 0.0):
        self.negative, self.filter_index, self.z, self.t = negative, filter_index, z, t

    def random(self) -> float:
        return 0.0 if self.negative else 0.99  # ours negates when random() < 0.5

    def integers(self, n: int) -> int:
        assert n == 2  # only the bilinear/bicubic choice
        return self.filter_index

    def normal(self, loc: float, scale: float) -> float:
        return loc + self.z * scale

    def uniform(self, low: float, high: float) -> float:
        return low + self.t * (high - low)


def _images():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (13, 19, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (13, 19), dtype=np.uint8)
    rgb.flat[:2] = grey.flat[:2] = (0, 255)  # both ends of the range present
    return [Image.fromarray(rgb), Image.fromarray(grey)]


OUR_OPS = {**ra.INCREASING_OPS, **ra.PLAIN_OPS}


@pytest.mark.parametrize("name", sorted(OUR_OPS))
def test_each_op_matches_timms_op_of_the_same_name(name, monkeypatch):
    ours = OUR_OPS[name]
    for img in _images():
        # timm only sees RGB; on grey images ours fills with the mean's first channel, so timm gets that.
        fill = OP_HPARAMS["img_mean"] if img.mode == "RGB" else OP_HPARAMS["img_mean"][0]
        theirs = taa.AugmentOp(name, prob=1.0, magnitude=0, hparams={**OP_HPARAMS, "img_mean": fill})
        for magnitude in MAGNITUDES:
            theirs.magnitude = magnitude
            for negative in (False, True):
                for filter_index in (0, 1):
                    where = f"{name} m{magnitude} {'-' if negative else '+'} filter {filter_index} {img.mode}"
                    monkeypatch.setattr(taa, "random", _TimmRandom(negative, filter_index))
                    got = ours(img, float(magnitude), _OurRng(negative, filter_index))
                    try:
                        expected = np.asarray(theirs(img))
                    except ValueError:
                        # Pillow >= 13 refuses posterize with <= 0 bits; Pillow < 13, which timm was run
                        # with, masked every bit away: a black image.
                        assert name.startswith("Posterize"), where
                        assert theirs.level_fn(magnitude, OP_HPARAMS)[0] <= 0, where
                        expected = np.zeros_like(np.asarray(img))
                    assert got.mode == img.mode and got.size == img.size, where
                    np.testing.assert_array_equal(np.asarray(got), expected, err_msg=where)


POLICIES = ("rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand", "rand-n3-inc1", "rand-m7-p0.8-mstd2-mmax15",
            "rand-m12", "rand-m5-mstd101-inc0", "rand-mmax20-m15-n1-p1")


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_strings_parse_as_timm_parses_them(policy):
    ours = ra.RandAugmentPolicy.parse(policy)
    theirs = taa.rand_augment_transform(policy, dict(RECIPE_HPARAMS))
    assert ours.num_ops == theirs.num_layers and theirs.choice_weights is None
    assert list(ours.ops) == [op.name for op in theirs.ops]
    for op in theirs.ops:
        assert (ours.prob, ours.magnitude) == (op.prob, op.magnitude)
        assert ours.magnitude_max == (op.magnitude_max or taa._LEVEL_DENOM)
        # timm stores "uniform" (mstd > 100) as an infinite std; ours keeps the number and applies the rule.
        assert ours.magnitude_std == op.magnitude_std or (ours.magnitude_std > 100 and op.magnitude_std == np.inf)


@pytest.mark.parametrize("policy", POLICIES)
def test_level_draws_match_timms_clipping_and_std_rules(policy, monkeypatch):
    ours = ra.RandAugmentPolicy.parse(policy)
    theirs = taa.rand_augment_transform(policy, dict(RECIPE_HPARAMS)).ops[0]
    seen = []
    theirs.level_fn = lambda level, hparams: seen.append(level) or ()
    theirs.aug_fn = lambda img, **kwargs: img
    theirs.prob = 1.0
    for z in (-4.0, -0.5, 0.0, 0.7, 2.5, 9.0):
        for t in (0.0, 0.3, 1.0):
            monkeypatch.setattr(taa, "random", _TimmRandom(z=z, t=t))
            theirs(None)
            assert ra.draw_level(ours, _OurRng(z=z, t=t)) == pytest.approx(seen[-1], abs=1e-12), (policy, z, t)
