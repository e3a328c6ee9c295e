"""The bidirectional WKV in chunked matrix form: no loop over tokens, in plain JAX (``bi_wkv(impl="chunked")``).

Semantics: exactly ``rwkvunet_jax.wkv.bi_wkv(..., impl="naive")`` for both variants, EPS * e^{o_t} included (see
that module's docstring for the table f(t, m) and the official kernel's running maximum o_t).

Tiles. The tokens are cut into tiles of at most L rows. Per batch element and channel, every piece of the
linear-time form is a decaying (rate -w) or growing (rate +w) sum over a range of earlier or later tokens, and
within a tile, with local positions i, j,

    sum_{j in range(i)} e^{k_j - w (i - j)} x_j  =  e^{kappa - w i} * sum_j M[i, j] e^{k_j + w j - kappa} x_j,

so every piece is a 0/1 matrix M (L x L, shared by all channels) times the tile's keys scaled by
e^{k_j +- w j - kappa}, kappa the tile's (per-channel) largest such exponent; the products run at full float32
precision (``precision=HIGHEST``). The official variant restarts its forward recurrence at the start s of each
official chunk of n = ceil(T/32) tokens. Its pieces for token t:

* past: tokens m < s with e^{-w(t-m)}, s <= m < t with e^{-w(t-1-m)} ("earlier chunk", "same chunk" masks),
  plus the state carried in: the past sum of the chunk if it began before the tile (``C``), else the global
  exclusive prefix (``P``);
* residual: (1 - e^w) sum_{s<m<=t} e^{k_m + w(t-m)} (growing; its m = t term is the table's (1 - e^w) on the
  diagonal), carried ``R``;
* future: sum_{m>t} e^{k_m - w(m-t)}, carried ``F`` (from later tiles);
* self: e^{u + k_t}.

The paper variant is past sum_{m<t} e^{k_m - w(t-1-m)} (carried ``P``) + self + future (carried ``F``).

Layouts. ``impl="chunked"`` aligns the tiles with the official chunks (each chunk of n tokens becomes q tiles of
L = ceil(n/q) rows, q = ceil(n/32), the last one padded): restarts then fall on tile starts, every tile uses the
same three matrices (one matrix product per piece for the whole batch), and the running maxima need no
segments. The Pallas TPU kernel (``rwkvunet_jax.kernels.bi_wkv_tpu``) needs tiles of a multiple of 8 rows and
no padding copies, so its tiles are contiguous and the chunk boundaries inside a tile become part of the masks:
every row carries ``lo`` (its chunk's first row in the tile) and ``rlo`` (first residual row) (``TileRows``).
Both run the same functions (``tile_summary``, ``tile_output`` and their VJPs) on arrays whose last two axes are
(rows, channels): a whole (B, P, L, C) batch of tiles here, one (L, C) block in a Mosaic kernel.

Across tiles. Each tile summarises what it adds to the carried states (``tile_summary``: a few numbers per
channel); exclusive scans over the P tile summaries give the states entering every tile (``combine``: log-step
doubling, log2(P) steps, the official restarts as resets); every tile then computes its outputs
(``tile_output``). Every partial sum is held as (ref, a, b): numerator a e^{ref}, denominator b e^{ref}, ref the
exact largest exponent of its terms, so that the states neither overflow nor underflow for any k or w, and o_t
comes out exactly as the maximum of the pieces' maxima (within a tile by log-step running maxima,
``_running_maxima``). References are constants for differentiation: the value a e^{ref} is what carries it.

Exponent range. A tile's scaled keys span its range of k_j +- w j, at most spread(k) + |w| (L - 1). Where that
exceeds ``safe_range`` (60 in float32, 600 in float64) anywhere, a key some query depends on could flush to zero,
so the whole call runs again with the intra-tile sums taken row by row (``tile_output_exact``, picked by a
``lax.cond``; every exponent is then exact; rematerialised, so that it costs no memory unless taken). Tile
summaries never depend on the range: each is a sum referenced to its own largest term.

Loops: none over tokens. The lowered forward and gradient hold only loops of at most L steps (column and
running maxima row by row in XLA, log2(L) doublings in a Mosaic kernel; the exact fallback's rows) and log2(P)
steps (the scans over tiles). Gradients: hand-written VJPs of the two tile functions (also what the Mosaic
kernels' backward passes run), autodiff through ``combine``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import running_sum as rsum
from .wkv_spec import EMPTY_EXPONENT as _EMPTY
from .wkv_spec import EPS, check_inputs, chunk_length

__all__ = [
    "DEFAULT_TILE",
    "Layout",
    "TileRows",
    "TileSpec",
    "bi_wkv_chunked",
    "combine",
    "contiguous_layout",
    "incoming_fields",
    "safe_range",
    "summary_fields",
    "tile_output",
    "tile_output_vjp",
    "tile_summary",
    "tile_summary_vjp",
]

DEFAULT_TILE = 32
_HIGHEST = lax.Precision.HIGHEST


def safe_range(dtype: Any) -> float:
    """Largest exponent range of a tile's scaled keys that keeps them normal numbers (and their products finite)."""
    return 600.0 if jnp.dtype(dtype) == jnp.float64 else 60.0


def summary_fields(official: bool) -> int:
    """Numbers per channel in a tile summary: official P, C, R, F as (ref, a, b), S (a maximum), the tile's
    exponent range; paper P, F, range."""
    return 14 if official else 7


def incoming_fields(official: bool) -> int:
    """Numbers per channel in the states entering a tile (``combine``'s output): the summary's, less the range."""
    return summary_fields(official) - 1


# ---------------------------------------------------------------------------------------------------- layouts


class TileRows(NamedTuple):
    """Chunk structure of tiles, broadcastable against (..., L, C) tile arrays.

    ``count`` (..., 1, 1): rows holding tokens (a prefix of the tile). ``lo`` (..., L, 1): the first row of the
    row's official chunk within the tile (0 if the chunk began in an earlier tile); ``rlo``: the first row of the
    chunk's residual range in the tile: lo + 1 if the chunk begins in this tile (its start has no residual),
    else 0. ``lo_t``, ``rlo_t`` (..., 1, L): the same as rows, so that masks and their transposes are built by
    comparisons alone. Paper variant: lo = rlo = 0.
    """

    count: Any
    lo: Any
    rlo: Any
    lo_t: Any
    rlo_t: Any


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the tokens sit in (P, L) tiles (numpy, static): ``index`` (P, L) token of each row (-1: padding),
    ``count`` (P,) rows holding tokens (a prefix), ``lo``/``rlo`` (P, L) as in ``TileRows``, ``resets`` (P,):
    the chunk of the tile's last token starts in the tile (the carried chunk states restart), ``aligned``: no
    tile holds a chunk start after its first row."""

    index: np.ndarray
    count: np.ndarray
    lo: np.ndarray
    rlo: np.ndarray
    aligned: bool

    @property
    def tile(self) -> int:
        return self.index.shape[1]

    @property
    def num_tiles(self) -> int:
        return self.index.shape[0]

    @property
    def resets(self) -> np.ndarray:
        last = np.maximum(self.count - 1, 0)
        return self.rlo[np.arange(self.num_tiles), last] != 0

    def rows(self) -> TileRows:
        """``TileRows`` of all tiles as numpy constants: count (P, 1, 1), lo/rlo (P, L, 1) and (P, 1, L)."""
        lo, rlo = (np.asarray(x, np.int32) for x in (self.lo, self.rlo))
        count = np.asarray(self.count, np.int32)[:, None, None]
        return TileRows(count, lo[:, :, None], rlo[:, :, None], lo[:, None, :], rlo[:, None, :])


def _chunk_rows(positions: np.ndarray, tokens: int, official: bool) -> tuple[np.ndarray, np.ndarray]:
    """lo, rlo (P, L) of tiles of consecutive positions (rows past T continue the count; they are masked)."""
    if not official:
        zeros = np.zeros(positions.shape, np.int32)
        return zeros, zeros
    n = chunk_length(tokens)
    start, t0 = n * (positions // n), positions[:, :1]
    cont = start < t0
    lo = np.where(cont, 0, start - t0)
    return lo.astype(np.int32), (lo + ~cont).astype(np.int32)


def contiguous_layout(tokens: int, tile: int, official: bool) -> Layout:
    """Tiles of ``tile`` consecutive tokens, T padded at the end (the Mosaic kernel's layout, and any tile of 1)."""
    num_tiles = -(-tokens // tile)
    positions = np.arange(num_tiles * tile).reshape(num_tiles, tile)
    count = np.clip(tokens - positions[:, 0], 0, tile)
    index = np.where(positions < tokens, positions, -1)
    lo, rlo = _chunk_rows(positions, tokens, official)
    aligned = (not official) or tile == 1 or bool(np.all(lo == 0))
    return Layout(index, count, lo, rlo, aligned)


def aligned_layout(tokens: int, target: int, official: bool) -> Layout:
    """Tiles of at most ``target`` rows that never straddle an official chunk boundary: each chunk of n tokens
    is q = ceil(n / target) tiles of L = ceil(n / q) rows (padding at the chunk's end). Paper: contiguous tiles of
    ceil(T / ceil(T / target)) rows."""
    if not official:
        return contiguous_layout(tokens, -(-tokens // -(-tokens // target)), official)
    n = chunk_length(tokens)
    q = -(-n // target)
    tile = -(-n // q)
    num_chunks = -(-tokens // n)
    offset = np.arange(q * tile).reshape(q, tile)  # position within the chunk
    index = np.arange(num_chunks)[:, None, None] * n + offset[None]
    index = np.where((offset[None] < n) & (index < tokens), index, -1).reshape(num_chunks * q, tile)
    count = (index >= 0).sum(axis=1)
    first = np.tile(np.arange(q) == 0, num_chunks)  # the tile starts a chunk
    lo = np.zeros_like(index)
    rlo = np.broadcast_to(first[:, None], index.shape).astype(np.int32)
    return Layout(index, count, lo.astype(np.int32), rlo, aligned=True)


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Static parameters of the tile computations.

    ``aligned``: no tile holds a chunk start after its first row (the masks are then the same for every tile).
    ``roll(x, shift)``: x rotated along its rows (axis -2) with ``jnp.roll`` semantics (``jnp.roll`` in XLA,
    ``pltpu.roll`` in a Mosaic kernel). ``unroll``: log-step doublings as straight-line code with constant
    shifts (Mosaic) or as a ``fori_loop`` (XLA, whose fusion would otherwise recompute every earlier step).
    """

    official: bool
    tile: int
    safe: float
    aligned: bool = True
    roll: Callable[[jax.Array, Any], jax.Array] = lambda x, shift: jnp.roll(x, shift, axis=0)
    unroll: bool = False


# --------------------------------------------------------------------------------------------- tile helpers


def _sg(x: jax.Array) -> jax.Array:
    return lax.stop_gradient(x)


def _iota(shape: tuple[int, ...], axis: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _matmul(mask: jax.Array, x: jax.Array) -> jax.Array:
    """mask (L, L) @ x (L, ..., C) at full float32 precision: one matrix product for a whole batch of tiles."""
    return jnp.einsum("ij,j...->i...", mask, x, precision=_HIGHEST, preferred_element_type=x.dtype)


def _colmax(x: jax.Array, spec: TileSpec, where: jax.Array | None = None) -> jax.Array:
    """Maximum over the rows, (L, ..., C) -> (1, ..., C). In XLA (``spec.unroll`` false) as a ``fori_loop`` over
    the L rows: XLA:CPU runs a reduction over the leading axis several times slower than L row maxima in a loop,
    and would fuse an unrolled one into every consumer. Mosaic kernels reduce."""
    if where is not None:
        x = jnp.where(where, x, _EMPTY)
    if spec.unroll or x.shape[0] == 1:
        return jnp.max(x, axis=0, keepdims=True)
    row = lambda i: lax.dynamic_index_in_dim(x, i, 0, keepdims=True)
    return lax.fori_loop(1, x.shape[0], lambda i, top: jnp.maximum(top, row(i)), x[:1])


def _colsum(x: jax.Array) -> jax.Array:
    """Sum over the rows, (..., L, C) -> (..., 1, C), as a product with a row of ones (XLA:CPU runs a fused
    reduction of a product of two arrays ~10x slower than this)."""
    return _matmul(jnp.ones((1, x.shape[0]), x.dtype), x)


def _doubling(step: Callable[[Any, Any], Any], carry: Any, size: int, unroll: bool) -> Any:
    """carry = step(shift, carry) for shift = 1, 2, 4, ... < size."""
    count = max(0, (size - 1).bit_length())
    if unroll:
        for i in range(count):
            carry = step(1 << i, carry)
        return carry
    return lax.fori_loop(0, count, lambda i, c: step(jnp.left_shift(1, i), c), carry)


class _Tile(NamedTuple):
    """A tile's sanitised inputs and row coordinates."""

    k: jax.Array  # (..., L, C), 0 on rows without a token
    v: jax.Array
    present: jax.Array  # (..., L, 1) bool
    row: jax.Array  # (L, 1) int32
    pos: jax.Array  # (L, 1) float, the row's position in the tile
    length: jax.Array  # (..., 1, 1) float, rows holding tokens


def _tile(k: jax.Array, v: jax.Array, rows: TileRows, spec: TileSpec) -> _Tile:
    row = _iota((spec.tile,) + (1,) * (k.ndim - 1), 0)
    present = row < rows.count
    # Rows past T may hold anything (a kernel's partial block), even NaN: never let them into any sum.
    k, v = jnp.where(present, k, 0.0), jnp.where(present, v, 0.0)
    length = jnp.asarray(rows.count).astype(k.dtype)
    return _Tile(k, v, present, row, row.astype(k.dtype), length)


def _last_chunk(t: _Tile, rows: TileRows) -> tuple[jax.Array, jax.Array]:
    """lo, rlo of the tile's last row holding a token, (..., 1, 1)."""
    last = lambda x: jnp.max(jnp.where(t.present, x, 0), axis=0, keepdims=True)  # lo, rlo never decrease
    return last(rows.lo), last(rows.rlo)


# ----------------------------------------------------------------------------------------------- tile keys


class _Keys(NamedTuple):
    """A tile's keys as exponents k_j + w j (``up``, for decaying sums over earlier keys) and k_j - w j (``down``,
    for sums over later keys and growing ones), their column maxima kappa and the scaled keys e^{exponent - kappa}
    (0 on rows without a token)."""

    up: jax.Array
    down: jax.Array
    up_max: jax.Array
    down_max: jax.Array
    up_scaled: jax.Array
    down_scaled: jax.Array


def _keys(t: _Tile, w: jax.Array, spec: TileSpec) -> _Keys:
    up = jnp.where(t.present, t.k + w * t.pos, _EMPTY)
    down = jnp.where(t.present, t.k - w * t.pos, _EMPTY)
    up_max, down_max = _sg(_colmax(up, spec)), _sg(_colmax(down, spec))
    scaled = lambda e, top: jnp.where(t.present, jnp.exp(e - top), 0.0)
    return _Keys(up, down, up_max, down_max, scaled(up, up_max), scaled(down, down_max))


def _span(t: _Tile, keys: _Keys, spec: TileSpec) -> jax.Array:
    """The tile's range of k_j + w j and of k_j - w j (the scaled keys' span), 0 for a tile of padding."""
    low = lambda e: -_colmax(-e, spec, t.present)
    span = jnp.maximum(keys.up_max - low(keys.up), keys.down_max - low(keys.down))
    return jnp.where(t.length > 0, span, 0.0)


# ----------------------------------------------------------------------------------------------- tile summary
# A summary sum is sum_j [mask_j] e^{k_j + w c_j} (v_j, 1): the tile's keys moved to the position the state is
# referenced at, c_j = +-j + d with a per-row offset d. It is computed from the scaled keys (e^{+-w j - kappa}) as
# sum_j [mask_j] scaled_j e^{w d_j} times e^{kappa - ref}, ref the exact maximum of k_j + w c_j over the mask.


def _summary_sums(t: _Tile, rows: TileRows, spec: TileSpec):
    """[(side, offset d, mask)] of the summary sums in field order (d per tile, or per row in a general tile;
    mask None: every row holding a token), and the chunk-start maximum's (offset, mask) (official)."""
    size = t.length
    if not spec.official:
        # P at the tile's last token (the paper's e^{-w(t-1-m)}), F at the token before the tile.
        return [("up", 1.0 - size, None), ("down", 0.0, None)], None
    if spec.aligned:
        lo_last, rlo_last, chunk = 0, rows.rlo, 1.0  # the tile lies in one chunk
    else:
        lo_last, rlo_last = _last_chunk(t, rows)
        chunk = (t.row >= lo_last).astype(t.pos.dtype)
    sums = [
        ("up", -size, None),  # P: global exclusive prefix at the next tile's first token
        # C: the past sum of the last token's chunk there: e^{-w(t-1-m)} within that chunk, e^{-w(t-m)} before it.
        ("up", chunk - size, None),
        ("down", size - 1.0, t.present & (t.row >= rlo_last)),  # R: that chunk's residual at the last token
        ("down", -1.0, None),  # F: for queries before the tile, at the token before it
    ]
    start = (size - 1.0, t.present & (t.row == lo_last) & (rlo_last != 0))  # S: the chunk start, grown
    return sums, start


def _summary_parts(t: _Tile, keys: _Keys, w: jax.Array, rows: TileRows, spec: TileSpec):
    """Per sum: (reference, weights q_j (L, ..., C) with sum_j q_j (v_j, 1) the (a, b) fields, coefficient c_j)."""
    sums, start = _summary_sums(t, rows, spec)
    parts = []
    for side, offset, mask in sums:
        exponent, kappa, scaled = (keys.up, keys.up_max, keys.up_scaled) if side == "up" else (
            keys.down, keys.down_max, keys.down_scaled)
        sign = 1.0 if side == "up" else -1.0
        per_row = jnp.ndim(offset) > 0 and jnp.shape(offset)[0] > 1
        if mask is None and not per_row:
            ref, q = _sg(kappa + w * offset), scaled  # the tile's maximum, moved: exact
        else:
            # Its own reference and exponentials, so that the sum is exact whatever the tile's range.
            mask = t.present if mask is None else mask
            ref = _sg(_colmax(exponent + w * offset, spec, mask))
            q = jnp.where(mask, jnp.exp(jnp.where(mask, exponent + w * offset - ref, 0.0)), 0.0)
        parts.append((ref, q, sign * t.pos + offset))
    return parts, start


def tile_summary(k: jax.Array, v: jax.Array, w: jax.Array, rows: TileRows, spec: TileSpec) -> tuple[jax.Array, ...]:
    """What each tile adds to the carried states: ``summary_fields`` arrays (1, ..., C). k, v (L, ..., C) in the
    compute dtype, w (1, C). Official fields P, C, R (ref, a, b each), S (a maximum), F, range; paper P, F, range.
    The references (and S, range) are constants for differentiation."""
    t = _tile(k, v, rows, spec)
    keys = _keys(t, w, spec)
    parts, start = _summary_parts(t, keys, w, rows, spec)
    out = []
    for ref, q, _ in parts:
        out += [ref, _colsum(q * t.v), _colsum(q)]
    if start is not None:
        out.insert(9, _sg(_colmax(keys.down + w * start[0], spec, start[1])))
    out.append(_sg(_span(t, keys, spec)))
    return tuple(out)


def tile_summary_vjp(
    k: jax.Array, v: jax.Array, w: jax.Array, rows: TileRows, spec: TileSpec, cotangents: tuple[jax.Array, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dk, dv, dw) of ``tile_summary`` for the cotangents of its fields (only the a, b fields count); dw per
    tile (1, ..., C)."""
    t = _tile(k, v, rows, spec)
    parts, _ = _summary_parts(t, _keys(t, w, spec), w, rows, spec)
    at = [0, 3, 6, 10] if spec.official else [0, 3]
    dk = dv = dw_rows = jnp.zeros_like(t.k)
    for (_, q, c), i in zip(parts, at):
        da, db = cotangents[i + 1], cotangents[i + 2]
        de = q * (t.v * da + db)
        dk, dv, dw_rows = dk + de, dv + q * da, dw_rows + c * de
    return jnp.where(t.present, dk, 0.0), jnp.where(t.present, dv, 0.0), _colsum(dw_rows)


# ----------------------------------------------------------------------------------------------- tile output


def _cummax(xs: tuple[jax.Array, ...], reverse: bool) -> tuple[jax.Array, ...]:
    """Inclusive running maxima over the rows (axis 0) of each array, from the last row with ``reverse``."""

    def step(top, rows):
        top = tuple(jnp.maximum(a, b) for a, b in zip(top, rows))
        return top, top

    _, out = lax.scan(step, tuple(x[-1] if reverse else x[0] for x in xs), xs, reverse=reverse)
    return out


def _running_maxima(up: jax.Array, down: jax.Array, w: jax.Array, t: _Tile, rows: TileRows, spec: TileSpec):
    """Exact maxima of the intra-tile pieces per row (exponents before the row's own decay):

    * past: max over j < i of up_j, plus w where j is in row i's chunk (the chunk's e^{-w(t-1-m)});
    * grown (official): max over the row's chunk's rows j <= i of down_j, plus max(w, 0) where j is not the chunk
      start (the start enters o_t once, the others as residual and residual + w);
    * future: max over j > i of down_j.

    Log-step doubling over rows; in general tiles the past keeps two running values, with and without the chunk
    offset, so that windows reaching into an earlier chunk drop it.
    """
    size, row = spec.tile, t.row
    lo = rows.lo
    segmented = spec.official and not spec.aligned
    plain = up
    own = up + w if segmented else up
    if spec.official:
        starts = (row == lo) & (rows.rlo != 0)
        grown = jnp.where(starts, down, down + jnp.maximum(w, 0.0))
    else:
        grown = up
    future = down

    def step(shift, carry):
        plain, own, grown, future = carry
        inside, same = row - shift >= 0, row - shift >= lo
        moved_plain = spec.roll(plain, shift)
        if segmented:
            moved_own = spec.roll(own, shift)
            own = jnp.maximum(own, jnp.where(same, moved_own, jnp.where(inside, moved_plain, _EMPTY)))
        plain = jnp.maximum(plain, jnp.where(inside, moved_plain, _EMPTY))
        if spec.official:
            grown = jnp.maximum(grown, jnp.where(same, spec.roll(grown, shift), _EMPTY))
        ahead = spec.roll(future, size - shift) if isinstance(shift, int) else spec.roll(future, -shift)
        future = jnp.maximum(future, jnp.where(row + shift < size, ahead, _EMPTY))
        return plain, own, grown, future

    if spec.unroll or segmented:
        plain, own, grown, future = _doubling(step, (plain, own, grown, future), size, spec.unroll)
    else:
        # XLA, one chunk per tile: running maxima row by row (a loop of L steps on whole rows costs less than
        # log2(L) doublings, each a pass over the tile with a rotated copy).
        plain, grown = _cummax((plain, grown), reverse=False)
        (future,) = _cummax((future,), reverse=True)
    if size == 1:
        empty = jnp.full_like(up, _EMPTY)
        return empty, grown, empty
    # Exclusive ranges: the inclusive maxima one row earlier (later).
    prev_plain = jnp.where(row >= 1, spec.roll(plain, 1), _EMPTY)
    if segmented:
        past = jnp.where(row - 1 >= lo, spec.roll(own, 1), prev_plain)
    elif spec.official:
        past = prev_plain + w
    else:
        past = prev_plain
    future = jnp.where(row + 1 < size, spec.roll(future, size - 1), _EMPTY)
    return past, grown, future


class _Source(NamedTuple):
    """A sum read by an output term: ``mask`` (matrix, transposed) @ scaled keys of ``side``, or the carried
    state whose a field is ``incoming[state + 1]`` (``rows``: where it applies, None: everywhere); times
    (1 - e^w) if ``leak``."""

    leak: bool
    mask: Any = None
    side: str = ""
    state: int = -1
    rows: Any = None


class _Term(NamedTuple):
    """Factor e^{base + w c} (``base``: constants for differentiation, no w in it; c: per-row coefficient) times
    the sum of its sources."""

    base: jax.Array
    c: Any
    sources: tuple


class _Output(NamedTuple):
    t: _Tile
    keys: dict  # side -> (scaled keys, sign of w j in their exponent)
    terms: list
    self_scale: jax.Array
    eps: float


def _masks(rows: TileRows, spec: TileSpec, dtype: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """0/1 matrices (row i = query, column j = key) and their transposes, from comparisons only."""
    i, j = _iota((spec.tile, spec.tile), 0), _iota((spec.tile, spec.tile), 1)
    if spec.aligned:
        before, after = (j < i).astype(dtype), (j > i).astype(dtype)
        # Residual: the chunk start (row 0 of a tile that starts a chunk) is taken out of the keys instead.
        incl = (j <= i).astype(dtype)
        return {"same": (before, after), "residual": (incl, incl.T), "after": (after, before)}

    def pair(fn):  # fn(query index, key index, lo of the query, rlo of the query) -> bool
        return fn(i, j, rows.lo, rows.rlo).astype(dtype), fn(j, i, rows.lo_t, rows.rlo_t).astype(dtype)

    masks = {"after": pair(lambda q, m, lo, rlo: m > q)}
    if not spec.official:
        masks["same"] = pair(lambda q, m, lo, rlo: m < q)
        return masks
    masks["same"] = pair(lambda q, m, lo, rlo: (m >= lo) & (m < q))
    masks["earlier"] = pair(lambda q, m, lo, rlo: m < lo)
    masks["residual"] = pair(lambda q, m, lo, rlo: (m >= rlo) & (m <= q))
    return masks


def _top(t: _Tile, keys: _Keys, w, u, incoming, rows: TileRows, spec: TileSpec) -> jax.Array:
    """The reference exponent of every row: o_t for the official variant (fact sheet 2.2: the largest exponent
    of past, future, chunk start grown, residual (+ w if w > 0) and u + k_t), the largest term for the paper's.
    Exact and constant for differentiation."""
    pos, last = t.pos, t.length - 1.0  # F is referenced at the tile's last token
    past, grown, future = _running_maxima(_sg(keys.up), _sg(keys.down), _sg(w), t, rows, spec)
    self_exp = u + t.k
    f_ref = incoming[10 if spec.official else 3]
    if spec.official:
        p_ref, c_ref, r_ref, s_ref = incoming[0], incoming[3], incoming[6], incoming[9]
        cont = rows.rlo == 0  # the row's chunk began before this tile
        top = jnp.maximum(jnp.where(cont, c_ref, p_ref), past) - w * pos
        top = jnp.maximum(top, jnp.maximum(f_ref - w * (last - pos), future + w * pos))
        carried_grown = jnp.maximum(s_ref, r_ref + jnp.maximum(w, 0.0)) + w * (pos + 1.0)
        top = jnp.maximum(top, jnp.maximum(jnp.where(cont, carried_grown, _EMPTY), grown + w * pos))
    else:
        top = jnp.maximum(jnp.maximum(incoming[0], past + w) - w * pos, f_ref - w * (last - pos))
        top = jnp.maximum(top, future + w + w * pos)
    return _sg(jnp.maximum(top, self_exp))


def _output_terms(k, v, w, u, incoming, rows: TileRows, spec: TileSpec, top: jax.Array | None = None) -> _Output:
    t = _tile(k, v, rows, spec)
    keys = _keys(t, w, spec)
    if top is None:
        top = _top(t, keys, w, u, incoming, rows, spec)
    pos, last = t.pos, t.length - 1.0
    masks = _masks(rows, spec, t.k.dtype)
    scaled = {"up": (keys.up_scaled, 1.0), "down": (keys.down_scaled, -1.0)}
    intra = lambda name, side, leak=False: _Source(leak, mask=masks[name], side=side)
    up_base, down_base = keys.up_max - top, keys.down_max - top
    if spec.official:
        cont = rows.rlo == 0  # the row's chunk began before this tile
        residual = "down"
        if spec.aligned:
            # Shared masks: the chunk start (row 0 of a tile that starts a chunk) leaves the residual's keys.
            scaled["residual"] = (jnp.where(t.row >= rows.rlo, keys.down_scaled, 0.0), -1.0)
            residual = "residual"
        past_sources = (intra("same", "up"),)
        terms = [_Term(up_base, 1.0 - pos, past_sources)]
        if not spec.aligned:
            terms.append(_Term(up_base, -pos, (intra("earlier", "up"),)))
        terms += [
            # The carried past: the chunk's own past sum where it began before the tile, else the global prefix.
            _Term(jnp.where(cont, incoming[3], incoming[0]) - top, -pos,
                  (_Source(False, state=3, rows=cont), _Source(False, state=0, rows=~cont))),
            _Term(down_base, pos, (intra("residual", residual, leak=True), intra("after", "down"))),
            _Term(incoming[6] - top, pos + 1.0, (_Source(True, state=6, rows=cont),)),
            _Term(incoming[10] - top, pos - last, (_Source(False, state=10),)),
        ]
        eps = EPS
    else:
        terms = [
            _Term(up_base, 1.0 - pos, (intra("same", "up"),)),
            _Term(incoming[0] - top, -pos, (_Source(False, state=0),)),
            _Term(down_base, pos + 1.0, (intra("after", "down"),)),
            _Term(incoming[3] - top, pos - last, (_Source(False, state=3),)),
        ]
        eps = 0.0
    return _Output(t, scaled, terms, jnp.exp(u + t.k - top), eps)


def _factor(term: _Term, w: jax.Array, spec: TileSpec) -> tuple[jax.Array, jax.Array | None]:
    """e^{base + w c}, and for intra-tile terms where it was clamped (else None). An intra-tile product carries the
    tile's kappa, which exceeds the largest exponent of the keys a row sees by at most the tile's range (<= safe);
    a row that sees no key has a sum of 0: the clamp keeps it from forming inf * 0."""
    e = term.base + w * term.c
    if term.sources[0].mask is None:
        return jnp.exp(e), None
    return jnp.exp(jnp.minimum(e, spec.safe)), e > spec.safe


def _source_sums(source: _Source, out: _Output, incoming) -> tuple[jax.Array, jax.Array]:
    if source.mask is not None:
        scaled, _ = out.keys[source.side]
        return _matmul(source.mask[0], scaled * out.t.v), _matmul(source.mask[0], scaled)
    a, b = incoming[source.state + 1], incoming[source.state + 2]
    if source.rows is not None:
        a, b = jnp.where(source.rows, a, 0.0), jnp.where(source.rows, b, 0.0)
    return a, b


def _term_sums(term: _Term, out: _Output, incoming, leak: jax.Array):
    """The term's (numerator, denominator) sums and, for the w-gradient of (1 - e^w), those of its leaking sources."""
    num = den = leak_num = leak_den = 0.0
    for source in term.sources:
        a, b = _source_sums(source, out, incoming)
        if source.leak:
            leak_num, leak_den = leak_num + a, leak_den + b
            a, b = a * leak, b * leak
        num, den = num + a, den + b
    return num, den, leak_num, leak_den


class _Sums(NamedTuple):
    """The output's numerator and denominator, and what their w-derivative through the terms' factors needs:
    sum_t c_t (factor_t * sums_t) and sum_t factor_t * (leaking sums_t), numerator and denominator each."""

    num: jax.Array
    den: jax.Array
    c_num: jax.Array
    c_den: jax.Array
    leak_num: jax.Array
    leak_den: jax.Array


def _num_den(out: _Output, w, incoming, spec: TileSpec) -> _Sums:
    leak = 1.0 - jnp.exp(w)
    num = out.self_scale * out.t.v
    den = out.self_scale + out.eps
    c_num = c_den = leak_num = leak_den = 0.0
    for term in out.terms:
        a, b, la, lb = _term_sums(term, out, incoming, leak)
        scale, _ = _factor(term, w, spec)
        a, b = a * scale, b * scale
        num, den = num + a, den + b
        c_num, c_den = c_num + term.c * a, c_den + term.c * b
        if not isinstance(la, float):
            leak_num, leak_den = leak_num + la * scale, leak_den + lb * scale
    den = jnp.where(out.t.present, den, 1.0)
    return _Sums(num, den, c_num, c_den, leak_num, leak_den)


def tile_output(k, v, w, u, incoming, rows: TileRows, spec: TileSpec) -> jax.Array:
    """The tiles' WKV outputs (L, ..., C) from their keys and values (L, ..., C), w and u (1, C), and the states
    entering them (``combine``'s fields, each (1, ..., C)). Rows without a token hold finite values to be dropped."""
    sums = _num_den(_output_terms(k, v, w, u, incoming, rows, spec), w, incoming, spec)
    return sums.num / sums.den


def _output_forward(k, v, w, u, incoming, rows: TileRows, spec: TileSpec) -> tuple[jax.Array, tuple]:
    """``tile_output`` and what ``tile_output_vjp`` can reuse instead of recomputing (the reference top and the
    sums)."""
    t = _tile(k, v, rows, spec)
    top = _top(t, _keys(t, w, spec), w, u, incoming, rows, spec)
    sums = _num_den(_output_terms(k, v, w, u, incoming, rows, spec, top), w, incoming, spec)
    return sums.num / sums.den, (top, sums)


def tile_output_vjp(k, v, w, u, incoming, rows: TileRows, spec: TileSpec, g: jax.Array, saved=None):
    """VJP of ``tile_output`` for the output cotangent g (L, ..., C): (dk, dv, dw, du, d_incoming), with dw, du and
    every d_incoming field (1, ..., C) per tile; the references' cotangents are 0 (they are constants). ``saved``:
    the second result of ``_output_forward``, if kept from the forward pass (else recomputed)."""
    top, sums = saved if saved is not None else (None, None)
    out = _output_terms(k, v, w, u, incoming, rows, spec, top)
    t = out.t
    if sums is None:
        sums = _num_den(out, w, incoming, spec)
    alpha = jnp.where(t.present, g, 0.0) / sums.den
    beta = -alpha * (sums.num / sums.den)
    e_w = jnp.exp(w)
    leak = 1.0 - e_w
    # d loss / d w through the factors e^{base + w c} and the (1 - e^w) of the residual.
    dw_rows = alpha * (sums.c_num - e_w * sums.leak_num) + beta * (sums.c_den - e_w * sums.leak_den)
    d_in = [None] * len(incoming)
    d_keys = {side: [0.0, 0.0] for side in out.keys}
    for term in out.terms:
        scale, _ = _factor(term, w, spec)
        ga, gb = alpha * scale, beta * scale
        for source in term.sources:
            sa, sb = (ga * leak, gb * leak) if source.leak else (ga, gb)
            if source.mask is not None:
                d_keys[source.side][0] += _matmul(source.mask[1], sa)
                d_keys[source.side][1] += _matmul(source.mask[1], sb)
            else:
                if source.rows is not None:
                    sa, sb = jnp.where(source.rows, sa, 0.0), jnp.where(source.rows, sb, 0.0)
                d_in[source.state + 1] = _colsum(sa)
                d_in[source.state + 2] = _colsum(sb)
    d_self = out.self_scale * (alpha * t.v + beta)  # self term e^{u + k - top} (v, 1)
    dk, dv = d_self, alpha * out.self_scale
    for side, (scaled, sign) in out.keys.items():
        d_num, d_den = d_keys[side]
        dv = dv + scaled * d_num
        d_exp = scaled * (t.v * d_num + d_den)  # the keys' exponent k +- w j
        dk = dk + d_exp
        dw_rows = dw_rows + (sign * t.pos) * d_exp
    d_in = tuple(jnp.zeros_like(x) if d is None else d for x, d in zip(incoming, d_in))
    dk, dv = jnp.where(t.present, dk, 0.0), jnp.where(t.present, dv, 0.0)
    return dk, dv, _colsum(dw_rows), _colsum(d_self), d_in


def tile_output_exact(k, v, w, u, incoming, rows: TileRows, spec: TileSpec) -> jax.Array:
    """``tile_output`` without scaled keys, for tiles whose range exceeds ``spec.safe``: the intra-tile sums run
    row by row (``lax.scan`` over the L rows, every tile and channel at once) as exact log-domain sums started
    from the incoming states, like ``impl="scan"`` within each tile and with its running sums (``running_sum``:
    the exponent recomputed from an exact row count; adding -w to it at every row rounded at the exponent's
    magnitude each time, and with keys of |k| ~ 50 in 25-row tiles y missed float64 by 1.2-4.3 times the tests'
    tolerance). XLA only (differentiated by autodiff)."""
    t = _tile(k, v, rows, spec)
    top = _top(t, _keys(t, w, spec), w, u, incoming, rows, spec)
    w_all, w = w, w.reshape(w.shape[-1])  # per channel, to broadcast against one row (..., C)
    like = t.k[0]
    empty = rsum.empty(like)
    state = lambda at: rsum.start(*(jnp.broadcast_to(x[0], like.shape) for x in incoming[at : at + 3]))
    starts = (t.row == rows.lo) & (rows.rlo != 0)
    present = jnp.broadcast_to(t.present, t.k.shape)
    starts = jnp.broadcast_to(starts, t.k.shape)
    f_at = 10 if spec.official else 3

    def backward(future, xs):  # future = sum over later rows, referenced at this row
        k_row, v_row, here = xs
        if spec.official:  # F_{t-1} = e^{-w} (F_t + e^{k_t})
            nxt = rsum.decay(rsum.absorb(future, -w, k_row, v_row, here))
        else:  # B_{t-1} = e^{-w} B_t + e^{k_t}
            nxt = rsum.absorb(rsum.decay(future), -w, k_row, v_row, here)
        return rsum.select(here, nxt, state(f_at)), rsum.emit(future, -w)

    _, future = lax.scan(backward, state(f_at), (t.k, t.v, present), reverse=True)
    if spec.official:

        def forward(carry, xs):
            prefix, past, residual = carry
            k_row, v_row, here, start = xs
            past, residual = rsum.select(start, prefix, past), rsum.select(start, empty, residual)
            residual = rsum.absorb(residual, w, k_row, v_row, here & ~start)  # the row's own (1 - e^w) e^{k}
            out = (rsum.emit(past, -w), rsum.emit(residual, w))
            prefix = rsum.decay(rsum.absorb(prefix, -w, k_row, v_row, here))
            past = rsum.absorb(rsum.decay(past), -w, k_row, v_row, here)
            return (prefix, past, rsum.decay(residual)), out

        carry = (state(0), state(3), rsum.decay(state(6)))
        _, (past, residual) = lax.scan(forward, carry, (t.k, t.v, present, starts))
        pieces = [(past, 1.0), (residual, 1.0 - jnp.exp(w_all)), (future, 1.0)]
        eps = EPS
    else:

        def forward(past, xs):
            k_row, v_row, here = xs
            return rsum.absorb(rsum.decay(past), -w, k_row, v_row, here), rsum.emit(past, -w)

        _, past = lax.scan(forward, state(0), (t.k, t.v, present))
        pieces = [(past, 1.0), (future, 1.0)]
        eps = 0.0
    self_scale = jnp.exp(u + t.k - top)
    num, den = self_scale * t.v, self_scale + eps
    for (ref, a, b), coef in pieces:
        scale = coef * jnp.exp(ref - top)
        num, den = num + a * scale, den + b * scale
    return num / jnp.where(t.present, den, 1.0)


# -------------------------------------------------------------------------------------------------- combine


class _Sum(NamedTuple):
    ref: jax.Array
    a: jax.Array
    b: jax.Array


def _add(x: _Sum, shift: jax.Array, y: _Sum) -> _Sum:
    """x e^{shift} + y; the reference stays the exact maximum and constant for differentiation."""
    moved = x.ref + shift
    ref = _sg(jnp.maximum(moved, y.ref))
    sx, sy = jnp.exp(moved - ref), jnp.exp(y.ref - ref)
    return _Sum(ref, x.a * sx + y.a * sy, x.b * sx + y.b * sy)


def _pick(flag: jax.Array, x: _Sum, y: _Sum) -> _Sum:
    return _Sum(*(jnp.where(flag, p, q) for p, q in zip(x, y)))


def _shifted(x: jax.Array, by: Any, fill: jax.Array, reverse: bool) -> jax.Array:
    """x moved ``by`` tiles along axis 1 (towards later tiles, or earlier with ``reverse``), ``fill`` entering."""
    size = x.shape[1]
    index = lax.broadcasted_iota(jnp.int32, (1, size) + (1,) * (x.ndim - 2), 1)
    if reverse:
        return jnp.where(index + by < size, jnp.roll(x, -by, axis=1), fill)
    return jnp.where(index >= by, jnp.roll(x, by, axis=1), fill)


def _exclusive_scan(fn: Callable, elems: Any, identity: Any, *, reverse: bool = False) -> Any:
    """Exclusive scan along axis 1 (the tiles) of the associative ``fn(earlier, later)`` (``fn(later, earlier)``
    with ``reverse``): element p gets the combination of all elements before (after) it, ``identity`` where there
    are none. Log-step doubling in a ``fori_loop`` of log2(P) steps: O(P log P) work on a few numbers per tile."""
    leaves, tree = jax.tree.flatten(elems)
    fills = jax.tree.leaves(identity)
    size = leaves[0].shape[1]

    def step(shift, acc):
        moved = jax.tree.unflatten(tree, [_shifted(x, shift, f, reverse) for x, f in zip(acc, fills)])
        return jax.tree.leaves(fn(moved, jax.tree.unflatten(tree, acc)))

    acc = _doubling(step, [_shifted(x, 1, f, reverse) for x, f in zip(leaves, fills)], size, unroll=False)
    return jax.tree.unflatten(tree, acc)


def combine(
    summaries: tuple[jax.Array, ...], w: jax.Array, *, official: bool, lengths: np.ndarray, resets: np.ndarray
) -> tuple[jax.Array, ...]:
    """The states entering every tile from the tile summaries (fields (B, P, C), w (C,)): exclusive scans over
    the P tiles of ``lengths`` tokens, forward for P, C, R, S (C, R, S restart where ``resets``), backward for F.

    Returns ``incoming_fields`` arrays (B, P, C): official P, C, R (ref, a, b), S, F; paper P, F.
    """
    num_tiles = summaries[0].shape[1]
    dtype = summaries[0].dtype
    w = w[None, None, :]
    length = jnp.asarray(lengths, dtype).reshape(1, num_tiles, 1)
    zero, empty = jnp.zeros((), dtype), jnp.full((), _EMPTY, dtype)
    no_sum = _Sum(empty, zero, zero)
    f_at = 10 if official else 3

    def backward(later, earlier):
        (n_late, f_late), (n_early, f_early) = later, earlier
        return n_late + n_early, _add(f_late, -w * n_early, f_early)

    _, f_in = _exclusive_scan(backward, (length, _Sum(*summaries[f_at : f_at + 3])), (zero, no_sum), reverse=True)
    if not official:

        def forward(first, second):
            (n1, p1), (n2, p2) = first, second
            return n1 + n2, _add(p1, -w * n2, p2)

        _, p_in = _exclusive_scan(forward, (length, _Sum(*summaries[0:3])), (zero, no_sum))
        return (*p_in, *f_in)

    reset = jnp.asarray(resets).reshape(1, num_tiles, 1)

    def forward(first, second):
        n1, r1, p1, c1, res1, s1 = first
        n2, r2, p2, c2, res2, s2 = second
        p = _add(p1, -w * n2, p2)
        c = _add(_pick(r2, p1, c1), -w * n2, c2)  # a chunk start in the second part: its past begins from P
        res = _pick(r2, res2, _add(res1, w * n2, res2))
        s = jnp.where(r2, s2, s1 + w * n2)
        return n1 + n2, r1 | r2, p, c, res, s

    elems = (length, reset, _Sum(*summaries[0:3]), _Sum(*summaries[3:6]), _Sum(*summaries[6:9]), summaries[9])
    identity = (zero, jnp.zeros((), bool), no_sum, no_sum, no_sum, empty)
    _, _, p_in, c_in, r_in, s_in = _exclusive_scan(forward, elems, identity)
    return (*p_in, *c_in, *r_in, s_in, *f_in)


# ------------------------------------------------------------------------------------------------ XLA driver


def bi_wkv_chunked(
    w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array, *, variant: str = "official", tile: int | None = None
) -> jax.Array:
    """Bidirectional WKV (B, T, C) in chunked form, in k's dtype; float32 arithmetic (float64 for float64 inputs).

    ``tile``: largest tile L (default ``DEFAULT_TILE``); results do not depend on it beyond rounding.
    """
    w, u, k, v = check_inputs(w, u, k, v, variant=variant, caller="bi_wkv_chunked")
    tile = DEFAULT_TILE if tile is None else int(tile)
    if tile < 1:
        raise ValueError(f"bi_wkv_chunked: tile must be >= 1, got {tile}")
    compute = jnp.promote_types(jnp.float32, jnp.result_type(w, u, k, v))
    return _chunked(w, u, k, v, official=variant == "official", tile=tile, compute_dtype=compute)


def to_tiles(x: jax.Array, layout: Layout) -> jax.Array:
    """(B, T, C) -> (B, P, L, C) in ``layout`` (padding rows 0)."""
    batch, tokens, channels = x.shape
    index = layout.index.reshape(-1)
    if np.array_equal(index[:tokens], np.arange(tokens)) and np.all(index[tokens:] < 0):
        x = jnp.pad(x, ((0, 0), (0, index.size - tokens), (0, 0)))  # contiguous: a pad and a reshape
    else:
        x = jnp.take(jnp.pad(x, ((0, 0), (0, 1), (0, 0))), jnp.asarray(np.where(index >= 0, index, tokens)), axis=1)
    return x.reshape(batch, layout.num_tiles, layout.tile, channels)


def from_tiles(y: jax.Array, layout: Layout, tokens: int) -> jax.Array:
    """(B, P, L, C) -> (B, T, C): the rows holding tokens, in token order."""
    index = layout.index.reshape(-1)
    y = y.reshape(y.shape[0], -1, y.shape[-1])
    rows = np.flatnonzero(index >= 0)[np.argsort(index[index >= 0])]
    if np.array_equal(rows, np.arange(tokens)):
        return y[:, :tokens]
    return jnp.take(y, jnp.asarray(rows), axis=1)


def _batch_total(x: jax.Array, like: jax.Array) -> jax.Array:
    """A per-tile (1, ..., C) cotangent summed to the shape of the per-channel input ``like``."""
    return jnp.sum(x.reshape(-1, x.shape[-1]), axis=0).reshape(like.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _summary(k, v, w, rows: TileRows, spec: TileSpec):
    """``tile_summary`` with its hand-written VJP (``rows`` integer arrays: no cotangent)."""
    return tile_summary(k, v, w, rows, spec)


def _summary_fwd(k, v, w, rows, spec):
    return _summary(k, v, w, rows, spec), (k, v, w, rows)


def _summary_bwd(spec, res, cotangents):
    k, v, w, rows = res
    dk, dv, dw = tile_summary_vjp(k, v, w, rows, spec, cotangents)
    return dk, dv, _batch_total(dw, w), None


_summary.defvjp(_summary_fwd, _summary_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _output(k, v, w, u, incoming, rows: TileRows, spec: TileSpec):
    """``tile_output`` with its hand-written VJP."""
    return tile_output(k, v, w, u, incoming, rows, spec)


def _output_fwd(k, v, w, u, incoming, rows, spec):
    y, saved = _output_forward(k, v, w, u, incoming, rows, spec)
    return y, (k, v, w, u, incoming, rows, saved)


def _output_bwd(spec, res, g):
    k, v, w, u, incoming, rows, saved = res
    dk, dv, dw, du, d_in = tile_output_vjp(k, v, w, u, incoming, rows, spec, g, saved)
    return dk, dv, _batch_total(dw, w), _batch_total(du, u), d_in, None


_output.defvjp(_output_fwd, _output_bwd)


@functools.partial(jax.jit, static_argnames=("official", "tile", "compute_dtype", "aligned"))
def _chunked(w, u, k, v, *, official: bool, tile: int, compute_dtype: Any, aligned: bool = True) -> jax.Array:
    """The XLA chunked form. ``aligned=False`` runs the Mosaic kernel's contiguous tiles and per-tile masks, one
    (L, C) block at a time under vmap (a check of the kernel's arithmetic without Pallas).

    Where some tile's keys span more exponent range than the float type holds, the whole call runs again with the
    intra-tile sums taken row by row (rare; exact). The fast result is computed either way and the ``lax.cond``
    only picks: operands of a cond are materialised in a fixed layout and its branches are compiled apart from
    the rest, which with the fast path inside made XLA:CPU's forward about twice as slow."""
    args = dict(official=official, tile=tile, compute_dtype=compute_dtype, aligned=aligned)
    y, in_range = _tiled(w, u, k, v, exact=False, **args)
    if in_range is not None:
        exact = jax.checkpoint(lambda a: _tiled(*a, exact=True, **args)[0])  # recomputed, not stored, for grads
        y = lax.cond(in_range, lambda y, a: y, lambda y, a: exact(a), y, (w, u, k, v))
    return y.astype(k.dtype)


def _tiled(w, u, k, v, *, official: bool, tile: int, compute_dtype: Any, aligned: bool, exact: bool):
    """(y (B, T, C) in the compute dtype, whether every tile's range is safe (None for tiles of one row)).
    ``exact``: intra-tile sums row by row (``tile_output_exact``); else the fast form, whose gradient is dropped
    where the range is not safe (it may then not be finite)."""
    batch, tokens, channels = k.shape
    layout = aligned_layout(tokens, tile, official) if aligned else contiguous_layout(tokens, tile, official)
    spec = TileSpec(official=official, tile=layout.tile, safe=safe_range(compute_dtype), aligned=layout.aligned)
    w, u = (x.astype(compute_dtype)[None, :] for x in (w, u))
    kt, vt = (to_tiles(x.astype(compute_dtype), layout) for x in (k, v))  # (B, P, L, C)
    if layout.aligned:
        # Rows first, (L, B, P, C): every mask product is then one plain matrix product for the whole batch.
        kt, vt = (jnp.moveaxis(x, 2, 0) for x in (kt, vt))
        count = layout.count.astype(np.int32).reshape(1, 1, -1, 1)
        lo, rlo = (np.moveaxis(x.astype(np.int32), 1, 0)[:, None, :, None] for x in (layout.lo, layout.rlo))
        rows = TileRows(*(jnp.asarray(x) for x in (count, lo, rlo)), None, None)
        summary = lambda k, v, w: _summary(k, v, w, rows, spec)
        output = lambda k, v, w, u, incoming: _output(k, v, w, u, incoming, rows, spec)
        exact_output = lambda k, v, w, u, incoming: tile_output_exact(k, v, w, u, incoming, rows, spec)
        squeeze, expand = (lambda x: x[0]), (lambda x: x[None])
    else:
        summary, output, exact_output = _vmapped_blocks(spec, layout)
        squeeze, expand = (lambda x: x[:, :, 0]), (lambda x: x[:, :, None])

    fields = tuple(squeeze(x) for x in summary(kt, vt, w))  # each (B, P, C)
    fields = tuple(_sg(x) if i in _constant_fields(official) else x for i, x in enumerate(fields))
    incoming = combine(fields[:-1], w[0], official=official, lengths=layout.count, resets=layout.resets)
    incoming = tuple(expand(x) for x in incoming)
    operands = (kt, vt, w, u, incoming)
    in_range = None
    if exact and layout.tile > 1:
        y = exact_output(*operands)
    elif layout.tile == 1:
        y = output(*operands)
    else:
        in_range = jnp.all(fields[-1] <= spec.safe)
        y = output(*_gate(in_range, operands))
    if layout.aligned:
        y = jnp.moveaxis(y, 0, 2)
    return from_tiles(y, layout, tokens), in_range


@jax.custom_vjp
def _gate(flag: jax.Array, x: Any) -> Any:
    """x, whose cotangents pass where ``flag`` (a scalar bool) holds and are 0 (even if not finite) elsewhere."""
    return x


def _gate_fwd(flag, x):
    return x, flag


def _gate_bwd(flag, g):
    return None, jax.tree.map(lambda d: jnp.where(flag, d, jnp.zeros_like(d)), g)


_gate.defvjp(_gate_fwd, _gate_bwd)


def _vmapped_blocks(spec: TileSpec, layout: Layout):
    """summary, output and exact output over (B, P, L, C) tiles, one (L, C) block at a time (vmap)."""
    rows = tuple(jnp.asarray(x) for x in layout.rows())
    over = lambda fn, n: jax.vmap(jax.vmap(fn, in_axes=(0,) * n + (0,)), in_axes=(0,) * n + (None,))

    def summary(kt, vt, w):
        return over(lambda k, v, r: _summary(k, v, w, TileRows(*r), spec), 2)(kt, vt, rows)

    def output(kt, vt, w, u, incoming):
        return over(lambda k, v, inc, r: _output(k, v, w, u, inc, TileRows(*r), spec), 3)(kt, vt, incoming, rows)

    def exact(kt, vt, w, u, incoming):
        fn = lambda k, v, inc, r: tile_output_exact(k, v, w, u, inc, TileRows(*r), spec)
        return over(fn, 3)(kt, vt, incoming, rows)

    return summary, output, exact


def _constant_fields(official: bool) -> tuple[int, ...]:
    """Summary fields that are constants for differentiation: references, the chunk-start maximum, the range."""
    return (0, 3, 6, 9, 10, 13) if official else (0, 3, 6)
