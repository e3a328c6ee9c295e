"""The bidirectional WKV as Pallas TPU (Mosaic) kernels of the chunked matrix form (``bi_wkv(impl="pallas")`` on TPU).

Same algebra as ``rwkvunet_jax.kernels.wkv_chunked`` (read its docstring): the kernels call its tile functions
(``tile_summary``, ``tile_output`` and their VJPs) on one (L, 128) block of contiguous tokens and channels, with
``pltpu.roll`` for the row shifts and the log-step running maxima unrolled (constant shifts). Contiguous tiles
hold official chunk boundaries anywhere, so the masks are built per tile from the rows' chunk coordinates,
computed in the kernel from the tile index.

Pipeline (each a ``pallas_call`` over the grid (B, T/L, C/128), every program independent):

1. summary kernel: what each tile adds to the carried states (a few numbers per channel, 16 rows per tile);
2. ``wkv_chunked.combine`` in XLA: log-step scans over the T/L tile summaries give the states entering each tile;
3. output kernel: the tile's outputs from its keys, values and incoming states.

Backward (``custom_vjp``): the output kernel's VJP (recomputing its forward), the VJP of ``combine`` in XLA, the
summary kernel's VJP. Inputs float32 or bfloat16; arithmetic float32; the triangular matrix products at
``precision=HIGHEST``. T is padded to a multiple of L = 32 (rows past T are masked in every sum) and C to a
multiple of 128 (padding channels are dropped).

Exponent range: where a tile's keys span more than ``wkv_chunked.safe_range`` (checked in XLA before the
kernels), the call runs the XLA chunked form with tiles of one token instead (``lax.cond``; exact).

VMEM per program (float32): the inputs and outputs are a few (32, 128) blocks (16 KiB each) and (16, 128)
summaries (8 KiB), double-buffered: < 0.3 MiB; the kernel body holds a few dozen (32, 128) temporaries and
(32, 32) masks: < 2 MiB in all, well under the 16 MiB limit.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import wkv_chunked as wc
from .wkv_spec import check_inputs, chunk_length

__all__ = ["TILE", "BLOCK_C", "bi_wkv_tpu"]

TILE = 32  # rows per block: a multiple of the 8 sublanes
BLOCK_C = 128  # channels per block: the 128 lanes
_FIELDS = 16  # rows of a packed per-tile block (summaries: 14 or 7 fields; output VJP: 2 + 13 or 2 + 6)
_SUPPORTED = (jnp.float32, jnp.bfloat16)


def _roll(x: jax.Array, shift: int) -> jax.Array:
    """x rotated along its rows by a constant shift; an int32 shift, as Mosaic's rotate takes (a Python int would
    be int64 under jax_enable_x64)."""
    return pltpu.roll(x, jnp.int32(shift), 0)


def _spec(official: bool) -> wc.TileSpec:
    return wc.TileSpec(official=official, tile=TILE, safe=wc.safe_range(jnp.float32), aligned=False, roll=_roll,
                       unroll=True)


def _rows(tokens: int, official: bool) -> wc.TileRows:
    """This program's tile rows (``wkv_chunked.TileRows``) from its tile index: rows holding tokens, and each
    row's official chunk start within the tile as rows (L, 1) and columns (1, L)."""
    first = pl.program_id(1) * TILE
    count = jnp.clip(tokens - first, 0, TILE)
    row, col = lax.broadcasted_iota(jnp.int32, (TILE, 1), 0), lax.broadcasted_iota(jnp.int32, (1, TILE), 1)
    if not official:
        return wc.TileRows(count, row * 0, row * 0, col * 0, col * 0)
    n = chunk_length(tokens)

    def chunk(index):
        position = first + index
        # Integer division by the constant n in float32 (exact: positions < 2^22), as vector int division is not.
        start = jnp.floor((position.astype(jnp.float32) + 0.5) / n).astype(jnp.int32) * n
        began_before = start < first
        lo = jnp.where(began_before, 0, start - first)
        return lo, jnp.where(began_before, 0, lo + 1)

    (lo, rlo), (lo_t, rlo_t) = chunk(row), chunk(col)
    return wc.TileRows(count, lo, rlo, lo_t, rlo_t)


def _pack(fields, rows: int = _FIELDS) -> jax.Array:
    fields = [jnp.broadcast_to(x, (1, BLOCK_C)).astype(jnp.float32) for x in fields]
    return jnp.concatenate(fields + [jnp.zeros((rows - len(fields), BLOCK_C), jnp.float32)], axis=0)


def _unpack(block: jax.Array, count: int) -> tuple[jax.Array, ...]:
    return tuple(block[i : i + 1, :] for i in range(count))


# ------------------------------------------------------------------------------------------------- kernels


def _summary_kernel(k_ref, v_ref, w_ref, out_ref, *, tokens, official):
    rows, spec = _rows(tokens, official), _spec(official)
    k, v = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
    out_ref[...] = _pack(wc.tile_summary(k, v, w_ref[...], rows, spec))


def _summary_vjp_kernel(k_ref, v_ref, w_ref, cot_ref, dk_ref, dv_ref, dw_ref, *, tokens, official):
    rows, spec = _rows(tokens, official), _spec(official)
    k, v = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
    cot = _unpack(cot_ref[...], wc.summary_fields(official))
    dk, dv, dw = wc.tile_summary_vjp(k, v, w_ref[...], rows, spec, cot)
    dk_ref[...], dv_ref[...], dw_ref[...] = dk, dv, _pack([dw], 8)


def _output_kernel(k_ref, v_ref, w_ref, u_ref, in_ref, y_ref, *, tokens, official):
    rows, spec = _rows(tokens, official), _spec(official)
    k, v = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
    incoming = _unpack(in_ref[...], wc.incoming_fields(official))
    y_ref[...] = wc.tile_output(k, v, w_ref[...], u_ref[...], incoming, rows, spec)


def _output_vjp_kernel(k_ref, v_ref, w_ref, u_ref, in_ref, g_ref, dk_ref, dv_ref, dp_ref, *, tokens, official):
    rows, spec = _rows(tokens, official), _spec(official)
    k, v = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
    incoming = _unpack(in_ref[...], wc.incoming_fields(official))
    dk, dv, dw, du, d_in = wc.tile_output_vjp(k, v, w_ref[...], u_ref[...], incoming, rows, spec, g_ref[...])
    dk_ref[...], dv_ref[...], dp_ref[...] = dk, dv, _pack([dw, du, *d_in])


# ------------------------------------------------------------------------------------------------ pallas_calls


def _grid(k: jax.Array) -> tuple[int, int, int]:
    batch, padded_tokens, channels = k.shape
    return batch, padded_tokens // TILE, channels // BLOCK_C


_ROWS = pl.BlockSpec((None, TILE, BLOCK_C), lambda b, p, c: (b, p, c))
_CHANNELS = pl.BlockSpec((1, BLOCK_C), lambda b, p, c: (0, c))


def _per_tile(rows: int = _FIELDS) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, rows, BLOCK_C), lambda b, p, c: (b, p, 0, c))


def _call(kernel, ins, in_specs, outs, *, tokens, official, interpret):
    return pl.pallas_call(
        functools.partial(kernel, tokens=tokens, official=official),
        grid=_grid(ins[0]),
        in_specs=in_specs,
        out_specs=[spec for spec, _ in outs],
        out_shape=[shape for _, shape in outs],
        interpret=interpret,
    )(*ins)


def _shapes(k: jax.Array, rows: int):
    batch, num_tiles, _ = _grid(k)
    return jax.ShapeDtypeStruct((batch, num_tiles, rows, k.shape[2]), jnp.float32)


def _combine(summaries: jax.Array, w: jax.Array, tokens: int, official: bool) -> jax.Array:
    """Incoming states (B, P, 16, C) from packed summaries (B, P, 16, C), via ``wkv_chunked.combine``."""
    layout = wc.contiguous_layout(tokens, TILE, official)
    num = wc.summary_fields(official) - 1
    fields = [summaries[:, :, i, :] for i in range(num)]
    fields = [lax.stop_gradient(x) if i in wc._constant_fields(official) else x for i, x in enumerate(fields)]
    incoming = wc.combine(tuple(fields), w[0], official=official, lengths=layout.count, resets=layout.resets)
    pad = jnp.zeros_like(incoming[0])
    return jnp.stack(list(incoming) + [pad] * (_FIELDS - len(incoming)), axis=2)


def _forward(w, u, k, v, tokens, official, interpret):
    options = dict(tokens=tokens, official=official, interpret=interpret)
    (summaries,) = _call(_summary_kernel, (k, v, w), [_ROWS, _ROWS, _CHANNELS],
                         [(_per_tile(), _shapes(k, _FIELDS))], **options)
    incoming = _combine(summaries, w, tokens, official)
    (y,) = _call(_output_kernel, (k, v, w, u, incoming), [_ROWS, _ROWS, _CHANNELS, _CHANNELS, _per_tile()],
                 [(_ROWS, jax.ShapeDtypeStruct(k.shape, jnp.float32))], **options)
    return y, summaries, incoming


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _kernels(w, u, k, v, tokens, official, interpret):
    return _forward(w, u, k, v, tokens, official, interpret)[0]


def _kernels_fwd(w, u, k, v, tokens, official, interpret):
    y, summaries, incoming = _forward(w, u, k, v, tokens, official, interpret)
    return y, (w, u, k, v, summaries, incoming)


def _kernels_bwd(tokens, official, interpret, res, g):
    w, u, k, v, summaries, incoming = res
    options = dict(tokens=tokens, official=official, interpret=interpret)
    g = g.astype(jnp.float32)
    dk, dv, per_tile = _call(
        _output_vjp_kernel, (k, v, w, u, incoming, g), [_ROWS, _ROWS, _CHANNELS, _CHANNELS, _per_tile(), _ROWS],
        [(_ROWS, jax.ShapeDtypeStruct(k.shape, jnp.float32))] * 2 + [(_per_tile(), _shapes(k, _FIELDS))], **options)
    dw = jnp.sum(per_tile[:, :, 0, :], axis=(0, 1))[None]
    du = jnp.sum(per_tile[:, :, 1, :], axis=(0, 1))[None]
    # Rows 2.. hold the incoming fields' cotangents; the combine's VJP (XLA) takes them to the summaries'.
    d_incoming = jnp.concatenate([per_tile[:, :, 2:], jnp.zeros_like(per_tile[:, :, :2])], axis=2)
    _, combine_vjp = jax.vjp(lambda s, w: _combine(s, w, tokens, official), summaries, w)
    d_summaries, dw_combine = combine_vjp(d_incoming)
    dk2, dv2, dw_tiles = _call(
        _summary_vjp_kernel, (k, v, w, d_summaries), [_ROWS, _ROWS, _CHANNELS, _per_tile()],
        [(_ROWS, jax.ShapeDtypeStruct(k.shape, jnp.float32))] * 2 + [(_per_tile(8), _shapes(k, 8))], **options)
    dw = dw + dw_combine + jnp.sum(dw_tiles[:, :, 0, :], axis=(0, 1))[None]
    return dw, du, (dk + dk2).astype(k.dtype), (dv + dv2).astype(v.dtype)


_kernels.defvjp(_kernels_fwd, _kernels_bwd)


def _in_range(w: jax.Array, k: jax.Array, tokens: int) -> jax.Array:
    """Whether every tile's keys k_j +- w j span at most the safe range (as ``wkv_chunked``'s summaries say)."""
    batch, padded, channels = k.shape
    tiles = k.astype(jnp.float32).reshape(batch, padded // TILE, TILE, channels)
    position = jnp.arange(padded).reshape(1, -1, TILE, 1)
    present = position < tokens
    j = (position % TILE).astype(jnp.float32)
    span = 0.0
    for sign in (1.0, -1.0):
        e = tiles + sign * w[0] * j
        high = jnp.max(jnp.where(present, e, -jnp.inf), axis=2)
        low = jnp.min(jnp.where(present, e, jnp.inf), axis=2)
        span = jnp.maximum(span, jnp.where(jnp.isfinite(high), high - low, 0.0))
    return jnp.all(span <= wc.safe_range(jnp.float32))


def bi_wkv_tpu(
    w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array, *, variant: str = "official", interpret: bool = False
) -> jax.Array:
    """Bidirectional WKV of k, v (B, T, C) with decay w and bonus u (C,), differentiable in all four; k's dtype.

    ``variant``: ``"official"`` or ``"paper"`` (``rwkvunet_jax.wkv``). ``interpret``: run the kernels in Pallas
    interpret mode (any backend; tests) instead of compiling them with Mosaic (TPU).
    """
    w, u, k, v = check_inputs(w, u, k, v, variant=variant, caller="bi_wkv_tpu", dtypes=_SUPPORTED)
    return _bi_wkv_tpu(w, u, k, v, official=variant == "official", interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("official", "interpret"))
def _bi_wkv_tpu(w, u, k, v, *, official: bool, interpret: bool) -> jax.Array:
    batch, tokens, channels = k.shape
    pad_t = -tokens % TILE
    pad_c = -channels % BLOCK_C
    wp, up = (jnp.pad(x.astype(jnp.float32), (0, pad_c))[None] for x in (w, u))
    kp, vp = (jnp.pad(x, ((0, 0), (0, pad_t), (0, pad_c))) for x in (k, v))

    def kernels(args):
        return _kernels(*args, tokens, official, interpret)[:, :tokens, :channels].astype(k.dtype)

    def exact(args):  # tiles of one token: every exponent exact, only the log-step scans over tokens remain
        return wc._chunked(w, u, k, v, official=official, tile=1, compute_dtype=jnp.float32)

    return lax.cond(_in_range(wp, kp, tokens), kernels, exact, (wp, up, kp, vp))
