"""JAX <-> official PyTorch state_dict: layout of all six models, exactness, parity, load rules.

The independent sides are the official state_dict listings (``shared/reference``, or their digests
where that folder is absent) and the forward pass of the PyTorch twin (``rwkvunet_jax.torch_reference``).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from rwkvunet_jax.convert import (  # noqa: E402
    export_torch_state_dict,
    load_torch_encoder,
    load_torch_state_dict,
    official_layout,
)
from rwkvunet_jax.models.registry import make_spec  # noqa: E402
from rwkvunet_jax.torch_reference import build_torch_model  # noqa: E402
from test_convert_fixtures import (  # noqa: E402
    REAL,
    TINY,
    check_against_reference,
    layout_lines,
    params_and_stats,
    random_jax_model,
    randomize_torch_model,
)


def _torch_logits(module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        y = module(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2))
    return (y.permute(0, 2, 3, 1) if y.ndim == 4 else y).numpy()


@pytest.mark.parametrize("name,num_classes,in_chans,filename,entries,digest", REAL, ids=[r[0] for r in REAL])
def test_real_models_export_official_layout_and_round_trip(name, num_classes, in_chans, filename, entries, digest):
    model = random_jax_model(name, num_classes=num_classes, in_chans=in_chans, seed=1)
    exported = export_torch_state_dict(model)
    check_against_reference(layout_lines(exported), filename, entries, digest)
    spec = make_spec(name, num_classes=num_classes, in_chans=in_chans)
    assert [e.name for e in official_layout(spec)] == list(exported)
    # The PyTorch twin (official layout) accepts it strictly ...
    module = build_torch_model(name, num_classes=num_classes, in_chans=in_chans)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    # ... and its state_dict comes back bit-identical into another JAX model.
    other = random_jax_model(name, num_classes=num_classes, in_chans=in_chans, seed=2)
    report = load_torch_state_dict(other, module.state_dict(), strict=True)
    assert not report.missing and not report.unexpected
    a, b = params_and_stats(model), params_and_stats(other)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype and np.array_equal(a[path], b[path]), path
    # Dead tensors keep the official initial values.
    assert np.all(exported[f"{'encoder.' if 'encoder' not in name else ''}stage1.0.ln2.weight"] == 1.0)
    assert np.all(exported[f"{'encoder.' if 'encoder' not in name else ''}stage1.0.att.spatial_mix_k"] == 0.5)


# ------------------------------------------------------------------------------------------ parity

SLOW = pytest.mark.slow  # the other sizes share every layer type with T and encoder-B
PARITY = [
    pytest.param("rwkv_unet_t", 3, 3, id="rwkv_unet_t"),
    pytest.param("rwkv_unet_s", 2, 1, id="rwkv_unet_s", marks=SLOW),
    pytest.param("rwkv_unet_b", 4, 1, id="rwkv_unet_b", marks=SLOW),
    pytest.param("rwkv_unet_encoder_t", 5, 3, id="rwkv_unet_encoder_t", marks=SLOW),
    pytest.param("rwkv_unet_encoder_s", 3, 3, id="rwkv_unet_encoder_s", marks=SLOW),
    pytest.param("rwkv_unet_encoder_b", 7, 1, id="rwkv_unet_encoder_b"),
]
SHAPES = [(96, 64)]  # non-square: catches a swapped H/W as well as a wrong layer
TOL = 1e-4


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda model, x: model(x))


@pytest.mark.parametrize("name,num_classes,in_chans", PARITY)
def test_parity_both_directions_tiny(forward, name, num_classes, in_chans):
    model = random_jax_model(name, num_classes=num_classes, in_chans=in_chans, seed=3, **TINY)
    module = build_torch_model(name, num_classes=num_classes, in_chans=in_chans, **TINY)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in export_torch_state_dict(model).items()}, strict=True)
    module.eval()
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((2, h, w, in_chans)).astype(np.float32) for h, w in SHAPES]
    for x in inputs:  # JAX -> PyTorch
        expected = np.asarray(forward(model, jnp.asarray(x)))
        assert np.abs(expected).max() > 0.1  # not a degenerate all-zero output
        np.testing.assert_allclose(_torch_logits(module, x), expected, rtol=0, atol=TOL)
    # PyTorch -> JAX: fresh random torch weights (BN statistics included) into the same JAX model.
    randomize_torch_model(module, seed=4)
    load_torch_state_dict(model, module.state_dict(), strict=True)
    for x in inputs:
        np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(x))), _torch_logits(module, x),
                                   rtol=0, atol=TOL)


@pytest.mark.slow  # full-size T (the tiny parity tests above cover every layer type)
def test_parity_full_size_t(forward):
    model = random_jax_model("rwkv_unet_t", num_classes=2, in_chans=3, seed=5)
    module = build_torch_model("rwkv_unet_t", num_classes=2, in_chans=3).eval()
    load = {k: torch.from_numpy(v) for k, v in export_torch_state_dict(model).items()}
    module.load_state_dict(load, strict=True)
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(_torch_logits(module, x), np.asarray(forward(model, jnp.asarray(x))),
                               rtol=0, atol=TOL)


def test_parity_paper_variant(forward):
    paper = random_jax_model("rwkv_unet_s", num_classes=2, in_chans=1, seed=6, wkv_variant="paper", **TINY)
    module = build_torch_model("rwkv_unet_s", num_classes=2, in_chans=1, wkv_variant="paper", **TINY).eval()
    module.load_state_dict({k: torch.from_numpy(v) for k, v in export_torch_state_dict(paper).items()})
    x = np.random.default_rng(2).standard_normal((2, 64, 64, 1)).astype(np.float32)
    expected = np.asarray(forward(paper, jnp.asarray(x)))
    np.testing.assert_allclose(_torch_logits(module, x), expected, rtol=0, atol=TOL)
    # The variants differ at these decays, so the comparison above can tell them apart.
    official = build_torch_model("rwkv_unet_s", num_classes=2, in_chans=1, **TINY).eval()
    official.load_state_dict(module.state_dict())
    assert np.abs(_torch_logits(official, x) - expected).max() > 5 * TOL


# ------------------------------------------------------------------------------------- load rules


@pytest.fixture(scope="module")
def tiny_seg():
    return random_jax_model("rwkv_unet_t", num_classes=3, in_chans=1, seed=7, **TINY)


@pytest.fixture(scope="module")
def tiny_seg_sd(tiny_seg):
    return export_torch_state_dict(tiny_seg)


def _fresh_tiny_seg(seed=8):
    return random_jax_model("rwkv_unet_t", num_classes=3, in_chans=1, seed=seed, **TINY)


def _assert_same(a, b):
    fa, fb = params_and_stats(a), params_and_stats(b)
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(fa[p], fb[p]) for p in fa)


def test_strict_rejects_missing_and_unexpected_and_changes_nothing(tiny_seg_sd):
    model, before = _fresh_tiny_seg(), _fresh_tiny_seg()
    partial = {k: v for k, v in tiny_seg_sd.items() if k != "ccm.channel.key.weight"}
    with pytest.raises(ValueError, match=r"1 missing tensors \['ccm.channel.key.weight'\]"):
        load_torch_state_dict(model, partial)
    extra = dict(tiny_seg_sd, **{"decoder9.conv.weight": np.zeros((2, 2, 1, 1), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensors \['decoder9.conv.weight'\]"):
        load_torch_state_dict(model, extra)
    _assert_same(model, before)


def test_non_strict_reports_logs_and_keeps_missing(tiny_seg, tiny_seg_sd, caplog):
    model = _fresh_tiny_seg()
    kept = np.asarray(model.ccm.channel.key.kernel[...]).copy()
    partial = {k: v for k, v in tiny_seg_sd.items() if k != "ccm.channel.key.weight"}
    partial["extra.weight"] = np.zeros(3, np.float32)
    with caplog.at_level(logging.WARNING):
        report = load_torch_state_dict(model, partial, strict=False)
    assert report.missing == ["ccm.channel.key.weight"] and report.unexpected == ["extra.weight"]
    assert "ccm.channel.key.weight" in caplog.text and "extra.weight" in caplog.text
    np.testing.assert_array_equal(np.asarray(model.ccm.channel.key.kernel[...]), kept)
    np.testing.assert_array_equal(np.asarray(model.final_conv.kernel[...]), np.asarray(tiny_seg.final_conv.kernel[...]))


def test_dead_tensors_are_optional_and_skipped_by_name(tiny_seg, tiny_seg_sd):
    live = {e.name for e in official_layout(tiny_seg.spec) if e.used}
    model = _fresh_tiny_seg()
    report = load_torch_state_dict(model, {k: v for k, v in tiny_seg_sd.items() if k in live})
    assert not report.skipped and sorted(report.loaded) == sorted(live)
    _assert_same(model, tiny_seg)
    report = load_torch_state_dict(_fresh_tiny_seg(), tiny_seg_sd)
    assert "encoder.stage1.0.ln2.weight" in report.skipped and "encoder.head.weight" in report.skipped
    assert "decoder1.conv.norm.num_batches_tracked" in report.skipped


@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch_is_always_an_error(tiny_seg_sd, strict):
    model, before = _fresh_tiny_seg(), _fresh_tiny_seg()
    bad = dict(tiny_seg_sd)
    bad["decoder2.proj.conv.weight"] = np.zeros((5, 32, 1, 1), np.float32)
    with pytest.raises(ValueError) as err:
        load_torch_state_dict(model, bad, strict=strict)
    message = str(err.value)
    assert "decoder2.proj.conv.weight" in message and "(5, 32, 1, 1)" in message
    assert str(tiny_seg_sd["decoder2.proj.conv.weight"].shape) in message
    _assert_same(model, before)


def test_prefixes_wrappers_and_torch_tensors(tiny_seg, tiny_seg_sd):
    module_prefixed = {f"module.{k}": torch.from_numpy(v) for k, v in tiny_seg_sd.items()}
    for wrapped in (
        {"state_dict": module_prefixed, "epoch": 3},
        {"model": {"module": {f"module.{k}": v for k, v in tiny_seg_sd.items()}}, "optimizer": {}},
        module_prefixed,
    ):
        model = _fresh_tiny_seg()
        load_torch_state_dict(model, wrapped)
        _assert_same(model, tiny_seg)
    with pytest.raises(ValueError, match="no tensors found"):
        load_torch_state_dict(_fresh_tiny_seg(), {"epoch": 3, "optimizer": {"lr": 1.0}})


def test_bfloat16_tensors_load_as_float32(tiny_seg_sd):
    model = _fresh_tiny_seg()
    half = {k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32 else torch.from_numpy(v)
            for k, v in tiny_seg_sd.items()}
    load_torch_state_dict(model, half)
    got = np.asarray(model.final_conv.kernel[...])
    assert got.dtype == np.float32
    want = half["final_conv.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(got, want)


def test_encoder_file_into_segmentation_model():
    classifier = random_jax_model("rwkv_unet_encoder_t", num_classes=11, in_chans=3, seed=9, **TINY)
    encoder_sd = export_torch_state_dict(classifier)
    seg = random_jax_model("rwkv_unet_t", num_classes=3, in_chans=3, seed=10, **TINY)
    untouched = np.asarray(seg.ccm.channel.value.kernel[...]).copy()
    report = load_torch_encoder(seg, {"state_dict": {f"module.{k}": v for k, v in encoder_sd.items()}})
    assert {"norm.norm.weight", "head.weight", "head.bias", "stage1.0.ln2.weight"} <= set(report.skipped)
    enc, cls = params_and_stats(seg.encoder), params_and_stats(classifier)
    stage_paths = [p for p in cls if str(p[0]).startswith("stage")]
    assert stage_paths and set(stage_paths) == set(enc)
    assert all(np.array_equal(enc[p], cls[p]) for p in stage_paths)
    np.testing.assert_array_equal(np.asarray(seg.ccm.channel.value.kernel[...]), untouched)

    # The official way: load_state_dict(strict=False) reads the stage* keys as encoder.*.
    other = random_jax_model("rwkv_unet_t", num_classes=3, in_chans=3, seed=11, **TINY)
    report = load_torch_state_dict(other, encoder_sd, strict=False)
    assert not report.unexpected and report.missing and all(not k.startswith("encoder.") for k in report.missing)
    _assert_same(other.encoder, seg.encoder)

    # A full segmentation state_dict gives its encoder; a missing stage tensor is an error.
    third = random_jax_model("rwkv_unet_t", num_classes=3, in_chans=3, seed=12, **TINY)
    report = load_torch_encoder(third, export_torch_state_dict(seg))
    assert "final_conv.weight" in report.skipped
    _assert_same(third.encoder, seg.encoder)
    with pytest.raises(ValueError, match="stage2.0.conv.conv.weight"):
        load_torch_encoder(third, {k: v for k, v in encoder_sd.items() if k != "stage2.0.conv.conv.weight"})
    with pytest.raises(ValueError, match=r"shape mismatch for tensor .stage0\.0\..*\(3,.*\(4,"):
        load_torch_encoder(random_jax_model("rwkv_unet_t", num_classes=3, in_chans=4, **TINY), encoder_sd)


def test_export_needs_a_registry_model():
    class Bare(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3))

    with pytest.raises(ValueError, match="no model spec"):
        export_torch_state_dict(Bare())
    assert jax.tree.leaves(nnx.state(Bare()))  # the module itself is fine
