"""Fine-tuning end to end on a tiny phantom with a tiny RWKV-UNet: loss goes down, a killed run resumes exactly,
artefacts are written, the evaluate command reads the run, and errors are clear.

One module-scoped uninterrupted run is shared; compiled programs go to a persistent cache in a temporary
directory so that the interrupted and resumed runs (same program) do not compile again.
"""

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from rwkvunet_jax import checkpoint as ckpt
from rwkvunet_jax.commands.parsing import load_config
from rwkvunet_jax.train import finetune
from rwkvunet_jax.train.metric_writer import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--config.model.depths=(1,1,2,2)", "--config.model.widths=(8,16,16,32)", "--config.model.num_classes=3",
        "--config.class_names=('background','liver','kidney')"]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from rwkvunet_jax.data.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantom") / "data", num_train=16, num_val=4, num_test=4,
                                 image_size=(32, 32), num_classes=3, seed=0, slices_per_volume=4)


def tiny_overrides(root, *extra):
    """The overrides that shrink the demo config for tests; ``extra`` overrides replace defaults of the same
    field (a repeated tuple flag would be appended to, not replaced)."""
    argv = [f"--config.data.root={root}", "--config.data.image_size=(32,32)", *TINY, "--config.batch_size=4",
            "--config.eval.batch_size=4", "--config.total_steps=6", "--config.optim.warmup_steps=0",
            "--config.checkpoint.every_steps=2", "--config.eval.every_steps=3", "--config.log_every_steps=1",
            "--config.eval.num_overlays=2", "--config.checkpoint.keep=2"]
    replaced = {e.split("=")[0] for e in extra}
    return [a for a in argv if a.split("=")[0] not in replaced] + list(extra)


def tiny_config(root, *extra):
    """The demo config shrunk for tests (see :func:`tiny_overrides`)."""
    return load_config(str(CONFIGS / "demo.py"), tiny_overrides(root, *extra))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, phantom_root, compile_cache):
    workdir = tmp_path_factory.mktemp("run_full")
    summary = finetune.train_and_evaluate(tiny_config(phantom_root), workdir, progress=False)
    return workdir, summary


def _losses(workdir):
    return [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]


def test_run_lowers_the_loss_and_writes_every_artefact(finished_run):
    workdir, summary = finished_run
    assert summary["step"] == 6
    losses = _losses(workdir)
    assert [s for s, _ in losses] == list(range(1, 7))
    assert np.mean([v for _, v in losses[-2:]]) < np.mean([v for _, v in losses[:2]]), losses
    for name in ("progress.png", "metrics.csv", "metrics.jsonl", "config.json", "eval_test/metrics.json",
                 "eval_test/metrics.csv"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").glob("events.*"))
    train = [r for r in read_metrics(workdir) if "train/loss" in r]
    assert all({"train/ce", "train/dice_loss"} <= set(r) and "train/dice" not in r for r in train)  # a loss, named so
    assert len(list((workdir / "eval_test" / "overlays").glob("*.png"))) == 2
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6]
    assert [p.name for p in (workdir / "checkpoints_best").iterdir() if p.name.isdigit()] == [str(summary["best"]["step"])]
    metrics = json.loads((workdir / "eval_test" / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"liver", "kidney"} and 0 <= metrics["mean_dice"] <= 1
    vals = [r for r in read_metrics(workdir) if "val/mean_dice" in r]
    assert [r["step"] for r in vals] == [3, 6]
    # the checkpoint is a model checkpoint for every reader
    model = ckpt.load_model(workdir)
    assert model.spec.num_classes == 3 and model.spec.depths == (1, 1, 2, 2)


def test_killed_run_resumes_at_the_saved_step_with_the_same_batches(tmp_path, finished_run, phantom_root):
    full_dir, _ = finished_run
    workdir = tmp_path / "run"
    stopped = finetune.train_and_evaluate(tiny_config(phantom_root), workdir, stop_after_step=3, progress=False)
    assert stopped["step"] == 3 and "metrics" not in stopped
    assert ckpt.resolve_checkpoint(workdir / "checkpoints").name == "2"  # 3 was never saved: the 'kill'

    # The saved data-iterator state continues with the batch an uninterrupted pipeline gives third.
    from rwkvunet_jax import data
    from rwkvunet_jax.train.checkpoints import TrainCheckpoints

    config = tiny_config(phantom_root)
    source = data.get_source("phantom", phantom_root, "train")

    def fresh():
        return data.train_iterator(source, finetune.training_transform(config), batch_size=4, seed=config.seed)

    uninterrupted = fresh()
    expected = [next(uninterrupted) for _ in range(3)][-1]
    with TrainCheckpoints(workdir / "checkpoints") as saved:
        restored = saved.restore_data(2, fresh())
    got = next(restored)
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])

    resumed = finetune.train_and_evaluate(tiny_config(phantom_root), workdir, progress=False)
    assert resumed["step"] == 6
    ours, reference = _losses(workdir), _losses(full_dir)
    assert [s for s, _ in ours] == [s for s, _ in reference] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in ours], [v for _, v in reference], rtol=1e-6, atol=1e-6)
    assert resumed["metrics"]["mean_dice"] == pytest.approx(
        json.loads((full_dir / "eval_test" / "metrics.json").read_text())["mean_dice"], abs=1e-6)


def test_sigterm_saves_stops_and_the_command_exits_75(tmp_path, phantom_root, finished_run, capsys):
    from rwkvunet_jax.cli import main as rwkvunet

    full_dir, _ = finished_run
    workdir = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "demo.py"), *tiny_overrides(phantom_root, "--config.debug.sigterm_at_step=3"),
            "--workdir", str(workdir), "--no-progress"]
    assert rwkvunet(["finetune", *argv]) == 75
    assert "preempted: checkpoint at step 3" in capsys.readouterr().out
    # Step 3 is not a periodic checkpoint step (every 2): it was saved for the preemption, and training stopped.
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert [s for s, _ in _losses(workdir)] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in _losses(workdir)], [v for _, v in _losses(full_dir)[:3]], rtol=1e-6,
                               atol=1e-6)


def test_evaluate_command_reads_the_run_and_agrees(finished_run, phantom_root, tmp_path, capsys):
    from rwkvunet_jax.cli import main as cli_main

    workdir, summary = finished_run
    argv = ["--config", str(CONFIGS / "demo.py"), f"--config.data.root={phantom_root}",
            "--config.data.image_size=(32,32)", *TINY, "--checkpoint", str(workdir), "--outdir", str(tmp_path / "ev"),
            "--no-progress"]
    assert cli_main(["evaluate", *argv]) == 0
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert got["mean_dice"] == pytest.approx(summary["metrics"]["mean_dice"], abs=1e-6)
    assert "liver" in capsys.readouterr().out

    wrong = [a if "num_classes" not in a else "--config.model.num_classes=4" for a in argv]
    assert cli_main(["evaluate", *wrong]) == 2
    assert "num_classes=3" in capsys.readouterr().err


def test_resuming_with_another_model_is_refused(finished_run, phantom_root, tmp_path):
    import shutil

    workdir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    config = tiny_config(phantom_root, "--config.model.widths=(8,16,16,48)")
    with pytest.raises(ckpt.CheckpointError, match="different model"):
        finetune.train_and_evaluate(config, copy, progress=False)


def test_missing_dataset_and_empty_root_fail_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        finetune.train_and_evaluate(tiny_config(tmp_path / "nowhere"), tmp_path / "w", progress=False)
    with pytest.raises(ValueError, match="data.root"):
        finetune.train_and_evaluate(tiny_config(""), tmp_path / "w", progress=False)
    with pytest.raises(ValueError, match="multiples of 16"):
        finetune.train_and_evaluate(tiny_config(tmp_path, "--config.data.image_size=(30,30)"), tmp_path / "w")


def test_non_finite_loss_names_the_step():
    from rwkvunet_jax.train.loop import MetricWindow

    window = MetricWindow(batch_size=4)
    window.add(4, {"loss": np.float32(0.5), "lr": np.float32(1e-3)})
    window.add(5, {"loss": np.float32(np.nan), "lr": np.float32(1e-3)})
    with pytest.raises(finetune.NonFiniteLossError, match="step 5"):
        window.flush()


def test_pretrained_encoder_from_orbax_classifier_and_torch_file(tmp_path):
    from rwkvunet_jax.models.registry import create_model

    sizes = dict(depths=(1, 1, 2, 2), widths=(8, 16, 16, 32))
    classifier = create_model("rwkv_unet_encoder_t", num_classes=10, in_chans=3, seed=1, **sizes)
    ckpt.save_model(tmp_path / "classifier", classifier)

    def stage_arrays(tree):
        return {k: jax.tree.leaves(v) for k, v in tree.items() if str(k).startswith("stage")}

    expected = stage_arrays(ckpt.model_state(classifier))
    seg = create_model("rwkv_unet_t", num_classes=3, in_chans=1, seed=2, **sizes)
    decoder_before = jax.tree.leaves(ckpt.model_state(seg)["decoder1"])
    report = finetune.load_pretrained_encoder(seg, tmp_path / "classifier")
    assert "stage0" in report and "stage4" in report
    got = stage_arrays(ckpt.model_state(seg)["encoder"])
    for name in expected:
        for a, b in zip(got[name], expected[name]):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(ckpt.model_state(seg)["decoder1"]), decoder_before):
        np.testing.assert_array_equal(a, b)  # only the encoder changes

    pytest.importorskip("torch")
    from rwkvunet_jax import convert

    path = convert.write_state_dict(convert.export_torch_state_dict(classifier), tmp_path / "net_T.pth")
    seg2 = create_model("rwkv_unet_t", num_classes=3, in_chans=1, seed=3, **sizes)
    finetune.load_pretrained_encoder(seg2, path)
    for name, arrays in stage_arrays(ckpt.model_state(seg2)["encoder"]).items():
        for a, b in zip(arrays, expected[name]):
            np.testing.assert_allclose(a, b, rtol=1e-6)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        finetune.load_pretrained_encoder(seg2, tmp_path / "missing.pth")


class _InterruptAt:
    """A training iterator that raises ``error`` on its ``at``-th batch (what Ctrl-C or a data error does)."""

    def __init__(self, inner, at: int, error: BaseException):
        self.inner, self.at, self.error, self.count = inner, at, error, 0

    def __next__(self):
        self.count += 1
        if self.count == self.at:
            raise self.error
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_an_exception_in_the_loop_saves_the_last_step_with_its_data_position(tmp_path, phantom_root, monkeypatch,
                                                                              finished_run):
    from rwkvunet_jax import data

    real = data.train_iterator
    monkeypatch.setattr(data, "train_iterator", lambda *a, **k: _InterruptAt(real(*a, **k), 4, KeyboardInterrupt()))
    workdir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune.train_and_evaluate(tiny_config(phantom_root), workdir, progress=False)
    # Steps 1-3 ran, periodic checkpoints are every 2 steps: step 3 was saved on the way out.
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]

    # Its data state is the one after three batches (not the live iterator's, which failed on the fourth).
    from rwkvunet_jax.train.checkpoints import TrainCheckpoints

    config = tiny_config(phantom_root)
    source = data.get_source("phantom", phantom_root, "train")

    def fresh():
        return real(source, finetune.training_transform(config), batch_size=4, seed=config.seed)

    uninterrupted = fresh()
    expected = [next(uninterrupted) for _ in range(4)][-1]
    with TrainCheckpoints(workdir / "checkpoints") as saved:
        restored = saved.restore_data(3, fresh())
    np.testing.assert_array_equal(next(restored)["image"], expected["image"])


def test_too_many_unreadable_slices_stop_the_run_with_one_line_naming_them(tmp_path, phantom_root, capsys,
                                                                           compile_cache):
    import shutil

    from rwkvunet_jax.cli import main as rwkvunet

    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    for path in sorted((root / "train_npz").glob("*.npz"))[::2]:  # half the training slices
        path.write_bytes(b"not an npz file")
    workdir = tmp_path / "run"
    argv = ["--config", str(CONFIGS / "demo.py"), f"--config.data.root={root}", "--config.data.image_size=(32,32)",
            *TINY, "--config.batch_size=4", "--config.total_steps=6", "--config.optim.warmup_steps=0",
            "--config.checkpoint.every_steps=5",
            "--config.eval.every_steps=0", "--config.log_every_steps=1", "--config.data.bad_fraction_min_examples=8",
            "--config.data.max_bad_fraction=0.2", "--workdir", str(workdir), "--no-progress"]
    assert rwkvunet(["finetune", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rwkvunet finetune:")]
    assert len(lines) == 1, lines
    assert re.search(r"\d+ of 8 training examples .*max_bad_fraction=0.2; e\.g\. .*train_npz/.*\.npz", lines[0])
    # It stopped on drawing the second batch (8 examples) and saved step 1; the running count is a metric.
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [1]
    counts = [r["data/bad_examples"] for r in read_metrics(workdir) if "data/bad_examples" in r]
    assert len(counts) == 1 and counts[0] >= 1


def test_list_dir_reaches_the_readers_of_finetune_and_evaluate(phantom_root, tmp_path, monkeypatch, capsys):
    from rwkvunet_jax import data
    from rwkvunet_jax.cli import main as rwkvunet
    from rwkvunet_jax.models.registry import create_model

    lists = tmp_path / "lists"
    lists.mkdir()
    cases = (phantom_root / "lists_Synapse" / "test_vol.txt").read_text().split()
    (lists / "test_vol.txt").write_text(f"{cases[0]}\nphantom_test_99\n")  # a case the data folder lacks
    model = create_model("rwkv_unet_t", num_classes=3, in_chans=1, depths=(1, 1, 2, 2), widths=(8, 16, 16, 32))
    checkpoint = ckpt.save_model(tmp_path / "model", model)
    argv = ["--config", str(CONFIGS / "demo.py"), f"--config.data.root={phantom_root}",
            "--config.data.image_size=(32,32)", *TINY, "--checkpoint", str(checkpoint), "--outdir",
            str(tmp_path / "ev"), "--no-progress", f"--config.data.list_dir={lists}"]
    assert rwkvunet(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert f"phantom file listed in {lists / 'test_vol.txt'} not found" in err and "phantom_test_99.npy.h5" in err

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("list_dir"))
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(data, "get_source", spy)
    with pytest.raises(KeyboardInterrupt):
        finetune.train_and_evaluate(tiny_config(phantom_root, f"--config.data.list_dir={lists}"), tmp_path / "w")
    assert seen == [str(lists)]


def test_augmentation_overrides_reach_the_training_transform(phantom_root, tmp_path, monkeypatch):
    from rwkvunet_jax import data

    seen = []

    def spy(source, transform, **kwargs):
        seen.append(transform)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(data, "train_iterator", spy)
    config = tiny_config(phantom_root, "--config.data.augment=transunet", "--config.data.image_order=3",
                         "--config.data.rotate_degrees=7")
    with pytest.raises(KeyboardInterrupt):
        finetune.train_and_evaluate(config, tmp_path / "w")
    (transform,) = seen
    assert (transform.recipe, transform.size) == ("transunet", (32, 32))
    assert transform.options == {"image_order": 3, "rotate_degrees": 7}
    # The transform really rotates within +-7 degrees and resizes with cubic splines: with a rng whose first
    # draws pick the rotation branch, the output is the scipy rotation then order-3 zoom of the example.
    from scipy import ndimage

    image = np.linspace(0.0, 1.0, 40 * 24, dtype=np.float32).reshape(40, 24)
    label = (image > 0.5).astype(np.int32)
    seed = next(s for s in range(100) if (lambda r: r.random() <= 0.5 and r.random() > 0.5)(np.random.default_rng(s)))
    rng = np.random.default_rng(seed)
    rng.random(), rng.random()
    angle = int(rng.integers(-7, 7))
    expected = ndimage.zoom(ndimage.rotate(image, angle, order=0, reshape=False), (32 / 40, 32 / 24), order=3)
    out = transform({"image": image, "label": label}, np.random.default_rng(seed))
    np.testing.assert_allclose(out["image"][..., 0], expected, atol=1e-5)
