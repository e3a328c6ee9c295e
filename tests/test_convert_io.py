"""state_dict files (.pth, .safetensors, .npz) and the ``rwkvunet convert`` command end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from rwkvunet_jax.cli import main as cli_main  # noqa: E402
from rwkvunet_jax.convert import export_torch_state_dict, read_state_dict, write_state_dict  # noqa: E402
from rwkvunet_jax.torch_reference import build_torch_model  # noqa: E402
from test_convert_fixtures import TINY, params_and_stats, random_jax_model  # noqa: E402


def _sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "b.weight": rng.standard_normal((4, 3, 1, 1)).astype(np.float32),
        "a.bias": rng.standard_normal(4).astype(np.float32),
        "a.norm.num_batches_tracked": np.array(5, np.int64),
        "c.spatial_mix_k": rng.standard_normal((1, 1, 6)).astype(np.float32),
    }


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors", ".npz"])
def test_file_round_trip_keeps_values_dtypes_and_order(tmp_path, suffix):
    sample = _sample()
    path = write_state_dict(sample, tmp_path / f"weights{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [f"weights{suffix}"]  # no temporary left behind
    back = read_state_dict(path)
    assert list(back) == list(sample)
    for key, value in sample.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


def test_pth_is_a_plain_torch_state_dict_and_wrappers_unwrap(tmp_path):
    path = write_state_dict(_sample(), tmp_path / "w.pth")
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw["b.weight"], torch.Tensor) and raw["a.norm.num_batches_tracked"].dtype == torch.int64
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in raw.items()}}, wrapped)
    assert list(read_state_dict(wrapped)) == list(raw)
    bf16 = tmp_path / "half.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2, dtype=torch.bfloat16)}, str(bf16))
    assert read_state_dict(bf16)["x"].dtype == np.float32


def test_file_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_state_dict(tmp_path / "missing.pth")
    for name, content in (("broken.pth", b"not a zip"), ("broken.safetensors", b"\x00\x01"),
                          ("broken.npz", b"garbage")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            read_state_dict(tmp_path / name)
    with pytest.raises(ValueError, match=r"unknown file type '\.h5'"):
        read_state_dict(tmp_path / "w.h5")
    with pytest.raises(ValueError, match=r"unknown file type"):
        write_state_dict(_sample(), tmp_path / "w.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_state_dict(_sample(), tmp_path / "nowhere" / "w.pth")
    # What people pass by mistake: say what the file is and what is expected, not torch's advice.
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.pth").write_bytes((tmp_path / "array.npy").read_bytes())
    (tmp_path / "notes.pth").write_text("hello")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    for name, message in (("array.pth", "is not a PyTorch checkpoint: it holds a NumPy .npy array"),
                          ("notes.pth", "is not a PyTorch checkpoint: it holds text"),
                          ("module.pth", "holds a pickled torch.nn.modules.linear.Linear object, not a state_dict")):
        with pytest.raises(ValueError, match="expected|state_dict") as info:
            read_state_dict(tmp_path / name)
        assert message in str(info.value) and "file an issue" not in str(info.value).lower()
        assert len(str(info.value).splitlines()) == 1
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(ValueError, match="empty.pth.*no tensors"):
        read_state_dict(empty)


def test_convert_command_both_ways_and_encoder_only(tmp_path, capsys):
    from rwkvunet_jax.checkpoint import load_model, save_model

    model = random_jax_model("rwkv_unet_t", num_classes=3, in_chans=1, seed=21, **TINY)
    ckpt = save_model(tmp_path / "ckpt", model)
    overrides = ["--override", "depths=1,1,2,2", "--override", "widths=8,16,16,24"]

    # Orbax -> PyTorch: exactly the export, and the PyTorch twin takes it strictly.
    out = tmp_path / "model.safetensors"
    assert cli_main(["convert", "--from", str(ckpt), "--to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "filled" in printed and "num_batches_tracked" in printed
    written = read_state_dict(out)
    expected = export_torch_state_dict(model)
    assert list(written) == list(expected)
    assert all(np.array_equal(written[k], expected[k]) for k in expected)
    build_torch_model("rwkv_unet_t", num_classes=3, in_chans=1, **TINY).load_state_dict(
        {k: torch.from_numpy(v) for k, v in written.items()}, strict=True)

    # PyTorch -> Orbax: classes inferred from final_conv, bit-identical weights.
    pth = write_state_dict(written, tmp_path / "model.pth")
    back_dir = tmp_path / "back"
    assert cli_main(["convert", "--from", str(pth), "--to", str(back_dir), "--model", "rwkv_unet_t",
                     "--in-chans", "1", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "wrote checkpoint" in printed and "skipped" in printed and "num_classes=3" in printed
    back = load_model(back_dir)
    a, b = params_and_stats(model), params_and_stats(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)

    # An encoder file into the encoder of a new segmentation model.
    encoder = random_jax_model("rwkv_unet_encoder_t", num_classes=10, in_chans=3, seed=22, **TINY)
    enc_file = write_state_dict(export_torch_state_dict(encoder), tmp_path / "net_T.pth")
    seg_dir = tmp_path / "seg"
    assert cli_main(["convert", "--from", str(enc_file), "--to", str(seg_dir), "--model", "rwkv_unet_t",
                     "--num-classes", "2", "--encoder-only", *overrides]) == 0
    assert "into the encoder" in capsys.readouterr().out
    seg = load_model(seg_dir)
    enc, ref = params_and_stats(seg.encoder), params_and_stats(encoder)
    assert all(np.array_equal(enc[p], ref[p]) for p in enc)

    # Clear one-line failures (exit status 2): an existing target, a missing --model, a wrong architecture.
    def fails(argv, message):
        assert cli_main(["convert", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err

    fails(["--from", str(pth), "--to", str(back_dir), "--model", "rwkv_unet_t"], "already exists")
    fails(["--from", str(pth), "--to", str(tmp_path / "x")], "--model is required")
    fails(["--from", str(pth), "--to", str(tmp_path / "y"), "--model", "rwkv_unet_t", "--in-chans", "1",
           "--override", "depths=1,1,2,2", "--override", "widths=8,16,16,32"], "shape mismatch")
    fails(["--from", str(tmp_path / "nope"), "--to", str(tmp_path / "z.pth")], "does not exist")

    # Orbax -> an existing file is refused like the other direction, and replaced with --overwrite.
    out.write_bytes(b"keep me")
    fails(["--from", str(ckpt), "--to", str(out)], f"{out} already exists; pass --overwrite")
    assert out.read_bytes() == b"keep me"
    assert cli_main(["convert", "--from", str(ckpt), "--to", str(out), "--overwrite"]) == 0
    assert list(read_state_dict(out)) == list(expected)
    assert not Path(tmp_path / "y").exists()
