"""ImageNet input pipeline: crops against their formulas, transforms, sources, host sharding, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from rwkvunet_jax.data import imagenet as inet
from rwkvunet_jax.data import image_ops
from rwkvunet_jax.data.pipeline import train_iterator


def _image(h=24, w=20, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- crops and transforms


def test_random_resized_crop_box_respects_area_and_aspect_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = image_ops.random_resized_crop_box(200, 150, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 150
        assert 0.08 * 0.9 <= w * h / (200 * 150) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # A 400x10 strip cannot hold any box of the requested area: the fallback is the central crop
    # clamped to the largest allowed aspect ratio.
    assert image_ops.random_resized_crop_box(400, 10, rng, (0.9, 1.0), (3 / 4, 4 / 3)) == (193, 0, 13, 10)


def test_eval_view_is_resize_shorter_to_size_over_crop_pct_then_centre_crop():
    img = _image(h=120, w=300, seed=2)
    out = image_ops.resize_shorter_and_center_crop(img, 64, crop_pct=0.875)
    short = math.floor(64 / 0.875)  # 73
    resized = np.asarray(img.resize((int(short * 300 / 120), short), Image.Resampling.BICUBIC))
    top, left = round((short - 64) / 2), round((resized.shape[1] - 64) / 2)
    np.testing.assert_array_equal(np.asarray(out), resized[top:top + 64, left:left + 64])


def test_train_transform_shape_dtype_and_colour_jitter_rule():
    t = inet.TrainTransform(32)
    out = t({"image": np.asarray(_image(50, 40)), "label": 3}, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8 and out["label"] == 3
    assert t.color_jitter == 0.0  # timm: jitter is off when RandAugment is on
    assert inet.TrainTransform(32, randaugment=None).color_jitter == 0.4
    assert inet.TrainTransform(32, color_jitter_with_randaugment=True).color_jitter == 0.4


# ----------------------------------------------------------------------------- sources and pipelines


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return inet.write_fake_imagefolder(tmp_path_factory.mktemp("inet"), num_classes=3, train_per_class=8,
                                       val_per_class=3, min_size=20, max_size=40)


def test_image_folder_source_labels_by_sorted_class_folder(folder):
    train = inet.make_source("imagefolder", split="train", root=folder)
    val = inet.make_source("imagefolder", split="val", root=folder, class_names=train.class_names)
    assert len(train) == 24 and len(val) == 9 and train.num_classes == 3
    labels = [int(train[i]["label"]) for i in range(len(train))]
    assert labels == sorted(labels) and set(labels) == {0, 1, 2}
    example = train[0]
    assert example["image"].dtype == np.uint8 and example["image"].ndim == 3 and example["image"].shape[2] == 3
    with pytest.raises(ValueError, match="class"):
        inet.ImageFolderSource(folder / "train", class_names=("n00000000",))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inet.ImageFolderSource(folder / "nowhere")


def test_global_batch_is_the_same_for_one_or_two_hosts_and_resumes_exactly(folder):
    source = inet.ImageFolderSource(folder / "train")
    common = dict(seed=3, transform=inet.TrainTransform(16, randaugment="rand-m9-mstd0.5-inc1"))
    single = train_iterator(source, batch_size=6, **common)
    hosts = [train_iterator(source, batch_size=3, shard_index=p, shard_count=2, **common) for p in (0, 1)]
    for _ in range(5):  # crosses an epoch boundary (24 examples, 6 per step)
        whole = next(single)
        parts = [next(h) for h in hosts]
        # Element j of the global stream goes to host j % 2.
        np.testing.assert_array_equal(whole["image"][0::2], parts[0]["image"])
        np.testing.assert_array_equal(whole["image"][1::2], parts[1]["image"])
        np.testing.assert_array_equal(whole["label"][1::2], parts[1]["label"])
    state = hosts[1].get_state()
    expected = next(hosts[1])
    fresh = train_iterator(source, batch_size=3, shard_index=1, shard_count=2, **common)
    fresh.set_state(state)
    got = next(fresh)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])


def test_eval_batches_cover_every_example_once_with_equal_batch_counts(folder):
    source = inet.ImageFolderSource(folder / "val")
    per_host = [list(inet.eval_batches(source, image_size=16, local_batch=2, process_index=p, process_count=2))
                for p in (0, 1)]
    assert len(per_host[0]) == len(per_host[1]) == inet.num_eval_batches(9, 2, 2) == 3
    seen = sum(int(b["valid"].sum()) for host in per_host for b in host)
    assert seen == 9
    labels = sorted(int(l) for host in per_host for b in host for l, v in zip(b["label"], b["valid"]) if v)
    assert labels == sorted(int(source[i]["label"]) for i in range(9))


def test_tfds_array_record_source_reads_without_tensorflow(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import io

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    pixels = {}

    class TinyImagenet(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=4),
                "file_name": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(8), "validation": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                array = np.full((18 + i, 22, 3), 10 * i + n, np.uint8)
                pixels[(n, f"f{i}.JPEG")] = array
                yield f"{n}-{i}", {"image": png(array), "label": i % 4, "file_name": f"f{i}.JPEG"}

    TinyImagenet(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = inet.make_source("tfds", split="train", name="tiny_imagenet", data_dir=tmp_path)
    assert len(source) == 8 and source.num_classes == 4
    # tfds shuffles records by key: match them back through file_name, read with tfds itself.
    raw = tfds.data_source("tiny_imagenet", split="train", data_dir=str(tmp_path))
    for i in range(len(source)):
        example = source[i]
        np.testing.assert_array_equal(example["image"], pixels[(8, raw[i]["file_name"].decode())])
    val = inet.make_source("tfds", split="val", name="tiny_imagenet", data_dir=tmp_path)
    batch = next(train_iterator(source, inet.TrainTransform(16), batch_size=4, seed=0))
    assert batch["image"].shape == (4, 16, 16, 3) and len(val) == 3
    with pytest.raises(FileNotFoundError, match="tiny_imagenet"):
        inet.make_source("tfds", split="test", name="tiny_imagenet", data_dir=tmp_path)
