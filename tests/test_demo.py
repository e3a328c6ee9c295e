"""A shortened ``rwkvunet demo`` (what CI can afford): every artefact is produced; the Dice is not checked.

The end-to-end run uses a tiny model (the config overrides every user has); that the demo's default model is the
real RWKV-UNet-T is checked on the parsed config, without compiling it.
"""

import json

import numpy as np
import pytest

from rwkvunet_jax import checkpoint as ckpt
from rwkvunet_jax.cli import main as cli_main
from rwkvunet_jax.commands import demo


TINY_MODEL = ["--config.model.depths=(1,1,2,2)", "--config.model.widths=(8,16,16,32)"]


def test_short_demo_produces_every_artefact(tmp_path, capsys):
    workdir = tmp_path / "demo"
    code = demo.main(["--workdir", str(workdir), "--steps", "2", "--num-train", "8", "--num-val", "2",
                      "--num-test", "2", "--image-size", "32", "--batch-size", "2", "--no-progress", *TINY_MODEL])
    assert code == 0
    out = capsys.readouterr().out

    metrics = json.loads((workdir / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_dice"] <= 1.0 and metrics["split"] == "test"
    assert set(metrics["per_class"]) == {"liver", "kidney", "spleen", "vessel"}  # foreground classes only
    assert len(metrics["cases"]) == 2
    assert (workdir / "progress.png").stat().st_size > 0
    assert len(list((workdir / "eval_test" / "overlays").glob("*.png"))) == 2
    assert (workdir / "data" / "phantom.json").is_file()
    assert list((workdir / "tensorboard").glob("events.*"))
    model = ckpt.load_model(workdir)
    assert model.spec.name == "rwkv_unet_t" and model.spec.depths == (1, 1, 2, 2)  # the overrides reached the model
    assert str(workdir / "metrics.json") in out and "mean Dice" in out

    # Rerunning into the finished run with other settings is refused before anything is touched.
    data_meta = (workdir / "data" / "phantom.json").stat().st_mtime_ns
    config_json = (workdir / "config.json").read_text()
    assert cli_main(["demo", "--workdir", str(workdir), "--steps", "3", "--num-train", "6", "--num-val", "2",
                     "--num-test", "2", "--image-size", "32", "--batch-size", "2", "--no-progress", *TINY_MODEL]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "total_steps 2 -> 3" in err and "phantom.num_train 8 -> 6" in err
    assert "new --workdir" in err and len(err.strip().splitlines()) == 1
    assert (workdir / "data" / "phantom.json").stat().st_mtime_ns == data_meta
    assert (workdir / "config.json").read_text() == config_json

    torch = pytest.importorskip("torch")
    exported = torch.load(workdir / "export" / "rwkv_unet_t.pth", map_location="cpu", weights_only=True)
    weight = exported["final_conv.weight"].numpy()  # torch layout (out, in, kh, kw)
    np.testing.assert_array_equal(weight, np.transpose(np.asarray(model.final_conv.kernel[...]), (3, 2, 0, 1)))


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert cli_main(["demo", "--workdir", str(tmp_path / "d"), "--image-size", "40"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert cli_main(["demo", "--workdir", str(tmp_path / "d"), "--config", str(tmp_path / "none.py")]) == 2
    assert "none.py" in capsys.readouterr().err


def test_demo_takes_config_overrides():
    from rwkvunet_jax.commands.parsing import parse_config_command

    # Without overrides the demo fine-tunes the real RWKV-UNet-T.
    default, args = parse_config_command(demo.build_parser(), ["--workdir", "x"], example=demo.DEFAULT_CONFIG)
    default = demo.apply_demo_settings(default, args)
    from flax import nnx

    from rwkvunet_jax.train.finetune import build_model

    spec = nnx.eval_shape(lambda: build_model(default)).spec  # abstract: no weights drawn, nothing compiled
    assert spec.name == "rwkv_unet_t" and spec.depths == (2, 2, 4, 2)

    config, args = parse_config_command(demo.build_parser(), ["--workdir", "x", "--steps", "8",
                                                              "--config.model.wkv_impl=chunked"],
                                        example=demo.DEFAULT_CONFIG)
    config = demo.apply_demo_settings(config, args)
    assert config.model.wkv_impl == "chunked" and config.total_steps == 8
    from rwkvunet_jax.commands.parsing import CommandError

    with pytest.raises(CommandError, match="unrecognized arguments: --no-such-flag"):
        demo.main(["--workdir", "x", "--no-such-flag"])
