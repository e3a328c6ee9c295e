"""Tests of rwkvunet_jax.wkv.bi_wkv against an independent float64 numpy evaluation of the definitions.

The reference below is written from the formulas (fact sheet 2.2: the official kernel's table, and the
Vision-RWKV paper formula), one query row at a time, without looking at wkv.py's formulation. ``naive`` is
checked against it, ``scan`` against ``naive`` and the reference. The Pallas dispatch is checked with a
stand-in module; the kernel itself is compared with ``naive`` in test_kernel.py.
"""

from __future__ import annotations

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkvunet_jax import wkv
from rwkvunet_jax.wkv import bi_wkv, resolve_impl

VARIANTS = ("official", "paper")


# ----------------------------------------------------------------------------------- float64 numpy reference


def reference_row(w, u, k, v, t, variant):
    """y_t (B, C) in float64 straight from the table / paper formula (all inputs numpy float64)."""
    num_tokens = k.shape[1]
    m = np.arange(num_tokens)[:, None]  # key positions, broadcast over channels
    ek = np.exp(k)  # (B, T, C)
    if variant == "paper":
        f = np.where(m == t, np.exp(u), np.exp(-(np.abs(t - m) - 1) * w))
        weights = ek * f
        return (weights * v).sum(1) / weights.sum(1)
    n = -(-num_tokens // 32)
    s = n * (t // n)
    cases = [
        (m < s, np.exp(-w * (t - m))),
        ((m == s) & (m < t), np.exp(-w * (t - m - 1))),
        ((s < m) & (m < t), np.exp(-w * (t - m - 1)) + (1 - np.exp(w)) * np.exp(w * (t - m))),
        (m == t, np.exp(u) + (t > s) * (1 - np.exp(w))),
        (m > t, np.exp(-w * (m - t))),
    ]
    f = np.select([np.broadcast_to(c, (num_tokens, w.size)) for c, _ in cases], [val for _, val in cases])
    weights = ek * f
    # o_t: the CUDA kernel's running maximum when it writes y_t (fact sheet 2.2), term by term:
    # o_t = max(o1_t, o2_t, u + k_t),
    # o2_t = max(max_{m<s} k_m - w(t-m), max_{s<=m<t} k_m - w(t-1-m)),
    # o1_t = max(max_{m>=s} k_m - w(m-s) + w(t-s), max_{s<m<=t} k_m + w(t-m+1)).
    sets = [
        (m < s, k - w * (t - m)),
        ((s <= m) & (m < t), k - w * (t - 1 - m)),
        (m >= s, k - w * (m - s) + w * (t - s)),
        ((s < m) & (m <= t), k + w * (t - m + 1)),
        (m == t, u + k),
    ]
    o = np.max([np.where(mask, e, -np.inf).max(axis=1) for mask, e in sets], axis=0)
    return (weights * v).sum(1) / (weights.sum(1) + 1e-6 * np.exp(o))


def reference(w, u, k, v, variant, rows=None):
    w, u, k, v = (np.asarray(x, np.float64) for x in (w, u, k, v))
    rows = range(k.shape[1]) if rows is None else rows
    return np.stack([reference_row(w, u, k, v, t, variant) for t in rows], axis=1)


def make_inputs(seed, batch, tokens, channels, *, w_range=(-0.3, 0.5), k_scale=2.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.uniform(*w_range, size=channels).astype(np.float32)
    u = rng.normal(size=channels).astype(np.float32)
    k = (k_scale * rng.normal(size=(batch, tokens, channels))).astype(dtype)
    v = rng.normal(size=(batch, tokens, channels)).astype(dtype)
    return w, u, k, v


def close(actual, expected, rtol, atol_frac):
    """Elementwise |a - e| <= rtol |e| + atol_frac * max(max|e|, 1) (every quantity here is of order 1)."""
    expected = np.asarray(expected, np.float64)
    atol = atol_frac * max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------- naive vs reference


@pytest.mark.parametrize("variant", VARIANTS)
def test_naive_matches_float64_reference(variant):
    # T = 33 and 65: partial last chunk (n = 2, 3) and empty chunks; 40: n = 2 filled evenly.
    for seed, tokens in enumerate((1, 7, 33, 40, 65)):
        w, u, k, v = make_inputs(seed, 2, tokens, 5)
        y = bi_wkv(w, u, k, v, impl="naive", variant=variant)
        assert y.shape == (2, tokens, 5) and y.dtype == jnp.float32
        close(y, reference(w, u, k, v, variant), rtol=2e-5, atol_frac=2e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("impl", ["naive", "scan"])
def test_float64_is_exact(impl, variant):
    # In float64 the definitions must agree to rounding, even with large decays (ill-conditioned in float32),
    # and the EPS * e^{o_t} term (1e-6 relative, below float32 test tolerances) is checked too.
    with jax.enable_x64(True):
        for seed, tokens in ((1, 33), (2, 65)):
            _, _, k, v = (x.astype(np.float64) for x in make_inputs(seed, 2, tokens, 3))
            # Large decays of both signs; w > 0 with u < 0 lets e^{k_t} (t > s) be the largest term of o_t
            # (it is, 8 and 16 times, for these seeds).
            w, u = np.array([0.8, -0.6, 0.3]), np.array([-1.5, 0.0, 0.7])
            y = bi_wkv(w, u, k, v, impl=impl, variant=variant)
            assert y.dtype == jnp.float64
            close(y, reference(w, u, k, v, variant), rtol=1e-10, atol_frac=1e-12)


@pytest.mark.parametrize("impl", ["naive", "scan"])
def test_official_eps_scale_single_token(impl):
    # T = 1: the kernel's running maximum is max(k, u + k), so y = v / (1 + EPS e^{-u}) for u < 0
    # (a 2% shrink at u = -10), and y = v / (1 + EPS) for u >= 0.
    u = np.array([-4.73, -10.0, -20.0, 0.5], np.float32)
    w = np.array([0.3, -0.2, 1.5, 0.0], np.float32)
    k = np.array([[[3.0, -2.0, 0.5, 1.0]]], np.float32)
    v = np.array([[[1.0, -2.0, 0.5, 3.0]]], np.float32)
    expected = v / (1.0 + 1e-6 * np.exp(-np.minimum(u, 0.0)))
    y = bi_wkv(w, u, k, v, impl=impl, variant="official")
    np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-6)


@pytest.mark.parametrize("impl", ["naive", "scan"])
@pytest.mark.parametrize("tokens", [1, 2, 31, 32, 33])
def test_official_eps_scale_with_negative_bonus(impl, tokens):
    # u << 0 and large decays make the diagonal and a few neighbours the whole denominator while o_t also
    # counts tokens the kernel has subtracted already (chunk starts; every token for T <= 32), so the EPS term
    # is far from 1e-6 relative. float64, so that only the formula can differ.
    rng = np.random.default_rng(tokens)
    channels = 6
    w = np.array([0.0, 2.0, 5.0, -0.5, 0.3, 8.0])
    u = np.array([-4.73, -10.0, -15.0, -8.0, -20.0, -12.0])
    k = rng.normal(size=(2, tokens, channels))
    v = rng.normal(size=(2, tokens, channels))
    expected = reference(w, u, k, v, "official")
    with jax.enable_x64(True):
        y = bi_wkv(w, u, k, v, impl=impl, variant="official")
    close(y, expected, rtol=1e-10, atol_frac=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_naive_blocking_over_channels_and_rows(variant):
    # A tiny block budget forces channel groups with padding (C = 7 in groups of 2), and with a smaller one
    # query-row blocks with padding (T = 37 in blocks of 3 rows, one channel at a time).
    w, u, k, v = make_inputs(3, 2, 37, 7)
    expected = reference(w, u, k, v, variant)
    for budget in (2 * 37 * 37 * 2, 2 * 37 * 3):
        y = wkv.bi_wkv_dense(*map(jnp.asarray, (w, u, k, v)), variant=variant, block_elements=budget)
        close(y, expected, rtol=2e-5, atol_frac=2e-6)
    with pytest.raises(ValueError, match="block_elements must be positive"):
        wkv.bi_wkv_dense(*map(jnp.asarray, (w, u, k, v)), variant=variant, block_elements=0)


# ------------------------------------------------------------------------------- scan vs naive and reference


def value_and_grads(impl, variant, w, u, k, v, projection):
    def loss(w, u, k, v):
        y = bi_wkv(w, u, k, v, impl=impl, variant=variant)
        return jnp.sum(y.astype(jnp.float32) * projection), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(w, u, k, v)
    return y, grads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", [1, 7, 33, 257])
def test_scan_matches_naive_values_and_grads(variant, tokens):
    w, u, k, v = make_inputs(10 + tokens, 2, tokens, 5)
    if tokens > 64:
        w = w * 8 / tokens  # the models' regime: w = spatial_decay / T
    projection = np.random.default_rng(tokens).normal(size=k.shape).astype(np.float32)
    y_scan, g_scan = value_and_grads("scan", variant, w, u, k, v, projection)
    y_naive, g_naive = value_and_grads("naive", variant, w, u, k, v, projection)
    close(y_scan, y_naive, rtol=2e-5, atol_frac=2e-6)
    close(y_scan, reference(w, u, k, v, variant), rtol=2e-5, atol_frac=2e-6)
    for name, a, b, x in zip("wukv", g_scan, g_naive, (w, u, k, v)):
        assert a.shape == x.shape and a.dtype == jnp.float32, name
        close(a, b, rtol=1e-4, atol_frac=1e-5)


def check_long_sequence_rows(impl: str, variant: str) -> None:
    """``bi_wkv(impl=...)`` at T = 4500 against float64 rows of the reference (float32 and float64 inputs).

    n = 141, so the 32nd official chunk is partial; rows at both ends and around chunk boundaries (and the
    chunked form's 29-row tile boundaries). float32: accuracy without drift over many tokens; float64: the
    exact linear-time form, EPS included. Channel 0 decays fast (w = 0.2): only a few neighbours count.
    """
    tokens = 4500
    w, u, k, v = make_inputs(4, 1, tokens, 3)
    w = w * 4 / tokens
    w[0] = 0.2
    rows = [0, 1, 28, 29, 140, 141, 142, 2000, 4370, 4371, 4372, 4498, 4499]
    expected = reference(w, u, k, v, variant, rows)
    y = bi_wkv(w, u, k, v, impl=impl, variant=variant)
    close(np.asarray(y)[:, rows], expected, rtol=2e-5, atol_frac=2e-6)
    with jax.enable_x64(True):
        y = bi_wkv(*(x.astype(np.float64) for x in (w, u, k, v)), impl=impl, variant=variant)
        close(np.asarray(y)[:, rows], expected, rtol=1e-10, atol_frac=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_scan_long_sequence_against_float64_rows(variant):
    check_long_sequence_rows("scan", variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_scan_large_keys_and_negative_decay(variant):
    # k up to +-80 (e^80 overflows nothing only with running maxima); w < 0 grows past terms by up to
    # e^{0.4 * 64}; both would overflow a plain float32 sum.
    w, u, k, v = make_inputs(5, 2, 65, 4, w_range=(-0.4, -0.05), k_scale=1.0)
    k = np.clip(30 * k, -80, 80).astype(np.float32)
    projection = np.random.default_rng(5).normal(size=k.shape).astype(np.float32)
    y_scan, g_scan = value_and_grads("scan", variant, w, u, k, v, projection)
    y_naive, g_naive = value_and_grads("naive", variant, w, u, k, v, projection)
    expected = reference(w, u, k, v, variant)
    assert np.isfinite(expected).all()
    close(y_scan, expected, rtol=2e-5, atol_frac=2e-6)
    close(y_naive, expected, rtol=2e-5, atol_frac=2e-6)
    for name, a, b in zip("wukv", g_scan, g_naive):
        assert np.isfinite(np.asarray(a)).all(), name
        close(a, b, rtol=1e-4, atol_frac=1e-5)


@pytest.mark.parametrize("impl", ["scan", "naive"])
def test_bfloat16_inputs(impl):
    # bf16 k, v: float32 arithmetic inside, output rounded to bf16 (relative step 2^-8), so the result is
    # within 2^-8 |y| (+ a little) of the float64 value computed on the same bf16-rounded inputs.
    w, u, k, v = make_inputs(6, 2, 33, 5)
    k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    projection = np.random.default_rng(6).normal(size=k.shape).astype(np.float32)
    y, grads = value_and_grads(impl, "official", w, u, k, v, projection)
    assert y.dtype == jnp.bfloat16
    expected = reference(w, u, np.asarray(k, np.float64), np.asarray(v, np.float64), "official")
    close(y, expected, rtol=2.0**-8, atol_frac=1e-3)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16]
    assert [g.shape for g in grads] == [(5,), (5,), k.shape, k.shape]
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


# ------------------------------------------------------------------------------------- dispatch and errors


def test_auto_resolves_to_scan_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("CPU/TPU behaviour")
    assert resolve_impl("auto") == "scan"
    assert resolve_impl("naive") == "naive" and resolve_impl("pallas") == "pallas"


def fake_kernel_module(calls):
    module = types.ModuleType(wkv._PALLAS_MODULE)

    def bi_wkv_pallas(w, u, k, v, *, variant, interpret):
        calls.append((variant, interpret))
        return jnp.zeros(k.shape, jnp.float32)

    module.bi_wkv_pallas = bi_wkv_pallas
    return module


def test_auto_picks_pallas_on_gpu_only_when_kernel_imports(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setitem(sys.modules, wkv._PALLAS_MODULE, None)  # import raises ImportError
    assert resolve_impl("auto") == "scan"
    monkeypatch.setitem(sys.modules, wkv._PALLAS_MODULE, fake_kernel_module([]))
    assert resolve_impl("auto") == "pallas"


def test_pallas_dispatch_passes_variant_and_interpret(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, wkv._PALLAS_MODULE, fake_kernel_module(calls))
    w, u, k, v = make_inputs(7, 1, 4, 3)
    y = bi_wkv(w, u, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), impl="pallas", variant="paper",
               interpret=True)
    assert calls == [("paper", True)] and y.dtype == jnp.bfloat16


def test_pallas_missing_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, wkv._PALLAS_MODULE, None)
    w, u, k, v = make_inputs(7, 1, 4, 3)
    with pytest.raises(ImportError, match="kernels/bi_wkv.py"):
        bi_wkv(w, u, k, v, impl="pallas")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=np.zeros((4, 3), np.float32)), r"\(B, T, C\)"),
        (dict(v=np.zeros((1, 5, 3), np.float32)), "same shape"),
        (dict(w=np.zeros((4,), np.float32)), r"w, u of shape \(C,\) with C = 3"),
        (dict(u=np.zeros((3, 1), np.float32)), r"w, u of shape \(C,\)"),
        (dict(k=np.zeros((1, 0, 3), np.float32), v=np.zeros((1, 0, 3), np.float32)), "T >= 1"),
        (dict(k=np.zeros((1, 4, 3), np.int32)), "k must have a floating dtype"),
        (dict(w=np.zeros((3,), np.int32)), "w must have a floating dtype"),
        (dict(v=np.zeros((1, 4, 3), jnp.bfloat16)), "same dtype"),
        (dict(impl="fast"), "unknown impl 'fast'"),
        (dict(variant="cuda"), "unknown variant 'cuda'"),
        (dict(impl="scan", interpret=True), "only applies to impl='pallas'"),
    ],
)
def test_bad_input_raises_clear_error(change, message):
    args = dict(zip("wukv", make_inputs(9, 1, 4, 3)))
    args.update(change)
    options = {key: args.pop(key) for key in ("impl", "variant", "interpret") if key in args}
    with pytest.raises(ValueError, match=message):
        bi_wkv(args["w"], args["u"], args["k"], args["v"], **options)
