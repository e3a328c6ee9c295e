"""Tests of the Pallas TPU (Mosaic) kernel, rwkvunet_jax.kernels.bi_wkv_tpu, without a TPU.

Values and gradients in Pallas interpret mode against the float64 reference and ``naive`` (small shapes: the
interpret mode runs every program of the grid in turn); and lowering for TPU on this CPU machine, through
``bi_wkv(impl="pallas")``, which must pick the Mosaic kernel when lowered for TPU and the Triton one for CUDA.
Lowering catches bad block shapes and unsupported operations, not VMEM overflow (the module docstring states
the per-block footprint). Arguments are ShapeDtypeStructs, so nothing large is allocated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_wkv import close, make_inputs, reference

from rwkvunet_jax.kernels.bi_wkv_tpu import bi_wkv_tpu
from rwkvunet_jax.wkv import bi_wkv


def values_and_grads(fn, w, u, k, v, projection):
    def loss(w, u, k, v):
        y = fn(w, u, k, v)
        return jnp.sum(y.astype(jnp.float32) * projection), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(w, u, k, v)
    return y, grads


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_interpret_matches_naive(variant):
    # T = 40: two tiles of 32 rows, the second partial; official chunks of 2 tokens, so chunk starts fall
    # inside tiles; C = 5 padded to 128 lanes.
    w, u, k, v = make_inputs(40, 2, 40, 5)
    projection = np.random.default_rng(40).normal(size=k.shape).astype(np.float32)
    y, grads = values_and_grads(lambda *a: bi_wkv_tpu(*a, variant=variant, interpret=True), w, u, k, v, projection)
    y_naive, g_naive = values_and_grads(lambda *a: bi_wkv(*a, impl="naive", variant=variant), w, u, k, v,
                                        projection)
    close(y, reference(w, u, k, v, variant), rtol=2e-5, atol_frac=2e-6)
    for name, a, b in zip("wukv", grads, g_naive):
        close(a, b, rtol=1e-4, atol_frac=1e-5)


@pytest.mark.slow
def test_interpret_bfloat16_inputs():
    # bf16 k, v: float32 arithmetic inside, output rounded to bf16 (test_wkv.py's bound); grads in the inputs'
    # dtypes and finite.
    w, u, k, v = make_inputs(6, 2, 40, 5)
    k, v = jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
    projection = np.random.default_rng(6).normal(size=k.shape).astype(np.float32)
    y, grads = values_and_grads(lambda *a: bi_wkv_tpu(*a, interpret=True), w, u, k, v, projection)
    assert y.dtype == jnp.bfloat16
    expected = reference(w, u, np.asarray(k, np.float64), np.asarray(v, np.float64), "official")
    close(y, expected, rtol=2.0**-8, atol_frac=1e-3)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16]
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


@pytest.mark.slow
def test_interpret_out_of_range_falls_back():
    # |k| up to 60 spans more exponent range than float32 holds within a tile: the call takes the exact XLA
    # path; values and gradients stay those of naive.
    w, u, k, v = make_inputs(41, 1, 70, 3, k_scale=1.0)
    k = np.clip(30 * k, -60, 60).astype(np.float32)
    projection = np.random.default_rng(41).normal(size=k.shape).astype(np.float32)
    y, grads = values_and_grads(lambda *a: bi_wkv_tpu(*a, interpret=True), w, u, k, v, projection)
    y_naive, g_naive = values_and_grads(lambda *a: bi_wkv(*a, impl="naive"), w, u, k, v, projection)
    close(y, y_naive, rtol=1e-4, atol_frac=1e-5)
    for a, b in zip(grads, g_naive):
        close(a, b, rtol=1e-3, atol_frac=1e-4)


def lowered_text(shape, dtype, variant, grad, platform):
    args = [jax.ShapeDtypeStruct(shape[2:], jnp.float32)] * 2 + [jax.ShapeDtypeStruct(shape, dtype)] * 2

    def forward(w, u, k, v):
        return bi_wkv(w, u, k, v, impl="pallas", variant=variant, interpret=False)

    fn = forward
    if grad:
        fn = jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3))
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def mosaic_calls(text: str) -> int:
    return text.count("tpu_custom_call")


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "shape, dtype, variant, grad",
    [
        ((24, 784, 576), jnp.float32, "official", True),
        ((24, 784, 576), jnp.float32, "paper", True),
        pytest.param((24, 784, 576), jnp.float32, "official", False, marks=_SLOW),
        pytest.param((24, 784, 576), jnp.float32, "paper", False, marks=_SLOW),
        pytest.param((2, 16384, 576), jnp.float32, "official", True, marks=_SLOW),
        pytest.param((2, 16384, 576), jnp.float32, "paper", True, marks=_SLOW),
        pytest.param((24, 784, 576), jnp.bfloat16, "official", True, marks=_SLOW),
        pytest.param((24, 784, 576), jnp.bfloat16, "paper", True, marks=_SLOW),
    ],
)
def test_lowers_for_tpu_as_mosaic(shape, dtype, variant, grad):
    # Forward: summary and output kernels; gradient: those and the two VJP kernels.
    text = lowered_text(shape, dtype, variant, grad, "tpu")
    assert mosaic_calls(text) >= (4 if grad else 2)
    assert "triton" not in text.lower()


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_lowers_for_tpu_under_enable_x64(variant):
    # With jax_enable_x64 on, the constant row shifts were int64 and Mosaic's rotate (i32 shifts only) failed
    # to verify. The gradient (all four kernels) lowers; values under x64 in interpret mode are checked below.
    with jax.enable_x64(True):
        text = lowered_text((2, 300, 72), jnp.float32, variant, True, "tpu")
    assert mosaic_calls(text) >= 4


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_values_under_enable_x64(variant):
    w, u, k, v = make_inputs(31, 2, 70, 8)
    with jax.enable_x64(True):
        y = bi_wkv_tpu(w, u, k, v, variant=variant, interpret=True)
        y_naive = bi_wkv(w, u, k, v, impl="naive", variant=variant)
    assert y.dtype == jnp.float32
    close(y, y_naive, rtol=2e-5, atol_frac=2e-6)


@pytest.mark.slow
def test_lowers_for_cuda_as_triton():
    text = lowered_text((2, 784, 576), jnp.float32, "official", False, "cuda")
    assert mosaic_calls(text) == 0 and "triton" in text.lower()


def test_auto_picks_pallas_on_tpu(monkeypatch):
    from rwkvunet_jax.wkv import resolve_impl

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_impl("auto") == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve_impl("auto") == "scan"
