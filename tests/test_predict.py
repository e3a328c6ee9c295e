"""``rwkvunet predict`` on fixture files of every supported format, against a reference written out with
scipy/PIL/nibabel (resize in, model, argmax, nearest resize back) using the same checkpoint."""


import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import zoom

from rwkvunet_jax import checkpoint as ckpt
from rwkvunet_jax.commands import predict
from rwkvunet_jax.eval.inference import model_predict_fn
from rwkvunet_jax.eval.predictor import read_image
from rwkvunet_jax.models.registry import create_model

NET = 32
BATCH = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, compile_cache):
    model = create_model("rwkv_unet_t", num_classes=3, in_chans=1, seed=0, depths=(1, 1, 2, 2), widths=(8, 16, 16, 32))
    return ckpt.save_model(tmp_path_factory.mktemp("ckpt") / "model", model)


@pytest.fixture(scope="module")
def reference(model_dir):
    forward = model_predict_fn(ckpt.load_model(model_dir))

    def labels(slice_2d, order):
        """The documented pipeline, written out: zoom to NET (order), model, argmax, zoom back (order 0)."""
        h, w = slice_2d.shape
        small = zoom(slice_2d.astype(np.float32), (NET / h, NET / w), order=order)
        batch = np.zeros((BATCH, NET, NET, 1), np.float32)
        batch[0, ..., 0] = small
        pred = np.argmax(np.asarray(forward(batch))[0], axis=-1)
        return zoom(pred, (h / NET, w / NET), order=0)

    return labels


def _smooth(shape, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    return (0.5 + 0.4 * np.sin(6 * yy + seed) * np.cos(5 * xx) + 0.05 * rng.normal(size=shape)).clip(0, 1)


def test_every_format_round_trips_with_the_input_size(tmp_path, model_dir, reference):
    nib = pytest.importorskip("nibabel")
    gray = (_smooth((40, 50), 0) * 255).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgb = (np.stack([_smooth((36, 20), s) for s in (1, 2, 3)], -1) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.jpg", quality=95)
    np.save(tmp_path / "slice.npy", _smooth((40, 50), 4).astype(np.float32))
    np.savez(tmp_path / "slice.npz", image=_smooth((24, 40), 5).astype(np.float32), other=np.zeros(3))
    hu = np.stack([_smooth((40, 50), 6 + k) * 600 - 200 for k in range(3)], -1).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10, -20, 5]
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "volume.nii.gz"))

    outdir = tmp_path / "out"
    inputs = [tmp_path / n for n in ("gray.png", "colour.jpg", "slice.npy", "slice.npz", "volume.nii.gz")]
    code = predict.main([*map(str, inputs), "--checkpoint", str(model_dir), "--outdir", str(outdir),
                         "--image-size", str(NET), str(NET), "--batch-size", str(BATCH)])
    assert code == 0

    mask = np.asarray(Image.open(outdir / "gray_mask.png"))
    np.testing.assert_array_equal(mask, reference(gray / 255.0, order=1))
    grey_of_jpeg = np.asarray(Image.open(tmp_path / "colour.jpg").convert("L"), np.float32) / 255.0
    np.testing.assert_array_equal(np.asarray(Image.open(outdir / "colour_mask.png")), reference(grey_of_jpeg, order=1))
    np.testing.assert_array_equal(np.load(outdir / "slice_mask.npy"), reference(np.load(tmp_path / "slice.npy"), 3))
    with np.load(outdir / "slice_mask.npz") as archive:
        np.testing.assert_array_equal(archive["label"], reference(np.load(tmp_path / "slice.npz")["image"], 3))

    # NIfTI: slices along the last axis; same shape and affine. Without --window the values are used as stored.
    out = nib.load(str(outdir / "volume_mask.nii.gz"))
    assert out.shape == hu.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, affine)
    labels = np.asarray(out.dataobj)
    for k in range(hu.shape[-1]):
        np.testing.assert_array_equal(labels[..., k], reference(hu[..., k], order=3))
    for stem in ("gray", "colour", "slice", "volume"):
        assert (outdir / f"{stem}_overlay.png").is_file()
    assert all(0 <= m.max() < 3 for m in (mask, labels))


def test_window_clips_and_scales_intensities(tmp_path, model_dir, reference):
    hu = (_smooth((32, 32), 9) * 800 - 300).astype(np.float32)
    np.save(tmp_path / "ct.npy", hu)
    assert predict.main([str(tmp_path / "ct.npy"), "--checkpoint", str(model_dir), "--outdir", str(tmp_path / "o"),
                         "--image-size", str(NET), str(NET), "--window", "-125", "275"]) == 0
    windowed = (np.clip(hu, -125, 275) + 125) / 400
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "ct_mask.npy"), reference(windowed, order=3))


def test_bad_inputs_fail_with_the_path(tmp_path, model_dir, capsys):
    args = ["--checkpoint", str(model_dir), "--image-size", "32", "32", "--outdir", str(tmp_path / "o")]
    assert predict.main([str(tmp_path / "absent.png"), *args]) == 2
    assert "absent.png" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert predict.main([str(tmp_path / "notes.txt"), *args]) == 2
    assert "unsupported input" in capsys.readouterr().err
    np.save(tmp_path / "ok.npy", np.zeros((8, 8), np.float32))
    assert predict.main([str(tmp_path / "ok.npy"), "--checkpoint", str(tmp_path / "no_ckpt")]) == 2
    assert "no_ckpt" in capsys.readouterr().err


def test_trained_image_size_comes_from_the_checkpoint_config():
    assert predict.trained_image_size({"config": {"data": {"image_size": [64, 96]}}}) == (64, 96)
    assert predict.trained_image_size({"model": {}}) == (224, 224)


def _run(inputs, model_dir, outdir, *extra):
    return predict.main([*map(str, inputs), "--checkpoint", str(model_dir), "--outdir", str(outdir),
                         "--image-size", str(NET), str(NET), "--batch-size", str(BATCH), *extra])


def test_sixteen_bit_and_float_images_keep_their_full_range(tmp_path, model_dir, reference, capsys):
    raw = (_smooth((40, 36), 11) * 60000 + 2000).astype(np.uint16)  # far beyond 255: convert("L") clips it
    Image.fromarray(raw).save(tmp_path / "grey16.png")  # Pillow mode I;16
    Image.fromarray(raw.astype(np.int32)).save(tmp_path / "grey32.tif")  # mode I
    unit = _smooth((24, 28), 12).astype(np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tif")  # mode F in [0, 1]
    assert [Image.open(tmp_path / n).mode for n in ("grey16.png", "grey32.tif", "unit.tif")] == ["I;16", "I", "F"]
    # What the network is given: the stored values over the type's range (a random model's masks can be
    # blind to the input, so the reader is checked on its own too).
    for name in ("grey16.png", "grey32.tif"):
        np.testing.assert_allclose(read_image(tmp_path / name, 1)[..., 0], raw / 65535.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(read_image(tmp_path / "unit.tif", 3), unit[..., None])  # grey: one channel
    out = tmp_path / "out"
    assert _run([tmp_path / n for n in ("grey16.png", "grey32.tif", "unit.tif")], model_dir, out) == 0
    expected = reference(raw / 65535.0, order=1)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "grey16_mask.png")), expected)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "grey32_mask.png")), expected)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "unit_mask.png")), reference(unit, order=1))
    assert "warning" not in capsys.readouterr().err

    # --window acts on the stored 16-bit values.
    assert _run([tmp_path / "grey16.png"], model_dir, tmp_path / "w", "--window", "10000", "50000") == 0
    windowed = (np.clip(raw.astype(np.float64), 10000, 50000) - 10000) / 40000
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "w" / "grey16_mask.png")),
                                  reference(windowed, order=1))


def test_images_without_a_usable_range_are_refused_or_flagged(tmp_path, model_dir, capsys):
    Image.fromarray((_smooth((20, 20), 13) * 500 - 100).astype(np.float32)).save(tmp_path / "hu.tif")
    assert _run([tmp_path / "hu.tif"], model_dir, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "hu.tif" in err and "no natural intensity range" in err and "--window" in err

    Image.fromarray((_smooth((20, 20), 14) * 4095).astype(np.uint16)).save(tmp_path / "twelve_bit.png")
    Image.fromarray(np.full((20, 20), 7, np.uint8)).save(tmp_path / "flat.png")
    assert _run([tmp_path / "twelve_bit.png", tmp_path / "flat.png"], model_dir, tmp_path / "o") == 0
    err = capsys.readouterr().err
    assert "twelve_bit.png: a 16-bit image with values in [" in err and "--window" in err
    assert "flat.png: every value is 0.0274" in err and "constant" in err
    assert (tmp_path / "o" / "flat_mask.png").is_file()  # written, but not silently


def test_nifti_with_trailing_singleton_axes_is_squeezed_and_4d_refused(tmp_path, model_dir, reference, capsys):
    nib = pytest.importorskip("nibabel")
    volume = np.stack([_smooth((30, 26), 20 + k) for k in range(3)], -1).astype(np.float32)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[:3, 3] = [-5, 12, 40]
    for name, shape in (("x4", volume.shape + (1,)), ("x5", volume.shape + (1, 1))):
        img = nib.Nifti1Image(volume.reshape(shape), affine)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, str(tmp_path / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([volume, volume], -1), affine), str(tmp_path / "t2.nii.gz"))

    assert _run([tmp_path / "x4.nii.gz", tmp_path / "x5.nii.gz"], model_dir, tmp_path / "o") == 0
    for name, shape in (("x4", volume.shape + (1,)), ("x5", volume.shape + (1, 1))):
        out = nib.load(str(tmp_path / "o" / f"{name}_mask.nii.gz"))
        assert out.shape == shape and out.get_data_dtype() == np.uint8
        np.testing.assert_allclose(out.affine, affine)
        assert out.header.get_xyzt_units() == ("mm", "sec")
        labels = np.asarray(out.dataobj).reshape(volume.shape)
        for k in range(volume.shape[-1]):
            np.testing.assert_array_equal(labels[..., k], reference(volume[..., k], order=3))

    assert _run([tmp_path / "t2.nii.gz"], model_dir, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "t2.nii.gz has shape (30, 26, 3, 2)" in err and "3-D volumes" in err


@pytest.mark.parametrize("flags,mode", [([], "none"), (["--tta"], "hflip_logits"),
                                        (["--tta-mode", "hv_probs"], "hv_probs")])
def test_tta_flags_reach_the_predictor(tmp_path, model_dir, monkeypatch, flags, mode):
    from rwkvunet_jax.eval import predictor as predictor_module

    seen = []

    class Spy(predictor_module.Predictor):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["tta"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "Predictor", Spy)
    np.save(tmp_path / "slice.npy", _smooth((NET, NET), 1).astype(np.float32))
    assert predict.main([str(tmp_path / "slice.npy"), "--checkpoint", str(model_dir), "--outdir",
                         str(tmp_path / "out"), *flags]) == 0
    assert seen == [mode]
