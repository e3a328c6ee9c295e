"""Dataset readers on tiny fixture datasets written in each on-disk format."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from rwkvunet_jax import data
from rwkvunet_jax.data import get_source, get_volumes

SIZE = 32


# ----------------------------------------------------------------------------- fixture writers


def disc_mask(rng, size=SIZE) -> np.ndarray:
    """A random filled disc as a bool mask."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(3, 7)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def rgb(rng, size=SIZE) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_pair(image_path: Path, mask_path: Path, rng, *, mask_value=255, mask_mode="L") -> np.ndarray:
    """Writes an RGB image and its mask; returns the binary mask written."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb(rng)).save(image_path)
    mask = disc_mask(rng)
    if mask_mode == "RGB":
        Image.fromarray(np.stack([mask * mask_value, mask * 0, mask * 0], -1).astype(np.uint8)).save(mask_path)
    else:
        Image.fromarray((mask * mask_value).astype(np.uint8)).save(mask_path)
    return mask


def write_synapse(root: Path, rng, *, n_train=6, depths=(3, 2)) -> dict:
    (root / "train_npz").mkdir(parents=True)
    lists = root / "lists" / "lists_Synapse"
    lists.mkdir(parents=True)
    names, labels = [], {}
    for i in range(n_train):
        name = f"case{i // 3 + 5:04d}_slice{i % 3:03d}"
        label = rng.integers(0, 9, (SIZE, SIZE)).astype(np.float32)  # the release stores float labels
        np.savez(root / "train_npz" / f"{name}.npz", image=rng.random((SIZE, SIZE), dtype=np.float32), label=label)
        names.append(name)
        labels[name] = label
    (lists / "train.txt").write_text("\n".join(reversed(names)) + "\n")
    (root / "test_vol_h5").mkdir()
    vol_names = []
    for v, depth in enumerate(depths):
        name = f"case{v + 1:04d}"
        with h5py.File(root / "test_vol_h5" / f"{name}.npy.h5", "w") as f:
            f["image"] = rng.random((depth, SIZE, SIZE), dtype=np.float32)
            f["label"] = rng.integers(0, 9, (depth, SIZE, SIZE)).astype(np.float32)
        vol_names.append(name)
    (lists / "test_vol.txt").write_text("\n".join(vol_names) + "\n")
    return {"train": list(reversed(names)), "labels": labels}


def write_acdc(root: Path, rng, patients=(2, 15, 22, 31, 64)) -> None:
    slices, volumes = root / "ACDC_training_slices", root / "ACDC_training_volumes"
    slices.mkdir(parents=True)
    volumes.mkdir(parents=True)
    for p in patients:
        for frame in (1, 12):
            name = f"patient{p:03d}_frame{frame:02d}"
            image = rng.random((2, SIZE, SIZE)).astype(np.float32)
            label = rng.integers(0, 4, (2, SIZE, SIZE)).astype(np.uint8)
            with h5py.File(volumes / f"{name}.h5", "w") as f:
                f["image"], f["label"] = image, label
            for z in range(2):
                with h5py.File(slices / f"{name}_slice_{z}.h5", "w") as f:
                    f["image"], f["label"] = image[z], label[z]


# ----------------------------------------------------------------------------- Synapse / ACDC


def test_synapse_train_slices_follow_the_list_file(tmp_path):
    written = write_synapse(tmp_path, np.random.default_rng(0))
    src = get_source("synapse", tmp_path, "train")
    assert len(src) == 6 and src.ids == written["train"]
    for i in range(len(src)):
        ex = src[i]
        assert ex["image"].shape == (SIZE, SIZE, 1) and ex["image"].dtype == np.float32
        assert ex["label"].shape == (SIZE, SIZE) and ex["label"].dtype == np.int32
        with np.load(tmp_path / "train_npz" / f"{ex['id']}.npz") as f:
            np.testing.assert_array_equal(ex["image"][..., 0], f["image"])
            np.testing.assert_array_equal(ex["label"], f["label"].astype(np.int64))
    assert "split='train'" in repr(src) and repr(src) == repr(get_source("synapse", tmp_path, "train"))


def test_synapse_test_volumes_and_their_slices(tmp_path):
    write_synapse(tmp_path, np.random.default_rng(1), depths=(3, 2))
    vols = get_volumes("synapse", tmp_path, "test")
    assert len(vols) == 2 and [v["id"] for v in vols] == ["case0001", "case0002"]
    assert vols[0]["image"].shape == (3, SIZE, SIZE) and vols[0]["label"].dtype == np.int32
    src = get_source("synapse", tmp_path, "test")
    assert len(src) == 5 and src.ids[3] == "case0002_slice000"
    np.testing.assert_array_equal(src[3]["label"], vols[1]["label"][0])
    with pytest.raises(ValueError, match="splits"):
        get_source("synapse", tmp_path, "val")


def test_synapse_without_list_file_uses_the_folder_and_says_so(tmp_path):
    from rwkvunet_jax.data.synapse import MissingListWarning

    write_synapse(tmp_path, np.random.default_rng(2))
    (tmp_path / "lists" / "lists_Synapse" / "train.txt").unlink()
    with pytest.warns(MissingListWarning, match=r"no train.txt found beside the data; using all 6 .npz files .*data.list_dir"):
        assert len(get_source("synapse", tmp_path, "train")) == 6


def test_synapse_lists_kept_beside_the_transunet_code(tmp_path, recwarn):
    # TransUNet's layout: the data folder holds only train_npz/ and test_vol_h5/; the lists live in the
    # code's checkout, lists/lists_Synapse/{train,test_vol}.txt, and name a subset in their own order.
    data_root = tmp_path / "data" / "Synapse"
    written = write_synapse(data_root, np.random.default_rng(6), depths=(3, 2, 4))
    shutil.move(str(data_root / "lists"), str(tmp_path / "data" / "unused"))
    lists = tmp_path / "TransUNet" / "lists" / "lists_Synapse"
    lists.mkdir(parents=True)
    train_names = written["train"][1:5][::-1]
    (lists / "train.txt").write_text("\n".join(train_names) + "\n")
    (lists / "test_vol.txt").write_text("case0003\ncase0001\n")
    (lists / "all.lst").write_text("case0001.npy.h5\n")  # present in the real folder, unused

    train = get_source("synapse", data_root, "train", list_dir=lists)
    assert train.ids == train_names
    vols = get_volumes("synapse", data_root, "test", list_dir=str(lists))
    assert [v["id"] for v in vols] == ["case0003", "case0001"]
    assert len(get_source("synapse", data_root, "test", list_dir=lists)) == 4 + 3
    assert not [w for w in recwarn if "list" in str(w.message)]
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nolists" / "train.txt")):
        get_source("synapse", data_root, "train", list_dir=tmp_path / "nolists")
    with pytest.warns(UserWarning, match="no test_vol.txt"):  # "" = beside the data, as without the option
        assert len(get_volumes("synapse", data_root, "test", list_dir="")) == 3
    with pytest.raises(ValueError, match="does not take option"):
        get_source("busi", tmp_path, "train", list_dir=lists)


def test_acdc_lists_in_the_ssl4mis_style(tmp_path):
    write_acdc(tmp_path / "ACDC", np.random.default_rng(7))
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_slices.list").write_text("patient064_frame12_slice_1\npatient002_frame01_slice_0\n")
    (lists / "val.list").write_text("patient031_frame01\n")
    (lists / "test.txt").write_text("patient022_frame12\npatient015_frame01\n")
    assert get_source("acdc", tmp_path, "train", list_dir=lists).ids == ["patient064_frame12_slice_1",
                                                                         "patient002_frame01_slice_0"]
    assert [v["id"] for v in get_volumes("acdc", tmp_path, "val", list_dir=lists)] == ["patient031_frame01"]
    assert [v["id"] for v in get_volumes("acdc", tmp_path, "test", list_dir=lists)] == ["patient022_frame12",
                                                                                        "patient015_frame01"]
    (lists / "val.list").write_text("patient099_frame01\n")
    with pytest.raises(FileNotFoundError, match="patient099_frame01.h5"):
        get_volumes("acdc", tmp_path, "val", list_dir=lists)


def test_synapse_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        get_source("synapse", tmp_path / "nowhere", "train")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train_npz"):
        get_source("synapse", tmp_path / "empty", "train")
    write_synapse(tmp_path / "s", np.random.default_rng(3))
    (tmp_path / "s" / "train_npz" / "case0005_slice001.npz").unlink()
    with pytest.raises(FileNotFoundError, match="case0005_slice001.npz"):
        get_source("synapse", tmp_path / "s", "train")
    (tmp_path / "s" / "lists" / "lists_Synapse" / "train.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty dataset.*train.txt"):
        get_source("synapse", tmp_path / "s", "train")
    with pytest.raises(ValueError, match="does not take option"):
        get_source("synapse", tmp_path / "s", "train", colour="blue")


def test_acdc_splits_by_patient_id(tmp_path):
    write_acdc(tmp_path / "ACDC", np.random.default_rng(4))
    train = get_source("acdc", tmp_path, "train")  # the parent of ACDC/ is accepted
    assert len(train) == 2 * 2 * 2
    assert {i[:10] for i in train.ids} == {"patient031", "patient064"}
    test = get_source("acdc", tmp_path / "ACDC", "test")
    assert {i[:10] for i in test.ids} == {"patient002", "patient015"} and len(test) == 8
    vols = get_volumes("acdc", tmp_path / "ACDC", "val")
    assert [v["id"] for v in vols] == ["patient022_frame01", "patient022_frame12"]
    assert vols[1]["image"].shape == (2, SIZE, SIZE)
    with h5py.File(tmp_path / "ACDC" / "ACDC_training_slices" / "patient064_frame12_slice_1.h5") as f:
        ex = train[train.ids.index("patient064_frame12_slice_1")]
        np.testing.assert_array_equal(ex["label"], f["label"][()])
        np.testing.assert_allclose(ex["image"][..., 0], f["image"][()])


def test_acdc_empty_split_names_the_folder(tmp_path):
    write_acdc(tmp_path, np.random.default_rng(5), patients=(40,))
    with pytest.raises(ValueError, match="ACDC_training_volumes"):
        get_source("acdc", tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="missing"):
        get_source("acdc", tmp_path / "missing", "train")


# ----------------------------------------------------------------------------- binary folders


def write_generic(root: Path, n: int, rng, image_ext=".png", mask_ext=".png", images="images", masks="masks",
                  mask_suffix="") -> dict[str, np.ndarray]:
    written = {}
    for i in range(n):
        stem = f"img{i}"
        written[stem] = write_pair(root / images / f"{stem}{image_ext}", root / masks / f"{stem}{mask_suffix}{mask_ext}",
                                   rng)
    return written


def check_examples(src, expected: dict[str, np.ndarray]) -> None:
    for ex in src:
        assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.float32
        assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
        assert ex["label"].dtype == np.int32 and set(np.unique(ex["label"])) <= {0, 1}
        np.testing.assert_array_equal(ex["label"], expected[ex["id"]])


@pytest.mark.parametrize("name", ["kvasir_seg", "cvc_colondb", "folder"])
def test_images_masks_layout_with_811_splits(tmp_path, name):
    written = write_generic(tmp_path, 20, np.random.default_rng(6), image_ext=".jpg", mask_ext=".png")
    splits = {s: get_source(name, tmp_path, s, split_seed=1) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    ids = [set(splits[s].ids) for s in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set.union(*ids) == set(written)
    assert get_source(name, tmp_path, "test", split_seed=1).ids == splits["test"].ids
    other = [get_source(name, tmp_path, "test", split_seed=s).ids for s in (0, 2, 3)]
    assert any(o != splits["test"].ids for o in other)
    check_examples(splits["val"], written)
    assert "split_seed=1" in repr(splits["val"])


def test_jpeg_masks_are_thresholded(tmp_path):
    rng = np.random.default_rng(7)
    mask = disc_mask(rng)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(rgb(rng)).save(tmp_path / "images" / "a.jpg")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "masks" / "a.jpg", quality=60)
    src = get_source("kvasir_seg", tmp_path, "train", fractions=(1.0, 0.0, 0.0))
    label = src[0]["label"]
    assert set(np.unique(label)) == {0, 1}
    assert (label != mask).mean() < 0.02  # JPEG ringing near the edge only


def test_cvc_clinicdb_original_and_ground_truth_tif(tmp_path):
    written = write_generic(tmp_path, 10, np.random.default_rng(8), image_ext=".tif", mask_ext=".tif",
                            images="Original", masks="Ground Truth")
    parts = [get_source("cvc_clinicdb", tmp_path, s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [8, 1, 1]
    check_examples(parts[0], written)


def test_busi_categories_or_multiple_masks_and_normal(tmp_path):
    rng = np.random.default_rng(9)
    root = tmp_path / "Dataset_BUSI_with_GT"
    expected = {}
    for category in ("benign", "malignant", "normal"):
        for i in range(1, 5):
            stem = f"{category} ({i})"
            mask = write_pair(root / category / f"{stem}.png", root / category / f"{stem}_mask.png", rng,
                              mask_mode="RGB" if category == "malignant" else "L")
            if category == "normal":
                Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(root / category / f"{stem}_mask.png")
                mask = np.zeros_like(mask)
            expected[f"{category}/{stem}"] = mask
    second = disc_mask(rng)
    Image.fromarray((second * 255).astype(np.uint8)).save(root / "benign" / "benign (2)_mask_1.png")
    expected["benign/benign (2)"] = expected["benign/benign (2)"] | second

    parts = [get_source("busi", tmp_path, s, split_seed=0) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 12
    for part in parts:
        check_examples(part, expected)
    assert any(i.startswith("normal/") for p in parts for i in p.ids)
    without = [get_source("busi", root, s, include_normal=False) for s in ("train", "val", "test")]
    assert sum(len(p) for p in without) == 8
    assert not any(i.startswith("normal/") for p in without for i in p.ids)


def test_glas_official_test_and_91_validation(tmp_path):
    rng = np.random.default_rng(10)
    folder = tmp_path / "Warwick QU Dataset"
    folder.mkdir()
    expected = {}
    names = [f"train_{i}" for i in range(1, 21)] + [f"testA_{i}" for i in range(1, 4)] + ["testB_1", "testB_2"]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for name in names:
        Image.fromarray(rgb(rng)).save(folder / f"{name}.bmp")
        instances = (yy // 8) * 4 + xx // 8  # instance ids up to 15: all non-zero ones are gland
        instances[rng.random(instances.shape) < 0.3] = 0
        Image.fromarray(instances.astype(np.uint8)).save(folder / f"{name}_anno.bmp")
        expected[name] = (instances > 0).astype(np.int32)
    train, val, test = (get_source("glas", tmp_path, s, split_seed=2) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 5)
    assert sorted(test.ids) == sorted(n for n in names if n.startswith("test"))
    assert set(train.ids) | set(val.ids) == {n for n in names if n.startswith("train")}
    assert not set(train.ids) & set(val.ids)
    check_examples(test, expected)
    (folder / "testA_2_anno.bmp").unlink()
    with pytest.raises(FileNotFoundError, match="testA_2.bmp"):
        get_source("glas", tmp_path, "train")


def test_isic2017_official_splits(tmp_path):
    rng = np.random.default_rng(11)
    expected = {}
    for part, n in (("Training", 4), ("Validation", 2), ("Test_v2", 3)):
        for i in range(n):
            stem = f"ISIC_{len(expected):07d}"
            expected[stem] = write_pair(tmp_path / f"ISIC-2017_{part}_Data" / f"{stem}.jpg",
                                        tmp_path / f"ISIC-2017_{part}_Part1_GroundTruth" / f"{stem}_segmentation.png",
                                        rng)
            if part == "Training":  # the release ships superpixel maps beside the images
                Image.fromarray(rgb(rng)).save(tmp_path / f"ISIC-2017_{part}_Data" / f"{stem}_superpixels.png")
    sizes = [len(get_source("isic2017", tmp_path, s, split_seed=s_)) for s, s_ in
             (("train", 0), ("val", 5), ("test", 9))]
    assert sizes == [4, 2, 3]
    check_examples(get_source("isic2017", tmp_path, "test"), expected)


def test_pre_split_folders(tmp_path):
    rng = np.random.default_rng(12)
    written = {split: write_generic(tmp_path / split, n, rng) for split, n in (("train", 3), ("val", 2), ("test", 1))}
    for split in written:
        src = get_source("kvasir_seg", tmp_path, split, split_seed=4)
        assert len(src) == len(written[split]) and src.split_seed is None
        check_examples(src, written[split])


def test_image_without_mask_names_the_image(tmp_path):
    write_generic(tmp_path, 5, np.random.default_rng(13))
    Image.fromarray(rgb(np.random.default_rng(0))).save(tmp_path / "images" / "orphan.png")
    with pytest.raises(FileNotFoundError, match="orphan.png"):
        get_source("kvasir_seg", tmp_path, "train")


def test_busi_image_without_mask_names_the_image(tmp_path):
    write_pair(tmp_path / "benign" / "benign (1).png", tmp_path / "benign" / "benign (1)_mask.png",
               np.random.default_rng(0))
    Image.fromarray(rgb(np.random.default_rng(1))).save(tmp_path / "benign" / "benign (2).png")
    with pytest.raises(FileNotFoundError, match=r"benign \(2\).png"):
        get_source("busi", tmp_path, "train", include_normal=False)


def test_missing_and_empty_binary_datasets(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        get_source("kvasir_seg", tmp_path / "absent", "train")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(ValueError, match=f"empty dataset.*{tmp_path / 'images'}"):
        get_source("cvc_colondb", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="ISIC-2017_Training_Data"):
        get_source("isic2017", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown dataset"):
        get_source("imagenet21k", tmp_path, "train")
    with pytest.raises(ValueError, match="splits"):
        get_source("kvasir_seg", tmp_path, "validation")


def test_too_small_split_is_an_error(tmp_path):
    write_generic(tmp_path, 3, np.random.default_rng(14))
    with pytest.raises(ValueError, match="empty dataset.*val"):
        get_source("kvasir_seg", tmp_path, "val")


def test_sources_pickle_for_worker_processes(tmp_path):
    write_generic(tmp_path, 10, np.random.default_rng(15))
    src = get_source("folder", tmp_path, "train")
    clone = pickle.loads(pickle.dumps(src))
    assert repr(clone) == repr(src)
    np.testing.assert_array_equal(clone[3]["label"], src[3]["label"])


def test_dataset_facts():
    assert data.DATASETS == ("synapse", "acdc", "busi", "cvc_clinicdb", "cvc_colondb", "kvasir_seg", "isic2017",
                             "glas", "phantom")
    assert (data.num_classes("synapse"), data.num_classes("acdc"), data.num_classes("glas")) == (9, 4, 2)
    assert (data.in_channels("synapse"), data.in_channels("kvasir_seg")) == (1, 3)
    assert data.default_image_size("acdc") == (224, 224) and data.default_image_size("busi") == (256, 256)
    assert data.default_augment("acdc") == "transunet" and data.default_augment("isic2017") == "binary"
