"""Tests of the Pallas bi-WKV kernel (kernels/bi_wkv.py, installed as rwkvunet_jax.kernels.bi_wkv).

On CPU the kernel runs in Pallas interpret mode and is compared with ``bi_wkv(impl="naive")`` (the dense
definitions, including the official kernel's EPS * e^{o_t}) in values and all four gradients. The compiled
(Triton) path is checked by lowering for CUDA without a GPU, and its unrolled row-at-a-time code runs in the
interpreter through a test hook; ``-m gpu`` runs it for real on a GPU machine (benchmarks/gpu_check.sh).

Compile time dominates on CPU: every distinct shape/dtype/tiling compiles the kernels again, so each test
reuses one shape for several input sets.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkvunet_jax.kernels import bi_wkv as kernel_module
from rwkvunet_jax.kernels.bi_wkv import bi_wkv_pallas
from rwkvunet_jax.wkv import bi_wkv, resolve_impl

VARIANTS = ("official", "paper")


def make_inputs(seed, batch, tokens, channels, *, w_range=(-0.1, 0.15), k_scale=2.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.uniform(*w_range, size=channels).astype(np.float32)
    u = rng.normal(size=channels).astype(np.float32)
    k = (k_scale * rng.normal(size=(batch, tokens, channels))).astype(np.float32)
    v = rng.normal(size=(batch, tokens, channels)).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(u), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def close(actual, expected, rtol, atol_frac, what=""):
    """|a - e| <= rtol |e| + atol_frac * max(max|e|, 1), in float64."""
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    atol = atol_frac * max(float(np.abs(expected).max()), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def value_and_grads(fn, cotangent):
    """jit'd (y, (dw, du, dk, dv)) of sum(fn(w, u, k, v) * cotangent)."""

    def loss(w, u, k, v):
        y = fn(w, u, k, v)
        return jnp.sum(y.astype(jnp.float32) * cotangent), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def naive_float64(w, u, k, v, variant="official"):
    """The dense definition evaluated in float64 (numpy result)."""
    with jax.enable_x64(True):
        return np.asarray(bi_wkv(*(jnp.asarray(np.asarray(x), jnp.float64) for x in (w, u, k, v)), impl="naive",
                                 variant=variant))


def check_against_naive(variant, inputs, *, rtol, atol_frac, grad_rtol, grad_atol_frac, kernel_only=True,
                        **kernel_args):
    """Values and the four gradients of bi_wkv_pallas against the naive form. ``kernel_only``: the kernel itself,
    also where bi_wkv_pallas would use the scan form (decays past its range)."""
    shape = inputs[0][1][2].shape
    cotangent = jnp.asarray(np.random.default_rng(99).normal(size=shape), jnp.float32)
    pallas = value_and_grads(functools.partial(bi_wkv_pallas, variant=variant, **kernel_args), cotangent)
    naive = value_and_grads(functools.partial(bi_wkv, impl="naive", variant=variant), cotangent)
    for name, (w, u, k, v) in inputs:
        with mock.patch.object(kernel_module, "_FORCE_KERNEL", kernel_only):
            (_, y), grads = pallas(w, u, k, v)
        (_, y_ref), grads_ref = naive(w, u, k, v)
        assert y.dtype == k.dtype and y.shape == k.shape
        close(y, y_ref, rtol, atol_frac, f"{variant} {name}: y")
        for arg, g, g_ref in zip("wukv", grads, grads_ref):
            assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, (arg, g.dtype, g_ref.dtype)
            close(g, g_ref, grad_rtol, grad_atol_frac, f"{variant} {name}: d{arg}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_naive_values_and_grads_many_tiles(variant):
    # B > 1; odd T = 65 (official chunks of n = 3 tokens) with tiles of at most 2 tokens, so each chunk is a
    # segment of two tiles walked in a loop (the path of T > 32 * tile_len); C = 40 with 32-channel blocks.
    shape = (2, 65, 40)
    inputs = [
        ("typical", make_inputs(0, *shape)),
        ("large |k|", make_inputs(1, *shape, k_scale=20.0)),  # |k| up to ~70
        ("negative w", make_inputs(2, *shape, w_range=(-0.3, -0.02))),
    ]
    check_against_naive(variant, inputs, rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4, grad_atol_frac=1e-5,
                        block_c=32, tile_len=2)


@pytest.mark.parametrize("variant, tokens", [("official", 1), ("official", 2), ("official", 31), ("official", 33),
                                             ("paper", 33)])
def test_short_sequences_eps_scale(variant, tokens):
    # The official kernel's EPS is scaled by its running maximum o_t: with u << 0 (u + k_t far below the row's
    # other exponents) EPS e^{o_t} is a visible part of the denominator when T is short (at T = 1,
    # y = v / (1 + EPS e^{-u})). T = 31, 32: every token its own chunk; T = 33: chunks of 2 tokens. The last
    # input has w n > 2 (n = 1 or 2), where the official same-chunk weights are negative.
    shape = (2, tokens, 5)
    low_u = make_inputs(3, *shape, w_range=(-0.5, 0.5))
    low_u = (low_u[0], low_u[1] - 9.0, low_u[2], low_u[3])
    big_k = make_inputs(4, *shape, w_range=(-0.3, 0.3), k_scale=20.0)
    big_k = (big_k[0], big_k[1] - 9.0, big_k[2], big_k[3])
    inputs = [("u << 0", low_u), ("u << 0, large |k|", big_k),
              ("negative w", make_inputs(5, *shape, w_range=(-0.8, -0.1))),
              ("w n > 2", make_inputs(6, *shape, w_range=(1.2, 2.5)))]
    check_against_naive(variant, inputs, rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4, grad_atol_frac=1e-5)


@pytest.mark.slow  # interpret mode over a long row; many_tiles covers tiling by default
def test_long_sequence_default_tiling():
    # T = 784 (the models' 28 x 28 stage): chunks of n = 25, default interpret tiles (8 rows: 4 tiles per
    # chunk, 32 segments), C = 20 (one partial channel block), model-like decays (w n < 0.5).
    inputs = [("model-like", make_inputs(7, 1, 784, 20, w_range=(-0.01, 0.02))),
              ("large |k|", make_inputs(8, 1, 784, 20, w_range=(-0.01, 0.02), k_scale=20.0))]
    check_against_naive("official", inputs, rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4, grad_atol_frac=1e-5)
    w, u, k, v = make_inputs(9, 1, 784, 20, w_range=(-0.02, 0.03), k_scale=8.0)
    close(bi_wkv_pallas(w, u, k, v, variant="paper"), bi_wkv(w, u, k, v, impl="naive", variant="paper"),
          2e-5, 2e-6, "paper T=784")


def test_official_weights_negative_when_w_n_exceeds_two():
    # w n from 0.5 to 6 at T = 784: the official same-chunk weight e^{-w(d-1)} + (1 - e^w) e^{w d} is
    # negative for most d, D_t shrinks towards 0 on some rows and y_t grows large there (hundreds), so y is
    # ill-conditioned for any float32 evaluation. The kernel must stay finite and be as accurate as the dense
    # definition in float32, both measured against the dense definition in float64.
    w, u, k, v = make_inputs(10, 1, 784, 20, w_range=(0.02, 0.24))
    y = bi_wkv_pallas(w, u, k, v)
    y32 = bi_wkv(w, u, k, v, impl="naive")
    y64 = naive_float64(w, u, k, v)
    assert np.isfinite(np.asarray(y)).all()
    err_kernel = np.abs(np.asarray(y, np.float64) - y64)
    err_naive = np.abs(np.asarray(y32, np.float64) - y64)
    assert err_kernel.max() <= 10 * err_naive.max() + 1e-6 * np.abs(y64).max(), (err_kernel.max(), err_naive.max())
    assert np.abs(y64).max() > 50  # the range really is ill-conditioned


@pytest.mark.parametrize("variant", VARIANTS)
def test_decays_past_the_kernels_range_take_the_scan_form(variant):
    # w < 0 weighs farther tokens more: at T = 196 with w down to -0.5 (row growth ~140 in log2 units) a tile's
    # sums of the two directions lie ~2^100 apart under one reference, and the kernel alone lost the smaller one
    # before carrying it to where it dominates (gradients off by ~10^4 times the tolerance). bi_wkv_pallas hands
    # such decays (traced, as under jit here) to the scan form.
    inputs = [("w down to -0.5", make_inputs(13, 2, 196, 6, w_range=(-0.5, -0.01)))]
    check_against_naive(variant, inputs, rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4, grad_atol_frac=1e-5,
                        kernel_only=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_holds_to_the_edge_of_its_range(variant):
    # The kernel itself with the most negative decay it takes (row growth max(-w) log2(e) (T + 1) at the limit),
    # T = 196: values and gradients within the usual tolerances; 5% more growth goes to the scan form.
    tokens = 196
    w_edge = -kernel_module._MAX_ROW_GROWTH / (np.log2(np.e) * (tokens + 1)) * (1 - 1e-6)
    w, u, k, v = make_inputs(14, 2, tokens, 6)
    w = jnp.asarray(np.linspace(w_edge, 0.1, 6), jnp.float32)
    plan = kernel_module._make_plan(variant == "official", 2, tokens, 6, interpret=True)
    assert bool(kernel_module._within_range(plan, w, u))
    assert not bool(kernel_module._within_range(plan, 1.05 * w, u))
    check_against_naive(variant, [("at the edge", (w, u, k, v))], rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4,
                        grad_atol_frac=1e-5)


def test_official_chunk_growth_past_float32_takes_the_scan_form():
    # Official, T = 784 (n = 25) in 25-row tiles, w from 4.5 to 5: the same-chunk weight (1 - e^w) e^{w d}
    # reaches e^125 inside a chunk, past float32, and the kernel returned inf. With the scan form: finite, and
    # as accurate as the dense definition in float32 (both against float64; y is ill-conditioned here).
    w, u, k, v = make_inputs(15, 1, 784, 8)
    w = jnp.asarray(np.linspace(4.5, 5.0, 8), jnp.float32)
    y = np.asarray(bi_wkv_pallas(w, u, k, v, tile_len=28), np.float64)
    y32 = np.asarray(bi_wkv(w, u, k, v, impl="naive"), np.float64)
    y64 = naive_float64(w, u, k, v)
    assert np.isfinite(y).all()
    assert np.abs(y - y64).max() <= 10 * np.abs(y32 - y64).max() + 1e-6 * np.abs(y64).max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_bonus_past_float32_takes_the_scan_form(variant):
    # u = 100: e^u overflows float32 as the kernel's one factor of the self term (it returned NaN); the dense
    # definition shifts u + k by the row's maximum and gives y_t ~ v_t.
    w, u, k, v = make_inputs(16, 1, 40, 4)
    u = jnp.full_like(u, 100.0)
    close(bi_wkv_pallas(w, u, k, v, variant=variant), bi_wkv(w, u, k, v, impl="naive", variant=variant),
          2e-5, 2e-6, "u = 100")


@pytest.mark.parametrize("variant", VARIANTS)
def test_under_enable_x64(variant):
    # With jax_enable_x64 on, Python ints and whole-axis slices index as int64 next to the int32 program ids and
    # the kernel failed to trace (dynamic_slice index types). float32 inputs: the same values and gradients as
    # the naive form; segments of two tiles (the loops over tiles and segments), and one input past the
    # kernel's range (the scan form under lax.cond).
    shape = (2, 65, 40)
    with jax.enable_x64(True):
        inputs = [("typical", make_inputs(20, *shape)),
                  ("past the range", make_inputs(21, *shape, w_range=(-0.9, -0.02)))]
        check_against_naive(variant, inputs[:1], rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4, grad_atol_frac=1e-5,
                            tile_len=2)
        check_against_naive(variant, inputs[1:], rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4, grad_atol_frac=1e-5,
                            kernel_only=False, tile_len=2)


@pytest.mark.parametrize("variant", ["official"])
def test_bfloat16_inputs(variant):
    # bf16 k, v (f32 w, u): float32 accumulation inside, output and dk, dv in bf16. The naive reference sees
    # the same bf16 inputs; differences come from rounding the results to bf16 (2^-8 relative) and from the
    # backward using the bf16-rounded y.
    inputs = [("bf16", make_inputs(6, 2, 19, 12, dtype=jnp.bfloat16))]
    check_against_naive(variant, inputs, rtol=2.0**-7, atol_frac=4e-3, grad_rtol=2e-2, grad_atol_frac=1e-2,
                        tile_len=4)


@pytest.mark.parametrize("variant, tile_len", [("official", 1), ("paper", 2)],
                         ids=["official-two-tile-segments", "paper-one-tile-segments"])
def test_compiled_code_path_in_interpreter(variant, tile_len, monkeypatch):
    # Compiled, the kernels unroll a tile's rows and load and store one row at a time; interpret mode loops
    # over rows instead. Run the compiled path's code in the interpreter (tiny tiles: XLA compiles unrolled
    # recurrences slowly): T = 34 gives chunks of 2 tokens, tile_len 1 two tiles per chunk walked in a loop,
    # tile_len 2 one tile per chunk; C = 24 with blocks of 16.
    monkeypatch.setattr(kernel_module, "_UNROLL_IN_INTERPRETER", True)
    inputs = [("unrolled", make_inputs(12, 2, 34, 24, w_range=(-0.3, 0.3), k_scale=8.0))]
    check_against_naive(variant, inputs, rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4, grad_atol_frac=1e-5,
                        block_c=16, tile_len=tile_len)


def test_tiling_does_not_change_results():
    # The official chunking is semantics, the tiles and channel blocks are not: T = 70 (n = 3) with segments
    # of one chunk in 3 tiles vs segments of 10 chunks in one tile.
    w, u, k, v = make_inputs(7, 1, 70, 20, w_range=(-0.2, 0.3))
    ys = [bi_wkv_pallas(w, u, k, v, tile_len=t, block_c=b) for t, b in ((1, 8), (32, 32))]
    close(ys[0], ys[1], 2e-5, 2e-6, "tilings")


@pytest.mark.parametrize("tokens, chunk, rows", [(784, 25, 25), (196, 7, 28), (896, 28, 28), (897, 29, 10),
                                                 (3136, 98, 10), (16384, 512, 10)])
def test_compiled_default_tiling(tokens, chunk, rows):
    # Compiled tiles hold whole official chunks up to 28 tokens; longer chunks split into tiles of at most 10
    # rows (the split tiles carry more sums: at 25-27 rows the backward output spilled registers).
    plan = kernel_module.plan_summary(tokens, 64)
    assert (plan["chunk"], plan["rows_per_tile"]) == (chunk, rows)
    assert plan["rows_per_tile"] * plan["tiles_per_chunk"] >= chunk


def test_dispatch_through_bi_wkv():
    # bi_wkv(impl="pallas") runs this kernel (values against naive are checked above).
    w, u, k, v = make_inputs(8, 2, 9, 6)
    y = bi_wkv(w, u, k, v, impl="pallas", variant="paper", interpret=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(bi_wkv_pallas(w, u, k, v, variant="paper")))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_auto_resolves_to_scan_off_gpu():
    assert resolve_impl("auto") == "scan"
    from rwkvunet_jax.kernels.bi_wkv import default_interpret

    assert default_interpret() is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="vrwkv"), "unknown variant"),
        (dict(block_c=48), "power of two"),
        (dict(tile_len=0), "tile_len"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    w, u, k, v = make_inputs(9, 1, 4, 3)
    with pytest.raises(ValueError, match=message):
        bi_wkv_pallas(w, u, k, v, **kwargs)


def test_bad_inputs_raise():
    w, u, k, v = make_inputs(9, 1, 4, 3)
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        bi_wkv_pallas(w, u, k[0], v[0])
    with pytest.raises(ValueError, match=r"w, u of shape \(C,\) with C = 3"):
        bi_wkv_pallas(w[:2], u, k, v)
    with pytest.raises(ValueError, match="k must have a floating dtype; got int32"):
        bi_wkv_pallas(w, u, k.astype(jnp.int32), v.astype(jnp.int32))
    with jax.enable_x64(True), pytest.raises(ValueError, match="k has dtype float64; supported: float32, bfloat16"):
        bi_wkv_pallas(w, u, jnp.zeros(k.shape, jnp.float64), jnp.zeros(v.shape, jnp.float64))
    with pytest.raises(ValueError, match="same dtype"):
        bi_wkv_pallas(w, u, k, v.astype(jnp.bfloat16))


# ------------------------------------------------------------------------------------------ CUDA lowering


@pytest.mark.parametrize(
    "variant, dtype, tokens",
    [("official", jnp.float32, 45), ("paper", jnp.float32, 45), ("official", jnp.bfloat16, 45),
     ("official", jnp.float32, 1100)],
    ids=["official-f32", "paper-f32", "official-bf16", "official-f32-looped-segments"])
def test_lowers_to_triton_for_cuda(variant, dtype, tokens):
    # Lowering Pallas -> Triton IR runs on CPU and catches what Triton cannot take (array sizes that are not
    # powers of two, unsupported ops). T = 45 (chunks of 2: segments of 16 chunks) and C = 72 are not
    # multiples of anything; T = 1100 has chunks of 35 tokens, more than a tile, so each chunk splits into
    # tiles (of 9 rows) that a segment walks in a loop. It does not compile Triton to PTX
    # (benchmarks/kernel_report.py and -m gpu do).
    batch, channels = 2, 72
    args = (jax.ShapeDtypeStruct((channels,), jnp.float32), jax.ShapeDtypeStruct((channels,), jnp.float32),
            jax.ShapeDtypeStruct((batch, tokens, channels), dtype), jax.ShapeDtypeStruct((batch, tokens, channels), dtype))
    fn = functools.partial(bi_wkv_pallas, variant=variant, interpret=False)
    grad = jax.grad(lambda w, u, k, v: jnp.sum(fn(w, u, k, v).astype(jnp.float32)), argnums=(0, 1, 2, 3))
    forward = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    backward = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # Forward: summary, output (which merges the other segments' totals itself); the gradient adds the
    # backward summary and output.
    assert forward.count("__gpu$xla.gpu.triton") == 2
    assert backward.count("__gpu$xla.gpu.triton") == 4
    if dtype == jnp.float32 and variant == "official":  # also with jax_enable_x64 on (int32 indices inside)
        with jax.enable_x64(True):
            backward = jax.jit(grad).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert backward.count("__gpu$xla.gpu.triton") == 4


# -------------------------------------------------------------------------------------------- packaging


def test_no_top_level_kernels_package(tmp_path):
    # Run outside the repository root, where the source folder kernels/ is not on sys.path.
    code = (
        "import importlib.util, rwkvunet_jax.kernels.bi_wkv as m\n"
        "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels')\n"
        "assert callable(m.bi_wkv_pallas)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize(
    "variant, dtype, shape",
    [("official", jnp.float32, (3, 196, 960)), ("official", jnp.float32, (2, 1100, 72)),
     ("official", jnp.float32, (2, 33, 40)), ("paper", jnp.float32, (3, 196, 960)),
     ("official", jnp.bfloat16, (3, 196, 960))],
    ids=["official-196x960", "official-1100x72", "official-33x40", "paper-196x960", "official-bf16-196x960"])
def test_compiled_on_gpu_matches_naive(variant, dtype, shape):
    # Compiled Triton kernels (interpret=None on a GPU) against naive: stage 4 of rwkv_unet_b at 224 (T = 196:
    # segments of 4 chunks of 7 tokens; C = 960), T = 1100 (chunks of 35: two tiles per segment, walked in a
    # loop) with a partial channel block, and T = 33 with u << 0 and w n > 2.
    bf16 = dtype == jnp.bfloat16
    tol = dict(rtol=2.0**-7, atol_frac=4e-3, grad_rtol=3e-2, grad_atol_frac=1e-2) if bf16 else dict(
        rtol=2e-5, atol_frac=2e-6, grad_rtol=1e-4, grad_atol_frac=1e-5)
    inputs = [("typical", make_inputs(10, *shape, w_range=(-0.01, 0.02), dtype=dtype)),
              ("large |k|", make_inputs(11, *shape, w_range=(-0.01, 0.02), k_scale=20.0, dtype=dtype))]
    if shape[1] == 33:
        w, u, k, v = make_inputs(12, *shape, w_range=(1.2, 2.5), dtype=dtype)
        inputs.append(("u << 0, w n > 2", (w, u - 9.0, k, v)))
    check_against_naive(variant, inputs, **tol)
