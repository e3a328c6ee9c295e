"""Tests of bi_wkv(impl="chunked") (rwkvunet_jax.kernels.wkv_chunked) against naive and the float64 reference.

The float64 numpy reference of test_wkv.py is written from the formulas, one query row at a time; ``naive`` is
the dense O(T^2) evaluation. Shapes are chosen to exercise the chunked layouts: T <= 32 (one token per official
chunk, tiles of one row), T = 33 / 300 (tiles = official chunks of 2 / 10 tokens, last chunk partial) and
T = 2000 / 4500 (several tiles per official chunk, the last one padded).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_wkv import check_long_sequence_rows, close, make_inputs, reference, value_and_grads

from rwkvunet_jax.kernels import wkv_chunked
from rwkvunet_jax.wkv import bi_wkv

VARIANTS = ("official", "paper")


def check_against_naive(variant, w, u, k, v, seed, rtol=2e-5, grad_rtol=1e-4, float64_reference=True):
    """Values against the float64 reference (or, where its plain exponentials overflow, naive's log-domain
    evaluation) and gradients against naive's."""
    projection = np.random.default_rng(seed).normal(size=k.shape).astype(np.float32)
    y, grads = value_and_grads("chunked", variant, w, u, k, v, projection)
    y_naive, g_naive = value_and_grads("naive", variant, w, u, k, v, projection)
    expected = reference(w, u, k, v, variant) if float64_reference else y_naive
    assert np.isfinite(np.asarray(y)).all()
    close(y, expected, rtol=rtol, atol_frac=rtol / 10)
    for name, a, b, x in zip("wukv", grads, g_naive, (w, u, k, v)):
        assert a.shape == x.shape and a.dtype == jnp.float32, name
        assert np.isfinite(np.asarray(a)).all(), name
        close(a, b, rtol=grad_rtol, atol_frac=grad_rtol / 10)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tokens", [33, *(pytest.param(t, marks=pytest.mark.slow) for t in (1, 2, 31, 32, 300, 784))])
def test_values_and_grads_match_naive(variant, tokens):
    w, u, k, v = make_inputs(20 + tokens, 2, tokens, 5)
    if tokens > 64:
        w = w * 8 / tokens  # the models' regime: w = spatial_decay / T
    check_against_naive(variant, w, u, k, v, tokens)


@pytest.mark.parametrize("variant", ["official", pytest.param("paper", marks=pytest.mark.slow)])
def test_large_keys_and_decays_of_both_signs(variant):
    # T = 200: official chunks (and tiles) of L = 7 tokens. First |k| up to 60: a tile's keys span up to 120 in
    # exponent, more than float32 holds, so the call takes the exact row-by-row fallback; then keys of order 1
    # with per-token decays of both signs up to |w| (L - 1) = 33 (|w| L = 38.5): the fast path near its limit.
    # Either way no inf/NaN and naive's values (the float64 reference's plain e^{w T} overflows at these decays).
    w, u, k, v = make_inputs(5, 2, 200, 6, k_scale=1.0)
    big_k = np.clip(30 * k, -60, 60).astype(np.float32)
    w = np.array([-6.5, -2.0, -0.05, 0.01, 0.3, 6.5], np.float32)
    check_against_naive(variant, w, u, big_k, v, 5, rtol=1e-4, grad_rtol=2e-3, float64_reference=False)
    w = np.array([-5.5, -2.0, -0.05, 0.01, 0.3, 5.5], np.float32)
    check_against_naive(variant, w, u, k, v, 6, rtol=1e-4, grad_rtol=2e-3, float64_reference=False)
    # Moderate decays, where the float64 reference holds, with |k| up to 60.
    w = np.array([-0.3, -0.1, -0.05, 0.01, 0.3, 0.5], np.float32)
    check_against_naive(variant, w, u, big_k, v, 7, rtol=1e-4, grad_rtol=2e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_fallback_keeps_float32_precision(variant):
    # T = 784: official chunks and tiles of 25 rows; keys with |k| up to ~60 span more exponent range than the
    # fast path takes, so the rows run through the exact fallback. Its running sums used to add -w to their
    # exponent at every row, rounding at the exponent's magnitude (~50) each time: y missed float64 by 3-4 times
    # this tolerance (the fast form and the scan form by 0.2-0.3 times).
    w, u, k, v = make_inputs(5492, 2, 784, 6, w_range=(-0.02, 0.02), k_scale=15.0)
    _, in_range = wkv_chunked._tiled(w, u, k, v, official=variant == "official", tile=wkv_chunked.DEFAULT_TILE,
                                     compute_dtype=jnp.float32, aligned=True, exact=False)
    assert not bool(in_range)
    check_against_naive(variant, w, u, k, v, 8)


@pytest.mark.slow  # long compiles; the default tests cover values, grads and exponent range
@pytest.mark.parametrize("variant", VARIANTS)
def test_long_sequence_against_float64_rows(variant):
    check_long_sequence_rows("chunked", variant)


@pytest.mark.parametrize("tokens", [1, 33, pytest.param(2, marks=pytest.mark.slow), pytest.param(2000, marks=pytest.mark.slow)])
def test_float64_official_eps_scale(tokens):
    # u << 0 and large decays of both signs: the EPS * e^{o_t} term is far from 1e-6 relative (test_wkv.py);
    # float64, so that only the formula can differ. T = 2000: two tiles per official chunk.
    rng = np.random.default_rng(tokens)
    w = np.array([0.0, 2.0, 5.0, -0.5, 0.3, 8.0]) * (1.0 if tokens < 100 else 0.05)
    u = np.array([-4.73, -10.0, -15.0, -8.0, -20.0, -12.0])
    k, v = rng.normal(size=(2, tokens, 6)), rng.normal(size=(2, tokens, 6))
    rows = None if tokens < 100 else [0, 31, 62, 63, 64, 100, 1999]
    expected = reference(w, u, k, v, "official", rows)
    with jax.enable_x64(True):
        y = np.asarray(bi_wkv(w, u, k, v, impl="chunked", variant="official"))
    close(y if rows is None else y[:, rows], expected, rtol=1e-10, atol_frac=1e-12)


@pytest.mark.slow  # long compiles; the default tests cover values, grads and exponent range
def test_bfloat16_inputs():
    # bf16 k, v: float32 arithmetic inside, output rounded to bf16 (test_wkv.py's bound).
    w, u, k, v = make_inputs(6, 2, 33, 5)
    k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    projection = np.random.default_rng(6).normal(size=k.shape).astype(np.float32)
    y, grads = value_and_grads("chunked", "official", w, u, k, v, projection)
    assert y.dtype == jnp.bfloat16
    expected = reference(w, u, np.asarray(k, np.float64), np.asarray(v, np.float64), "official")
    close(y, expected, rtol=2.0**-8, atol_frac=1e-3)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16]
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


# ------------------------------------------------------------------------------------------ loops in the HLO


def load_benchmark():
    # The HLO loop parser lives with the benchmark that prints the same numbers (benchmarks/ is no package).
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "wkv.py"
    spec = importlib.util.spec_from_file_location("wkv_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def while_trip_counts(fn, *args) -> list[int | None]:
    """Trip count of every while loop of the compiled HLO of ``fn`` (None where XLA does not know it)."""
    return load_benchmark().while_trip_counts(jax.jit(fn).lower(*args).compile().as_text())


def loss_and_grads(impl, variant):
    def loss(w, u, k, v):
        return jnp.sum(bi_wkv(w, u, k, v, impl=impl, variant=variant) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


@pytest.mark.parametrize("variant", ["official", pytest.param("paper", marks=pytest.mark.slow)])
def test_no_loop_grows_with_tokens(variant):
    # Forward and gradient in one program. T = 3136: 32 official chunks of 98 tokens, 4 tiles of 25 rows each,
    # so P = 128 tiles: loops may run log2(L) or log2(P) steps, or L rows (the exact fallback), never ~T.
    tokens, channels = 3136, 8
    args = [jax.ShapeDtypeStruct((channels,), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((1, tokens, channels),
                                                                                          jnp.float32)] * 2
    counts = while_trip_counts(loss_and_grads("chunked", variant), *args)
    assert counts and None not in counts, counts
    assert max(counts) <= 32, counts
    # The parser sees the scan's loops of T steps.
    assert max(while_trip_counts(loss_and_grads("scan", variant), *args)) == tokens
