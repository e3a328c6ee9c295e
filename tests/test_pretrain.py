"""Pretraining recipe pieces (targets, schedule, optimizer) and an exact resume after SIGTERM."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rwkvunet_jax.data.mixup import MixupCutmix, smooth_one_hot

REPO = Path(__file__).resolve().parents[1]


def get_config(arg: str):
    """configs/pretrain_imagenet.py:<arg>, loaded from its file (as the command line does)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_imagenet_config", REPO / "configs" / "pretrain_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# ----------------------------------------------------------------------------- targets by hand


def test_label_smoothing_targets_by_hand():
    from rwkvunet_jax.train.losses import soft_targets

    # K = 5, eps = 0.1: 1 - 0.1 + 0.02 = 0.92 on the label, 0.1 / 5 = 0.02 elsewhere.
    expected = np.array([[0.02, 0.02, 0.92, 0.02, 0.02], [0.92, 0.02, 0.02, 0.02, 0.02]], np.float32)
    np.testing.assert_allclose(smooth_one_hot(np.array([2, 0]), 5, 0.1), expected, atol=1e-7)
    np.testing.assert_allclose(np.asarray(soft_targets(np.array([2, 0]), 5, 0.1)), expected, atol=1e-7)
    with pytest.raises(ValueError, match="range"):
        smooth_one_hot(np.array([5]), 5, 0.1)


def _two_colour_batch(size=16):
    images = np.stack([np.full((size, size, 3), 200, np.uint8), np.full((size, size, 3), 40, np.uint8)])
    return {"image": images, "label": np.array([1, 3], np.int32)}


def test_mixup_blends_images_and_targets_with_the_same_lambda():
    batch = _two_colour_batch()
    out = MixupCutmix(4, mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.1)(
        batch, np.random.default_rng(5))
    # Image 0 is 200 * lam + 40 * (1 - lam), rounded: read lam back from a pixel.
    lam = (float(out["image"][0, 0, 0, 0]) - 40.0) / 160.0
    assert np.all(out["image"][0] == out["image"][0, 0, 0, 0])
    smooth = {1: [0.025, 0.925, 0.025, 0.025], 3: [0.025, 0.025, 0.025, 0.925]}
    expected0 = lam * np.array(smooth[1]) + (1 - lam) * np.array(smooth[3])
    np.testing.assert_allclose(out["target"][0], expected0, atol=1 / 160 + 1e-6)
    np.testing.assert_allclose(out["target"].sum(axis=1), 1.0, atol=1e-6)
    assert 0.0 < lam < 1.0


def test_cutmix_pastes_a_box_and_weights_targets_by_its_area():
    batch = _two_colour_batch(size=20)
    out = MixupCutmix(4, mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.0)(
        batch, np.random.default_rng(11))
    pasted = out["image"][0, :, :, 0] == 40  # pixels that came from image 1
    area = pasted.mean()
    assert 0 < area < 1
    rows, cols = np.nonzero(pasted)  # the pasted region is one axis-aligned box
    assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    np.testing.assert_allclose(out["target"][0], [0, 1 - area, 0, area], atol=1e-6)
    np.testing.assert_allclose(out["target"][1], [0, area, 0, 1 - area], atol=1e-6)


def test_mixing_with_probability_zero_only_smooths():
    batch = _two_colour_batch()
    out = MixupCutmix(4, prob=0.0, label_smoothing=0.1)(batch, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], batch["image"])
    np.testing.assert_allclose(out["target"], smooth_one_hot(batch["label"], 4, 0.1))


# ----------------------------------------------------------------------------- schedule, optimizer


def test_schedule_is_linear_warmup_then_cosine_on_the_global_clock():
    from rwkvunet_jax.train.schedules import make_schedule

    peak, low, total, warm = 3e-3, 5e-7, 1000, 100

    def warmup_cosine_schedule(**kwargs):
        return make_schedule("timm_cosine", lr=peak, warmup_init_lr=low, min_lr=low, **kwargs)

    schedule = warmup_cosine_schedule(total_steps=total, warmup_steps=warm)
    for step, expected in [
        (0, low),
        (50, low + (peak - low) * 0.5),
        (100, low + 0.5 * (peak - low) * (1 + math.cos(math.pi * 0.1))),
        (500, low + 0.5 * (peak - low)),
        (1000, low),
        (1200, low),
    ]:
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)
    with pytest.raises(ValueError):
        warmup_cosine_schedule(total_steps=10, warmup_steps=10)


def test_weight_decay_skips_vectors_and_config_scales_lr_linearly():
    from rwkvunet_jax.train.optimizer import weight_decay_mask

    config = get_config("b")
    mask = weight_decay_mask({"kernel": np.zeros((3, 3, 4, 8)), "bias": np.zeros(8), "spatial_decay": np.zeros(8)},
                             config.optim.weight_decay_mask)
    assert mask == {"kernel": True, "bias": False, "spatial_decay": False}
    assert config.optim.lr * config.batch_size / config.optim.reference_batch == pytest.approx(3e-3)
    assert (config.ema_decay, config.label_smoothing, config.optim.grad_clip_norm) == (0.9998, 0.1, 5.0)
    assert config.mixup.prob == 0.0 and config.model.drop_path_rate == 0.05
    with pytest.raises(ValueError, match="smoke"):
        get_config("xl")


def test_command_rejects_bad_arguments_with_status_2(capsys):
    from rwkvunet_jax.cli import main as cli_main

    def main(argv):
        return cli_main(["pretrain", *argv])

    config = f"{REPO / 'configs' / 'pretrain_imagenet.py'}:smoke"
    assert main(["--config", config]) == 2
    assert "--workdir" in capsys.readouterr().err
    assert main(["--config", config, "--workdir", "x", "--config.no_such_field=1"]) == 2
    assert main(["--config", f"{REPO / 'configs' / 'pretrain_imagenet.py'}:huge", "--workdir", "x"]) == 2
    assert main(["--help"]) == 0


# ----------------------------------------------------------------------------- resume after SIGTERM


def _smoke(total_steps: int, **debug):
    config = get_config("smoke")
    config.total_steps = total_steps
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 5
    config.eval.every_steps = config.eval.every_epochs = 0
    config.progress_bar = False
    config.data.fake_train_per_class = 4
    for key, value in debug.items():
        setattr(config.debug, key, value)
    return config


def _restored(workdir: Path, step: int):
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        model = ckptr.restore(workdir / "checkpoints" / str(step) / "model")
        optimizer = ckptr.restore(workdir / "checkpoints" / str(step) / "optimizer")
    return model, optimizer


def test_sigterm_saves_and_resume_continues_bit_exactly(tmp_path, compile_cache):
    import jax

    from rwkvunet_jax.checkpoint import load_model, model_state
    from rwkvunet_jax.models.registry import create_model
    from rwkvunet_jax.train.finetune import load_pretrained_encoder
    from rwkvunet_jax.train.pretrain import train_and_evaluate

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    shared_data = tmp_path / "data"
    for workdir in (straight, broken):
        workdir.mkdir()
    # One generated dataset for both runs.
    first = _smoke(4)
    first.data.root = str(shared_data)
    result = train_and_evaluate(first, straight)
    assert (result.step, result.preempted, result.resumed_from) == (4, False, None)

    killed = _smoke(4, sigterm_at_step=2)
    killed.data.root = str(shared_data)
    result = train_and_evaluate(killed, broken)
    assert (result.step, result.preempted) == (2, True)
    assert sorted(int(p.name) for p in (broken / "checkpoints").iterdir() if p.name.isdigit()) == [2]

    again = _smoke(4)
    again.data.root = str(shared_data)
    result = train_and_evaluate(again, broken)
    assert (result.step, result.preempted, result.resumed_from) == (4, False, 2)

    for a, b in zip(_restored(straight, 4), _restored(broken, 4)):
        flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
        assert len(flat_a) == len(flat_b) > 10
        for (path, x), y in zip(flat_a, flat_b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))

    # The exported EMA encoder is a model checkpoint that fine-tuning loads into a segmentation model.
    encoder = load_model(broken / "encoder_ema")
    assert encoder.spec.name == "rwkv_unet_encoder_t"
    seg = create_model("rwkv_unet_t", num_classes=2, in_chans=3, depths=(1, 1, 2, 2), widths=(8, 16, 16, 32))
    report = load_pretrained_encoder(seg, broken / "encoder_ema")
    assert "stage4" in report
    np.testing.assert_array_equal(
        np.asarray(model_state(seg)["encoder"]["stage4"][1]["att"]["key"]["kernel"]),
        np.asarray(model_state(encoder)["stage4"][1]["att"]["key"]["kernel"]))
    shutil.rmtree(shared_data)


def test_unreadable_images_stop_the_run_after_saving_the_last_step(tmp_path, compile_cache):
    from rwkvunet_jax.data import imagenet
    from rwkvunet_jax.data.bad_examples import BadFractionError
    from rwkvunet_jax.data.pipeline import train_iterator
    from rwkvunet_jax.train.metric_writer import read_metrics
    from rwkvunet_jax.train.pretrain import train_and_evaluate

    config = _smoke(4)
    config.data.root = str(tmp_path / "data")
    config.data.max_bad_fraction = 0.2
    config.data.bad_fraction_min_examples = 16
    data = config.data
    imagenet.write_fake_imagefolder(data.root, num_classes=data.fake_classes, train_per_class=data.fake_train_per_class,
                                    val_per_class=data.fake_val_per_class, seed=config.seed)
    for path in sorted((tmp_path / "data" / "train").rglob("*.jpg"))[::2]:
        path.write_bytes(path.read_bytes()[:40])  # truncated JPEGs: half the training set
    workdir = tmp_path / "run"
    with pytest.raises(BadFractionError, match=r"of 16 training examples .*max_bad_fraction=0.2; e\.g\. .*\.jpg"):
        train_and_evaluate(config, workdir)
    # Step 1 ran, then the count over its batch stopped the run: step 1 was saved first, with the data
    # position after one batch, and the count is in the metrics.
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [1]
    assert [r["data/bad_examples"] for r in read_metrics(workdir) if "data/bad_examples" in r][-1] >= 4
    saved = json.loads((workdir / "checkpoints" / "1" / "data" / "process_0-of-1.json").read_text())
    source = imagenet.ImageFolderSource(tmp_path / "data" / "train")
    aug = config.aug
    transform = imagenet.TrainTransform(data.image_size, randaugment=aug.randaugment or None,
                                        color_jitter=aug.color_jitter, hflip=aug.hflip, scale=tuple(aug.scale),
                                        ratio=tuple(aug.ratio), interpolation=aug.interpolation)
    fresh = train_iterator(source, transform, batch_size=config.batch_size, seed=config.seed)
    next(fresh)
    assert saved == json.loads(json.dumps(fresh.get_state()))
