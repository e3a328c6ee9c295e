"""Training and evaluation pipelines: augmentation recipes, determinism, resume, sharding, eval batches."""

from __future__ import annotations

import numpy as np
import pytest

from rwkvunet_jax.data import augment as augment_module
from rwkvunet_jax.data import RecipeTransform, eval_batches, get_source, train_iterator, write_phantom_dataset
from rwkvunet_jax.data.base import SliceSource

CLASSES = (0, 2, 5)


class PatternSource(SliceSource):
    """In-memory examples whose image encodes the label (image = label / 10) and a constant per-index tag.

    Channel 0 carries the label pattern, channel 1 the example index, so batches reveal which examples
    they hold and whether image and label moved together.
    """

    def __init__(self, n: int = 12, size: tuple[int, int] = (40, 40)):
        self.dataset, self.root, self.split = "pattern", "memory", "train"
        rng = np.random.default_rng(0)
        self.labels = []
        for _ in range(n):
            label = np.zeros(size, np.int32)
            for value in CLASSES[1:]:
                top, left = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
                label[top:top + rng.integers(5, 12), left:left + rng.integers(5, 12)] = value
            self.labels.append(label)
        self._ids = [f"ex{i}" for i in range(n)]

    @property
    def ids(self):
        return self._ids

    def load(self, index):
        label = self.labels[index]
        image = np.stack([label / 10.0, np.full(label.shape, float(index))], -1).astype(np.float32)
        return image, label


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("phantom") / "ph", num_train=24, num_val=6, num_test=4,
                                 image_size=(48, 48), num_classes=4, slices_per_volume=4)


@pytest.mark.parametrize("recipe", ["transunet", "synapse", "acdc", "binary", "none"])
def test_recipes_keep_the_class_set_and_the_batch_contract(recipe):
    src = PatternSource()
    it = train_iterator(src, RecipeTransform(recipe, (32, 48)), batch_size=4, seed=0)
    for batch in take(it, 3):
        assert batch["image"].shape == (4, 32, 48, 2) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (4, 32, 48) and batch["label"].dtype == np.int32
        assert set(np.unique(batch["label"])) <= set(CLASSES)
        assert set(batch) == {"image", "label", "bad_index"}
        np.testing.assert_array_equal(batch["bad_index"], -1)  # nothing failed


class BrokenPatternSource(PatternSource):
    """PatternSource whose examples 3 and 7 fail to read (a corrupt file) and whose example 5 has a label
    the augmentation cannot take (a 1-D label)."""

    def load(self, index):
        if index in (3, 7):
            raise OSError(f"corrupt file ex{index}")
        image, label = super().load(index)
        return (image[0], label[0]) if index == 5 else (image, label)


def test_a_bad_example_is_replaced_the_same_way_every_run_and_flagged(caplog):
    src = BrokenPatternSource()
    runs = [take(train_iterator(src, RecipeTransform("none", (32, 32)), batch_size=4, seed=2), 9) for _ in range(2)]
    assert_same_batches(*runs)
    flagged = np.concatenate([b["bad_index"] for b in runs[0]])
    assert sorted(set(flagged[flagged >= 0].tolist())) == [3, 5, 7]  # three epochs of 12
    assert (flagged >= 0).sum() == 9
    served = np.concatenate([np.rint(b["image"][:, 0, 0, 1]) for b in runs[0]]).astype(int)  # the index tag
    assert not set(served) & {3, 5, 7}  # what was served in their place is another, readable example
    assert "bad example 3 (ex3: OSError: corrupt file ex3)" in caplog.text


@pytest.mark.parametrize("recipe,options", [("transunet", {"image_order": 0}), ("acdc", {})])
def test_nearest_recipes_move_image_and_label_together(monkeypatch, recipe, options):
    # Without the intensity change, the official recipes are purely geometric with nearest interpolation,
    # so the label-encoding channel must still equal label / 10 after any flip, rotation, crop or resize.
    monkeypatch.setattr(augment_module, "brightness_contrast", lambda image, rng: image)
    src = PatternSource()
    changed = 0
    for i in range(40):
        ex = src[i % len(src)]
        image, label = augment_module.augment(recipe, ex["image"], ex["label"], np.random.default_rng(i),
                                              size=(24, 24), **options)
        np.testing.assert_allclose(image[..., 0] * 10.0, label, atol=1e-5)
        plain = augment_module.resize(ex["label"], (24, 24), 0)
        changed += not np.array_equal(label, plain)
    assert changed >= 10  # the recipe really transforms most examples


def test_binary_recipe_keeps_image_and_label_aligned(monkeypatch):
    monkeypatch.setattr(augment_module, "brightness_contrast", lambda image, rng: image)
    src = PatternSource()
    for i in range(20):
        ex = src[i % len(src)]
        image, label = augment_module.augment("binary", ex["image"], ex["label"], np.random.default_rng(i),
                                              size=(32, 32))
        # Bilinear image vs nearest label: they may differ only along edges.
        assert np.mean(np.abs(image[..., 0] * 10.0 - label) > 1.0) < 0.1


def test_augmentation_is_deterministic_per_seed():
    src = PatternSource()
    kwargs = dict(transform=RecipeTransform("acdc", (32, 32)), batch_size=3)
    a = take(train_iterator(src, seed=5, **kwargs), 4)
    b = take(train_iterator(src, seed=5, **kwargs), 4)
    c = take(train_iterator(src, seed=6, **kwargs), 4)
    assert_same_batches(a, b)
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_every_epoch_visits_each_example_once_in_a_new_order():
    src = PatternSource(n=12)
    it = train_iterator(src, RecipeTransform("none", (16, 16)), batch_size=4, seed=1)
    tags = [int(round(t)) for b in take(it, 6) for t in b["image"][:, 0, 0, 1]]
    assert sorted(tags[:12]) == list(range(12)) and sorted(tags[12:]) == list(range(12))
    assert tags[:12] != tags[12:]


def test_shards_are_disjoint_and_cover_the_data():
    src = PatternSource(n=12)
    seen = []
    for shard in range(3):
        it = train_iterator(src, RecipeTransform("none", (16, 16)), batch_size=2, seed=4, shard_index=shard,
                            shard_count=3)
        seen.append([int(round(t)) for b in take(it, 2) for t in b["image"][:, 0, 0, 1]])
    flat = [t for s in seen for t in s]
    assert len(set(flat)) == 12 and sorted(flat) == list(range(12))


def test_resume_from_state_gives_the_same_next_batches(phantom_root):
    src = get_source("phantom", phantom_root, "train")
    kwargs = dict(transform=RecipeTransform("transunet", (32, 32)), batch_size=4, seed=3)
    it = train_iterator(src, **kwargs)
    take(it, 5)
    state = it.get_state()
    expected = take(it, 4)
    fresh = train_iterator(src, **kwargs)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 4), expected)


def test_resume_with_worker_processes(phantom_root):
    src = get_source("phantom", phantom_root, "train")
    kwargs = dict(transform=RecipeTransform("acdc", (32, 32)), batch_size=4, seed=8)
    reference = take(train_iterator(src, **kwargs), 7)
    it = train_iterator(src, worker_count=2, **kwargs)
    assert_same_batches(take(it, 4), reference[:4])  # workers do not change the stream
    state = it.get_state()
    fresh = train_iterator(src, worker_count=2, **kwargs)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 3), reference[4:])


def test_eval_batches_cover_the_split_in_order(phantom_root):
    src = get_source("phantom", phantom_root, "val")
    batches = list(eval_batches(src, image_size=(32, 32), batch_size=4))
    assert [len(b["id"]) for b in batches] == [4, 2]
    assert [i for b in batches for i in b["id"]] == src.ids
    last = batches[-1]
    assert last["image"].shape == (2, 32, 32, 1) and last["label"].shape == (2, 32, 32)
    assert last["valid"].tolist() == [True, True]
    for k, ident in enumerate(last["id"]):
        np.testing.assert_array_equal(last["orig_label"][k], src[src.ids.index(ident)]["label"])
        assert set(np.unique(last["label"][k])) <= set(np.unique(last["orig_label"][k]))
    padded = list(eval_batches(src, image_size=(32, 32), batch_size=4, pad_last=True))[-1]
    assert padded["image"].shape == (4, 32, 32, 1) and padded["valid"].tolist() == [True, True, False, False]
    assert len(padded["id"]) == 2 and not padded["image"][2:].any()


def test_eval_resize_is_bilinear_for_images():
    src = PatternSource(n=2, size=(16, 16))
    batch = next(eval_batches(src, image_size=(31, 31), batch_size=2))
    # Linear interpolation with aligned corners: the tag channel is constant and the pattern channel
    # takes in-between values only where the label changes.
    np.testing.assert_allclose(batch["image"][1, ..., 1], 1.0, atol=1e-6)
    ramp = np.linspace(0, 1, 8, dtype=np.float32)[None, :].repeat(8, 0)
    from rwkvunet_jax.data.augment import resize

    up = resize(ramp, (8, 15), 1)
    np.testing.assert_allclose(up[0], np.linspace(0, 1, 15), atol=1e-6)


def test_pipeline_argument_errors():
    src = PatternSource(n=4)
    with pytest.raises(ValueError, match="unknown augmentation"):
        RecipeTransform("heavy", (16, 16))
    with pytest.raises(ValueError, match="shard_index"):
        train_iterator(src, RecipeTransform("none", (16, 16)), batch_size=2, seed=0, shard_index=2,
                       shard_count=2)
    with pytest.raises(ValueError, match="image_size"):
        RecipeTransform("none", (16,))
    with pytest.raises(ValueError, match="batch_size"):
        next(eval_batches(src, image_size=(16, 16), batch_size=0))
