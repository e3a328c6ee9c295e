"""Pallas kernel of the bidirectional WKV (forward and backward), variants ``official`` and ``paper``.

Semantics: exactly ``rwkvunet_jax.wkv.bi_wkv(..., impl="naive")`` (see that module's docstring), including the
official kernel's EPS * e^{o_t}. Per batch element and channel, y_t = N_t / D_t with N_t = sum_m W[t, m] v_m and
D_t = sum_m W[t, m] + eps_t, W[t, m] = e^{k_m} f(t, m).

Pieces. With r = e^{-w} and chunks of n = ceil(T / 32) tokens starting at s (official), row t's weights are
sums of linear recurrences over tokens::

    P_t = sum_{m<t} e^{k_m - w(t-m)}             (all earlier tokens)           P_{t+1} = r (P_t + e^{k_t})
    Q_t = sum_{s<=m<t} e^{k_m - w(t-m)}          (same chunk, restarts at s)
    S_t = sum_{s<m<t} e^{k_m + w(t-m)}           (same chunk, restarts at s)
    F_t = sum_{m>t} e^{k_m - w(m-t)}             (all later tokens, reverse recurrence)

    official: N_t = P + F + (e^w - 1) [t>s] (Q - S) + (e^u + [t>s](1 - e^w)) e^{k_t} v_t   (D: v -> 1)
    paper:    N_t = e^w (P + F) + e^u e^{k_t} v_t

(1 - e^w may be negative, so the pieces are summed only at the output.) o_t, the official kernel's running
maximum that scales EPS, is a max-plus sum of the same shape (wkv.py's docstring) and is carried exactly with
a few max/add per token.

Numerics. Inside a tile of L tokens every sum is held relative to one reference exponent kappa (the largest
key of the tile and of the states coming in), so a token costs one exp (e^{k - kappa}) and the recurrences
are plain multiply-adds by r or 1/r; row t then needs one more exp, EPS e^{o_t - kappa}. Exponents are base 2
(k, w, u pre-scaled by log2 e) so that each exp is one hardware exp2. Between tiles a sum travels as
(reference exponent, scaled values) with its exact maximum as reference. Accuracy: a tile's sums span a
factor e^{|w| L} at most, so results match the dense definition to float32 rounding while |w| L stays below
~40 (|w| below ~2.5 per token at the default 16-token tiles; the models pass w = decay / T, far smaller);
beyond that, terms below e^{-87} of a row's largest are lost and, past |w| L ~ 85, sums overflow.

Official weights for w n > 2. The same-chunk weight e^{-w(d-1)} + (1 - e^w) e^{w d} (token d places back)
turns negative once w d exceeds ~1 and dominates the row once w n exceeds ~2 (decay above ~64): D_t can
then be small or negative and y_t large, exactly as the official kernel and the naive reference compute it.
The kernel evaluates the same sums (no NaN or inf while |w| L is in range above); tests cover w n up to ~6.

Parallel layout (``_Plan``). Tiles are aligned with the official chunks, so that only P and F cross tile
boundaries: a *segment* is g = tile_len // n whole chunks when n <= tile_len (one tile), else one chunk cut
into p tiles of ceil(n / p) tokens that one program walks in a loop. Segments number ceil(T / n / g) <= 32.
The grid is (batch, channel blocks of ``block_c``, segments); three ``pallas_call``s per pass:

1. ``summary``: each segment's P and F totals (and, when p > 1, the suffix of F inside the segment at
   each tile, walking the tiles backwards);
2. ``combine``: one program per (batch, channel block) scans the <= 32 segment totals both ways;
3. ``output``: each segment walks its tiles forwards from the incoming states and writes y.

Backward: with alpha_t = g_t / D_t and beta_t = -alpha_t y_t, dv_m = e^{k_m} X^a_m and dk_m = v_m dv_m +
e^{k_m} X^b_m, where X_m = sum_t f(t, m) c_t is the transposed operator: its pieces are F' (earlier rows,
forward), P' (later rows), Q' and S' (later rows of the same chunk, restarting at chunk ends); dw carries
d/dw of each piece (forward-mode tangents of the recurrences) and du = sum_t e^{u + k_t}(alpha_t v_t + beta_t).
The forward pass saves y, the scaled reciprocal denominators 1 / D_t and one reference exponent per tile;
the backward summary reads (g, y, 1/D) and the backward output rereads (k, v, g) and recomputes the forward
tile instead of reading y and 1/D again. o_t (the scale of EPS) is held constant for differentiation.

Traffic (float32 array-equivalents per token and channel): token arrays alone, forward 5 (k, v read twice, y
written) and a training step 14 (forward 6 with 1/D; backward summary 3; backward output 5); the segment
states add 24 (forward) and 46 (backward) floats per segment, i.e. about 0.96 and 1.84 at T = 784 (segments
of 25 tokens), and segments of several tiles add 13 floats per tile: ``traffic_summary`` counts them.

Lowering: Triton-backed Pallas on GPU (``CompilerParams`` from ``jax.experimental.pallas.triton``); arrays
inside the kernels are rows of ``block_c`` channels (a power of two) and time indices are scalars, so T is
arbitrary. Elsewhere the same code runs in Pallas interpret mode (with shorter default tiles, which keep
XLA's compile of the unrolled rows quick; results do not depend on the tiling beyond float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .wkv_spec import EMPTY_EXPONENT as _EMPTY
from .wkv_spec import EPS, check_inputs, chunk_length

__all__ = ["bi_wkv_pallas", "default_interpret", "plan_summary", "traffic_summary"]

_LOG2E = 1.4426950408889634
_DEFAULT_TILE_LEN = 16  # compiled: rows per tile (registers and Triton compile time grow with it)
_DEFAULT_TILE_LEN_INTERPRET = 8  # interpret mode: short unrolled tiles compile quickly in XLA
_DEFAULT_BLOCK_C = 32
# Lower bound of a tile's reference exponent: finite, and far enough above EMPTY that 2^(EMPTY - kappa) is 0.
_KAPPA_FLOOR = -1e29
# Clamp of rescaling exponents (log2): 2^100 times a value that underflowed stays finite.
_RESCALE_CAP = 100.0
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Test hook: run the compiled path's unrolled, row-at-a-time code in interpret mode too (tests set it; slow to
# compile in XLA for long tiles).
_UNROLL_IN_INTERPRETER = False


def default_interpret() -> bool:
    """``interpret=None`` resolves to this: compiled on GPU backends, Pallas interpret mode elsewhere."""
    return jax.default_backend() != "gpu"


# ------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class _Plan:
    official: bool
    batch: int
    tokens: int
    channels: int
    block_c: int
    tile_len: int
    interpret: bool
    unrolled: bool = False  # interpret mode only: see _UNROLL_IN_INTERPRETER

    @property
    def looped(self) -> bool:
        """Rows of a tile run in a loop over (rows, block_c) arrays (interpret mode), else unrolled."""
        return self.interpret and not self.unrolled

    @property
    def chunk(self) -> int:  # official chunk length n (semantics)
        return chunk_length(self.tokens)

    @property
    def num_chunks(self) -> int:
        return -(-self.tokens // self.chunk)

    @property
    def sub(self) -> int:  # p: tiles per segment
        return 1 if self.chunk <= self.tile_len else -(-self.chunk // self.tile_len)

    @property
    def chunks_per_segment(self) -> int:  # g
        return max(1, self.tile_len // self.chunk) if self.sub == 1 else 1

    @property
    def rows(self) -> int:  # L: rows per tile
        if self.sub == 1:
            return min(self.chunks_per_segment * self.chunk, self.tokens)
        return -(-self.chunk // self.sub)

    @property
    def stride(self) -> int:  # tokens per segment
        return self.chunks_per_segment * self.chunk

    @property
    def num_segments(self) -> int:
        return -(-self.num_chunks // self.chunks_per_segment)

    @property
    def num_cblocks(self) -> int:
        return -(-self.channels // self.block_c)

    @property
    def num_warps(self) -> int:
        return max(1, min(4, self.block_c // 32))

    def starts(self, j: Any) -> list[Any]:
        """Per row of tile j of a segment: True / False / a traced bool, whether it starts an official chunk."""
        if not self.official:
            return [False] * self.rows
        if self.sub == 1:
            return [i % self.chunk == 0 for i in range(self.rows)]
        return [j == 0] + [False] * (self.rows - 1)


def _tile_len_default(interpret: bool) -> int:
    return _DEFAULT_TILE_LEN_INTERPRET if interpret else _DEFAULT_TILE_LEN


def _default_block_c(channels: int) -> int:
    return min(_DEFAULT_BLOCK_C, pl.next_power_of_2(channels))


def plan_summary(tokens: int, channels: int, *, tile_len: int | None = None, block_c: int | None = None,
                 interpret: bool = False) -> dict:
    """Tiling the kernels use for (T, C): chunk n, segments, tiles per segment p, rows per tile, grid."""
    plan = _Plan(True, 1, tokens, channels, block_c or _default_block_c(channels),
                 tile_len or _tile_len_default(interpret), interpret)
    return {"chunk": plan.chunk, "segments": plan.num_segments, "tiles_per_segment": plan.sub,
            "rows_per_tile": plan.rows, "block_c": plan.block_c, "num_warps": plan.num_warps,
            "grid_per_batch": (plan.num_cblocks, plan.num_segments)}


def traffic_summary(tokens: int, channels: int, *, tile_len: int | None = None) -> dict:
    """Nominal memory traffic in float32 array-equivalents (B*T*C*4 bytes each), every read and write counted.

    Token arrays: forward reads k, v twice and writes y; training adds 1/D. The backward summary reads g, y,
    1/D; the backward output reads k, v, g and writes dk, dv. Per segment (per ``stride`` tokens): P and F
    states (3 floats each) written, combined (read + written) and read; the backward's two states have 5
    floats. Per tile when segments hold several tiles: F (3) and the backward's Q', S' (10) inside segments.
    """
    plan = _Plan(True, 1, tokens, channels, _default_block_c(channels), tile_len or _DEFAULT_TILE_LEN, False)
    tile, seg = 1.0 / plan.rows, 1.0 / plan.stride
    looped = plan.sub > 1
    forward = 5 + 24 * seg + (6 * tile if looped else 0.0)
    training_forward = forward + 1 + tile  # 1/D and kappa per tile
    bwd_summary = 3 + tile + 10 * seg + (10 * tile if looped else 0.0)
    bwd_combine = 20 * seg
    bwd_output = 5 + 16 * seg + 2 * seg + ((3 + 10) * tile if looped else 0.0)
    backward = bwd_summary + bwd_combine + bwd_output
    r = lambda x: round(x, 2)  # noqa: E731
    return {"forward": r(forward), "training_forward": r(training_forward), "backward": r(backward),
            "training": r(training_forward + backward), "token_arrays_only": 14}


# ------------------------------------------------------------------------------------------ small helpers


def _exp2(x):
    return jnp.exp2(x)


def _index(index: tuple) -> tuple:
    return tuple(jnp.int32(i) if isinstance(i, int) else i for i in index)


def _load(ref, index, mask):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(ref.at[_index(index)], mask=mask, other=0.0).astype(jnp.float32)


def _store(ref, index, value, mask):
    from jax.experimental.pallas import triton as pltriton

    pltriton.store(ref.at[_index(index)], value.astype(ref.dtype), mask=mask)


def _select(flag, a, b):
    """flag may be a Python bool (resolved at trace time) or a traced bool."""
    if flag is True:
        return a
    if flag is False:
        return b
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


class _Sum(NamedTuple):
    """sum_j x_j 2^{e_j} held as 2^{ref} * vals."""

    ref: Any
    vals: tuple


def _empty_sum(zeros, nvals: int) -> _Sum:
    return _Sum(jnp.full_like(zeros, _EMPTY), (zeros,) * nvals)


def _rescale(vals, delta):
    """vals * 2^{delta}, delta <= a small number unless the values underflowed (capped: never inf)."""
    s = _exp2(jnp.minimum(delta, _RESCALE_CAP))
    return tuple(x * s for x in vals)


def _shift(a: _Sum, steps, w2, rate: int) -> _Sum:
    """The sum ``steps`` tokens later (rate -1: decays by e^{-w}, +1: grows); tangents (vals[2:]) follow."""
    vals = a.vals
    if len(vals) == 4:
        x1, x2, d1, d2 = vals
        vals = (x1, x2, d1 + (rate * steps) * x1, d2 + (rate * steps) * x2)
    return _Sum(a.ref + (rate * steps) * w2, vals)


def _merge(a: _Sum, b: _Sum) -> _Sum:
    top = jnp.maximum(a.ref, b.ref)
    sa, sb = _exp2(a.ref - top), _exp2(b.ref - top)
    return _Sum(top, tuple(x * sa + y * sb for x, y in zip(a.vals, b.vals)))


def _with_ref(a: _Sum, ref) -> tuple:
    """a's values relative to 2^{ref} (ref >= a.ref)."""
    return _rescale(a.vals, a.ref - ref)


# ------------------------------------------------------------------------------------- forward tile body


class _Fwd(NamedTuple):
    """Forward state at a token boundary t (exponents in log2 units, exact maxima).

    mg = max_{m<s} k_m - w(t-m); mq = max_{s<=m<t} k_m - w(t-m); hb = max_{s<m<t} k_m + w(t-m);
    ks = k_s + w(t-s); p, a, b = (num, den) of P, Q, S relative to 2^{max(mg, mq)}, 2^{mq}, 2^{hb}.
    """

    mg: Any
    mq: Any
    hb: Any
    ks: Any
    p: tuple
    a: tuple
    b: tuple


def _fwd_empty(zeros) -> _Fwd:
    e = jnp.full_like(zeros, _EMPTY)
    return _Fwd(e, e, e, e, (zeros, zeros), (zeros, zeros), (zeros, zeros))


def _fwd_from_prefix(prefix: _Sum) -> _Fwd:
    """State at a segment start (a chunk start) from the incoming P."""
    zeros = jnp.zeros_like(prefix.ref)
    e = jnp.full_like(zeros, _EMPTY)
    return _Fwd(prefix.ref, e, e, e, prefix.vals, (zeros, zeros), (zeros, zeros))


# ------------------------------------------------------------------------------------------ rows of a tile
# A tile's per-row values are a list of (block_c,) arrays when compiled (rows unrolled: Triton keeps them in
# registers) and one (rows, block_c) array in interpret mode, where the rows run in a fori_loop (XLA compiles
# long unrolled recurrences slowly). The per-row arithmetic is the same code either way.


def _map(plan: _Plan, fn, *seqs):
    if plan.looped:
        return fn(*seqs)
    return [fn(*xs) for xs in zip(*seqs)]


def _get(plan: _Plan, seq, i):
    if plan.looped:
        return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, 0, keepdims=False), seq)
    return seq[i]


def _seq_new(plan: _Plan, rows: int, like):
    if plan.looped:
        return jax.tree.map(lambda x: jnp.zeros((rows,) + x.shape, x.dtype), like)
    return [None] * rows


def _set(plan: _Plan, seq, i, value):
    if plan.looped:
        return jax.tree.map(lambda a, x: lax.dynamic_update_index_in_dim(a, x, i, 0), seq, value)
    seq = list(seq)
    seq[i] = value
    return seq


def _sweep(plan: _Plan, rows: int, body, carry, reverse: bool = False):
    """carry = body(i, carry) for each row (reversed: last row first)."""
    if plan.looped:
        return lax.fori_loop(0, rows, lambda j, c: body(rows - 1 - j if reverse else j, c), carry)
    for i in (reversed(range(rows)) if reverse else range(rows)):
        carry = body(i, carry)
    return carry


def _seq_max(plan: _Plan, seq):
    if plan.looped:
        return jnp.max(seq, axis=0)
    return functools.reduce(jnp.maximum, seq[1:], seq[0])


def _start(plan: _Plan, j, i):
    """Whether row i of tile j of a segment starts an official chunk: a Python bool or a traced bool."""
    if not plan.official:
        return False
    if plan.sub == 1:
        return (i % plan.chunk) == 0
    if isinstance(i, int):
        return (j == 0) if i == 0 else False
    return jnp.logical_and(i == 0, j == 0)


def _not(flag):
    return (not flag) if isinstance(flag, bool) else jnp.logical_not(flag)


class _Tile(NamedTuple):
    """One tile's rows: log2 keys (EMPTY where invalid), values (0 where invalid), valid masks; tile index j."""

    k2: Any
    v: Any
    valid: Any
    j: Any


# ------------------------------------------------------------------------------------- forward tile body


def _forward_tile(plan: _Plan, tile: _Tile, w2, u2, state: _Fwd, fut: _Sum):
    """Run the forward recurrences over one tile; ``fut`` is F at the tile's last row.

    Returns (state at the row after the tile, kappa, rows) with rows = (num, den + eps) per row, relative to
    2^{kappa}.
    """
    num_rows = plan.rows
    pref = jnp.maximum(state.mg, state.mq)
    kappa = jnp.maximum(_seq_max(plan, tile.k2), pref)
    kappa = jnp.maximum(jnp.maximum(kappa, state.hb), jnp.maximum(fut.ref, _KAPPA_FLOOR))
    r, g = _exp2(-w2), _exp2(w2)
    e = _map(plan, lambda k: _exp2(k - kappa), tile.k2)
    ev = _map(plan, lambda a, b: a * b, e, tile.v)
    zeros = jnp.zeros_like(w2)

    # Backward sweep: F (exclusive) per row and, official, the exact future maximum Mf_i = zf + w2 i.
    def back(i, carry):
        f, zf, rows = carry
        rows = _set(plan, rows, i, (f[0], f[1], zf + w2 * i))
        zf = jnp.maximum(zf, _get(plan, tile.k2, i) - w2 * i)
        f = (r * (f[0] + _get(plan, ev, i)), r * (f[1] + _get(plan, e, i)))
        return f, zf, rows

    f0 = _rescale(fut.vals, fut.ref - kappa)
    _, _, f_rows = _sweep(plan, num_rows, back, (f0, fut.ref - w2 * (num_rows - 1),
                                                 _seq_new(plan, num_rows, (zeros,) * 3)), reverse=True)

    # Forward sweep. Maxima in z-form (no rounding piles up): Mg_i = zmg - w2 i, Mq_i = zmq - w2 i,
    # Hb_i = zhb + w2 i, KS_i = zks + w2 i.
    em1, eu = g - 1.0, _exp2(u2)
    wpos = jnp.maximum(w2, 0.0)
    empty = jnp.full_like(w2, _EMPTY)

    def forward(i, carry):
        zmg, zmq, zhb, zks, p, a, b, rows = carry
        k, ei, evi = _get(plan, tile.k2, i), _get(plan, e, i), _get(plan, ev, i)
        fa, fb, mf = _get(plan, f_rows, i)
        start = _start(plan, tile.j, i)
        keep = _not(start)
        if plan.official:
            if start is not False:
                zmg = _select(start, jnp.maximum(zmg, zmq), zmg)
                zmq = _select(start, empty, zmq)
                zhb = _select(start, empty, zhb)
                zks = _select(start, k - w2 * i, zks)
            hr = jnp.maximum(zhb + w2 * i, _select(keep, k, empty))
            top = jnp.maximum(jnp.maximum(zmg, zmq + w2) - w2 * i, mf)
            top = jnp.maximum(jnp.maximum(top, zks + w2 * i), jnp.maximum(hr + wpos, u2 + k))
            eps = EPS * _exp2(top - kappa)
            c1 = _select(keep, em1, zeros)
            c2 = eu - c1
            num = p[0] + fa + c1 * (a[0] - b[0]) + c2 * evi
            den = p[1] + fb + c1 * (a[1] - b[1]) + c2 * ei + eps
        else:
            num = g * (p[0] + fa) + eu * evi
            den = g * (p[1] + fb) + eu * ei
        rows = _set(plan, rows, i, (num, den))
        # Advance to row i + 1.
        p = (r * (p[0] + evi), r * (p[1] + ei))
        if plan.official:
            kr, kg = _select(keep, r, zeros), _select(keep, g, zeros)
            a = (kr * a[0] + r * evi, kr * a[1] + r * ei)
            b = (kg * (b[0] + evi), kg * (b[1] + ei))
            zhb = _select(keep, jnp.maximum(zhb, k - w2 * i), zhb)
        zmq = jnp.maximum(zmq, k + w2 * i)
        return zmg, zmq, zhb, zks, p, a, b, rows

    init = (state.mg, state.mq, state.hb, state.ks, _rescale(state.p, pref - kappa),
            _rescale(state.a, state.mq - kappa), _rescale(state.b, state.hb - kappa),
            _seq_new(plan, num_rows, (zeros, zeros)))
    zmg, zmq, zhb, zks, p, a, b, rows = _sweep(plan, num_rows, forward, init)
    n = float(num_rows)
    mg, mq, hb, ks = zmg - w2 * n, zmq - w2 * n, zhb + w2 * n, zks + w2 * n
    out = _Fwd(mg, mq, hb, ks, _rescale(p, kappa - jnp.maximum(mg, mq)), _rescale(a, kappa - mq),
               _rescale(b, kappa - hb))
    return out, kappa, rows


def _forward_local(plan: _Plan, tile: _Tile, w2):
    """Sums of one tile from empty states: (P at the row after the tile, F at the row before it)."""
    num_rows = plan.rows
    kappa = jnp.maximum(_seq_max(plan, tile.k2), _KAPPA_FLOOR)
    r = _exp2(-w2)
    e = _map(plan, lambda k: _exp2(k - kappa), tile.k2)
    ev = _map(plan, lambda a, b: a * b, e, tile.v)
    zeros = jnp.zeros_like(w2)
    empty = jnp.full_like(w2, _EMPTY)

    def step(sign):
        def body(i, carry):
            x, z = carry
            z = jnp.maximum(z, _get(plan, tile.k2, i) + sign * w2 * i)
            return (r * (x[0] + _get(plan, ev, i)), r * (x[1] + _get(plan, e, i))), z
        return body

    p, zp = _sweep(plan, num_rows, step(+1.0), ((zeros, zeros), empty))
    f, zf = _sweep(plan, num_rows, step(-1.0), ((zeros, zeros), empty), reverse=True)
    p_ref = zp - w2 * num_rows  # max_i k_i - w (L - i)
    f_ref = zf - w2  # max_i k_i - w (i + 1)
    return _Sum(p_ref, _rescale(p, kappa - p_ref)), _Sum(f_ref, _rescale(f, kappa - f_ref))


# ------------------------------------------------------------------------------------------ kernel plumbing


def _channel_mask(plan: _Plan, cblock) -> jax.Array:
    return cblock * plan.block_c + lax.broadcasted_iota(jnp.int32, (plan.block_c,), 0) < plan.channels


def _tile_start(plan: _Plan, s, j):
    return s * plan.stride + j * plan.rows


def _valid(plan: _Plan, s, t0, cmask):
    """Per-row masks of the tile starting at t0 of segment s (rows past the segment or T are invalid)."""
    end = jnp.minimum((s + 1) * plan.stride, plan.tokens)
    if plan.looped:
        rows = t0 + lax.broadcasted_iota(jnp.int32, (plan.rows, plan.block_c), 0)
        return (rows < end) & cmask[None, :]
    return [cmask & (t0 + i < end) for i in range(plan.rows)]


def _load_rows(plan: _Plan, ref, t0, valid):
    """Rows t0 .. t0 + rows - 1 (0 where invalid): a list of row loads (compiled) or one block (interpret)."""
    if plan.looped:
        return _load(ref, (pl.ds(t0, plan.rows), slice(None)), valid)
    return [_load(ref, (t0 + i, slice(None)), ok) for i, ok in enumerate(valid)]


def _store_rows(plan: _Plan, ref, t0, valid, rows) -> None:
    if plan.looped:
        _store(ref, (pl.ds(t0, plan.rows), slice(None)), rows, valid)
        return
    for i, (ok, row) in enumerate(zip(valid, rows)):
        _store(ref, (t0 + i, slice(None)), row, ok)


def _load_tile(plan: _Plan, k_ref, v_ref, s, j, cmask):
    t0 = _tile_start(plan, s, j)
    valid = _valid(plan, s, t0, cmask)
    k2 = _map(plan, lambda k, ok: jnp.where(ok, k * _LOG2E, _EMPTY), _load_rows(plan, k_ref, t0, valid), valid)
    return t0, _Tile(k2, _load_rows(plan, v_ref, t0, valid), valid, j)


def _load_sum(ref, index: int, pos, mask, nvals: int) -> _Sum:
    """Fields [index, index + 1 + nvals) of row ``pos`` of a (rows, fields, block_c) state block."""
    fields = [_load(ref, (pos, index + f, slice(None)), mask) for f in range(1 + nvals)]
    return _Sum(jnp.where(mask, fields[0], _EMPTY), tuple(fields[1:]))


def _store_sum(ref, index: int, pos, value: _Sum, mask) -> None:
    for f, x in enumerate((value.ref,) + tuple(value.vals)):
        _store(ref, (pos, index + f, slice(None)), x, mask)


def _loop(count: int, body, init):
    """``body(j, carry)`` for the tiles j of a segment: inline when there is one, else a loop."""
    if count == 1:
        return body(0, init)
    return lax.fori_loop(0, count, body, init)


# ------------------------------------------------------------------------------------------ forward kernels


def _fwd_summary_kernel(plan: _Plan, w_ref, k_ref, v_ref, seg_ref, *sub_refs):
    s = pl.program_id(2)
    cmask = _channel_mask(plan, pl.program_id(1))
    w2 = _load(w_ref, (slice(None),), cmask) * _LOG2E
    zeros = jnp.zeros_like(w2)
    nxt = (s + 1) * plan.stride  # the first token of the next segment

    def body(jj, carry):
        fcarry, ptot = carry
        j = plan.sub - 1 - jj  # tiles backwards
        t0, tile = _load_tile(plan, k_ref, v_ref, s, j, cmask)
        p_loc, f_loc = _forward_local(plan, tile, w2)
        if sub_refs:
            _store_sum(sub_refs[0], 0, s * plan.sub + j, fcarry, cmask)  # F at the tile's last row
        fcarry = _merge(f_loc, _shift(fcarry, plan.rows, w2, -1))
        ptot = _merge(ptot, _shift(p_loc, nxt - (t0 + plan.rows), w2, -1))
        return fcarry, ptot

    fcarry, ptot = _loop(plan.sub, body, (_empty_sum(zeros, 2), _empty_sum(zeros, 2)))
    _store_sum(seg_ref, 0, s, ptot, cmask)  # P at the next segment's start
    _store_sum(seg_ref, 3, s, fcarry, cmask)  # F at the row before the segment


def _combine(plan: _Plan, w2, load, store, nvals: int):
    """Scan the segment totals: forwards for the P-like piece, backwards for the F-like one."""
    zeros = jnp.zeros_like(w2)
    n = plan.num_segments

    def body(i, carry):
        fwd, bwd = carry
        sf, sb = i, n - 1 - i
        store(0, sf, fwd)
        store(1, sb, bwd)
        fwd = _merge(_shift(fwd, plan.stride, w2, -1), load(0, sf))
        bwd = _merge(_shift(bwd, plan.stride, w2, -1), load(1, sb))
        return fwd, bwd

    lax.fori_loop(0, n, body, (_empty_sum(zeros, nvals), _empty_sum(zeros, nvals)))


def _fwd_combine_kernel(plan: _Plan, w_ref, seg_ref, inc_ref):
    cmask = _channel_mask(plan, pl.program_id(1))
    w2 = _load(w_ref, (slice(None),), cmask) * _LOG2E
    _combine(plan, w2, lambda d, s: _load_sum(seg_ref, 3 * d, s, cmask, 2),
             lambda d, s, x: _store_sum(inc_ref, 3 * d, s, x, cmask), 2)


def _future_at(plan: _Plan, s, j, inc_fut: _Sum, sub_ref, cmask, w2, nvals: int) -> _Sum:
    """F at tile j's last row: the segment's incoming F, shifted, plus the suffix inside the segment."""
    t_last = _tile_start(plan, s, j) + plan.rows - 1
    fut = _shift(inc_fut, (s + 1) * plan.stride - 1 - t_last, w2, -1)
    if sub_ref is not None:
        fut = _merge(fut, _load_sum(sub_ref, 0, s * plan.sub + j, cmask, nvals))
    return fut


def _fwd_output_kernel(plan: _Plan, save: bool, w_ref, u_ref, k_ref, v_ref, inc_ref, *refs):
    refs = list(refs)
    sub_ref = refs.pop(0) if plan.sub > 1 else None
    y_ref = refs.pop(0)
    inv_ref, kappa_ref = refs if save else (None, None)
    s = pl.program_id(2)
    cmask = _channel_mask(plan, pl.program_id(1))
    w2 = _load(w_ref, (slice(None),), cmask) * _LOG2E
    u2 = _load(u_ref, (slice(None),), cmask) * _LOG2E
    prefix = _load_sum(inc_ref, 0, s, cmask, 2)
    inc_fut = _load_sum(inc_ref, 3, s, cmask, 2)

    def body(j, state):
        t0, tile = _load_tile(plan, k_ref, v_ref, s, j, cmask)
        fut = _future_at(plan, s, j, inc_fut, sub_ref, cmask, w2, 2)
        state, kappa, rows = _forward_tile(plan, tile, w2, u2, state, fut)
        nums, dens = (rows[0], rows[1]) if plan.looped else zip(*rows)
        _store_rows(plan, y_ref, t0, tile.valid, _map(plan, lambda a, b: a / b, nums, dens))
        if save:
            _store_rows(plan, inv_ref, t0, tile.valid, _map(plan, lambda b: 1.0 / b, dens))
            _store(kappa_ref, (s * plan.sub + j, slice(None)), kappa, cmask)
        return state

    _loop(plan.sub, body, _fwd_from_prefix(prefix))


# ------------------------------------------------------------------------------------------ backward kernels
# The transposed operator's sums carry (alpha, beta, d alpha / dw, d beta / dw).


def _transposed_local(plan: _Plan, ca, cb, w2):
    """Sums of one tile's c = (alpha, beta) from empty, relative to the tile's reference.

    Returns (P' at the row before the tile, S' at that row (official with p > 1, else None), F' at the row
    after the tile), each as (a, b, da, db).
    """
    r, g = _exp2(-w2), _exp2(w2)
    zeros = jnp.zeros_like(w2)

    def run(rate, reverse):
        fac = r if rate < 0 else g

        def body(i, acc):
            a = fac * (acc[0] + _get(plan, ca, i))
            b = fac * (acc[1] + _get(plan, cb, i))
            return a, b, fac * acc[2] + rate * a, fac * acc[3] + rate * b

        return _sweep(plan, plan.rows, body, (zeros,) * 4, reverse=reverse)

    grow = run(+1, True) if (plan.official and plan.sub > 1) else None
    return run(-1, True), grow, run(-1, False)


def _bwd_summary_kernel(plan: _Plan, w_ref, g_ref, y_ref, inv_ref, kappa_ref, seg_ref, *sub_refs):
    s = pl.program_id(2)
    cmask = _channel_mask(plan, pl.program_id(1))
    w2 = _load(w_ref, (slice(None),), cmask) * _LOG2E
    zeros = jnp.zeros_like(w2)
    nxt = (s + 1) * plan.stride

    def body(jj, carry):
        qc, sc, ftot = carry
        j = plan.sub - 1 - jj
        t0 = _tile_start(plan, s, j)
        valid = _valid(plan, s, t0, cmask)
        gs, ys, inv = (_load_rows(plan, ref, t0, valid) for ref in (g_ref, y_ref, inv_ref))
        ca = _map(plan, lambda a, b: a * b, gs, inv)  # alpha = g / D relative to 2^{-kappa}
        cb = _map(plan, lambda a, y: -a * y, ca, ys)  # beta = -alpha y
        lam = jnp.where(cmask, -_load(kappa_ref, (s * plan.sub + j, slice(None)), cmask), _EMPTY)
        back, up, fwd = _transposed_local(plan, ca, cb, w2)
        if sub_refs:
            _store_sum(sub_refs[0], 0, s * plan.sub + j, qc, cmask)
            _store_sum(sub_refs[0], 5, s * plan.sub + j, sc, cmask)
        qc = _merge(_Sum(lam, back), _shift(qc, plan.rows, w2, -1))
        if up is not None:
            sc = _merge(_Sum(lam, up), _shift(sc, plan.rows, w2, +1))
        ftot = _merge(ftot, _shift(_Sum(lam, fwd), nxt - (t0 + plan.rows), w2, -1))
        return qc, sc, ftot

    empty = _empty_sum(zeros, 4)
    qc, _, ftot = _loop(plan.sub, body, (empty, empty, empty))
    _store_sum(seg_ref, 0, s, ftot, cmask)  # F' (earlier rows) at the next segment's start
    _store_sum(seg_ref, 5, s, qc, cmask)  # P' (later rows) at the row before the segment


def _bwd_combine_kernel(plan: _Plan, w_ref, seg_ref, inc_ref):
    cmask = _channel_mask(plan, pl.program_id(1))
    w2 = _load(w_ref, (slice(None),), cmask) * _LOG2E
    _combine(plan, w2, lambda d, s: _load_sum(seg_ref, 5 * d, s, cmask, 4),
             lambda d, s, x: _store_sum(inc_ref, 5 * d, s, x, cmask), 4)


def _bwd_output_kernel(plan: _Plan, w_ref, u_ref, k_ref, v_ref, g_ref, fwd_inc_ref, bwd_inc_ref, *refs):
    refs = list(refs)
    fsub_ref = refs.pop(0) if plan.sub > 1 else None
    bsub_ref = refs.pop(0) if plan.sub > 1 else None
    dk_ref, dv_ref, dw_ref, du_ref = refs
    s = pl.program_id(2)
    cmask = _channel_mask(plan, pl.program_id(1))
    w2 = _load(w_ref, (slice(None),), cmask) * _LOG2E
    u2 = _load(u_ref, (slice(None),), cmask) * _LOG2E
    zeros = jnp.zeros_like(w2)
    prefix = _load_sum(fwd_inc_ref, 0, s, cmask, 2)
    inc_fut = _load_sum(fwd_inc_ref, 3, s, cmask, 2)
    inc_fwd = _load_sum(bwd_inc_ref, 0, s, cmask, 4)  # F' at the segment start
    inc_back = _load_sum(bwd_inc_ref, 5, s, cmask, 4)  # P' at the segment's last row
    r, g = _exp2(-w2), _exp2(w2)
    em1, eu = g - 1.0, _exp2(u2)

    def body(j, carry):
        state, fprime, dw, du = carry
        t0, tile = _load_tile(plan, k_ref, v_ref, s, j, cmask)
        fut = _future_at(plan, s, j, inc_fut, fsub_ref, cmask, w2, 2)
        state, kappa, rows = _forward_tile(plan, tile, w2, u2, state, fut)
        gs = _load_rows(plan, g_ref, t0, tile.valid)
        nums, dens = (rows[0], rows[1]) if plan.looped else zip(*rows)
        ca = _map(plan, lambda gi, d: gi / d, gs, dens)  # alpha relative to 2^{-kappa}
        cb = _map(plan, lambda a, n, d: -a * (n / d), ca, nums, dens)
        # Incoming transposed sums at the tile's last row (P', Q', S') and at its first row (F').
        t_last = t0 + plan.rows - 1
        back = _shift(inc_back, (s + 1) * plan.stride - 1 - t_last, w2, -1)
        q = s_ = _empty_sum(zeros, 4)
        if bsub_ref is not None:
            q = _load_sum(bsub_ref, 0, s * plan.sub + j, cmask, 4)
            s_ = _load_sum(bsub_ref, 5, s * plan.sub + j, cmask, 4)
            back = _merge(back, q)
        lam = -kappa
        top = jnp.maximum(jnp.maximum(lam, back.ref), jnp.maximum(fprime.ref, jnp.maximum(q.ref, s_.ref)))
        cs = _exp2(lam - top)
        ca = _map(plan, lambda x: x * cs, ca)
        cb = _map(plan, lambda x: x * cs, cb)
        # e^{k_m} relative to the sums' reference: 2^{k2 - kappa} * 2^{kappa + top}.
        phi_scale = _exp2(jnp.minimum(kappa + top, _RESCALE_CAP))
        phi = _map(plan, lambda k: _exp2(k - kappa) * phi_scale, tile.k2)

        # Backward sweep: P', Q', S' (exclusive of the row) into the row sums X; dw of those parts.
        def backward(i, carry):
            bp, qv, sv, dw, xs = carry
            keep = _not(_start(plan, j, i))
            a_i, b_i = _get(plan, ca, i), _get(plan, cb, i)
            phi_i, v_i = _get(plan, phi, i), _get(plan, tile.v, i)
            if plan.official:
                s0, s1 = _select(keep, sv[0], zeros), _select(keep, sv[1], zeros)
                xa, xb = bp[0] + em1 * (qv[0] - s0), bp[1] + em1 * (qv[1] - s1)
                da = bp[2] + em1 * qv[2] + g * qv[0] - _select(keep, em1 * sv[2] + g * sv[0], zeros)
                db = bp[3] + em1 * qv[3] + g * qv[1] - _select(keep, em1 * sv[3] + g * sv[1], zeros)
            else:
                xa, xb = g * bp[0], g * bp[1]
                da, db = g * (bp[2] + bp[0]), g * (bp[3] + bp[1])
            xs = _set(plan, xs, i, (xa, xb))
            dw = dw + phi_i * (v_i * da + db)
            pa, pb = r * (bp[0] + a_i), r * (bp[1] + b_i)
            bp = (pa, pb, r * bp[2] - pa, r * bp[3] - pb)
            if plan.official:
                kr, kg = _select(keep, r, zeros), _select(keep, g, zeros)
                qa, qb = kr * (qv[0] + a_i), kr * (qv[1] + b_i)
                qv = (qa, qb, kr * qv[2] - qa, kr * qv[3] - qb)
                sa, sb = kg * (sv[0] + a_i), kg * (sv[1] + b_i)
                sv = (sa, sb, kg * sv[2] + sa, kg * sv[3] + sb)
            return bp, qv, sv, dw, xs

        bp, qv, sv = (_with_ref(x, top) for x in (back, q, s_))
        _, _, _, dw, xs = _sweep(plan, plan.rows, backward,
                                 (bp, qv, sv, dw, _seq_new(plan, plan.rows, (zeros, zeros))), reverse=True)

        # Forward sweep: F' and the token's own term; outputs.
        def forward(i, carry):
            fp, dw, du, outs = carry
            keep = _not(_start(plan, j, i))
            a_i, b_i = _get(plan, ca, i), _get(plan, cb, i)
            phi_i, v_i = _get(plan, phi, i), _get(plan, tile.v, i)
            xa, xb = _get(plan, xs, i)
            if plan.official:
                coef = eu - _select(keep, em1, zeros)
                xa, xb = xa + fp[0] + coef * a_i, xb + fp[1] + coef * b_i
                gk = _select(keep, g, zeros)
                da, db = fp[2] - gk * a_i, fp[3] - gk * b_i
            else:
                xa, xb = xa + g * fp[0] + eu * a_i, xb + g * fp[1] + eu * b_i
                da, db = g * (fp[2] + fp[0]), g * (fp[3] + fp[1])
            dv_i = phi_i * xa
            outs = _set(plan, outs, i, (v_i * dv_i + phi_i * xb, dv_i))
            dw = dw + phi_i * (v_i * da + db)
            du = du + eu * phi_i * (v_i * a_i + b_i)
            fa, fb = r * (fp[0] + a_i), r * (fp[1] + b_i)
            return (fa, fb, r * fp[2] - fa, r * fp[3] - fb), dw, du, outs

        fp, dw, du, outs = _sweep(plan, plan.rows, forward, (_with_ref(fprime, top), dw, du,
                                                             _seq_new(plan, plan.rows, (zeros, zeros))))
        dks, dvs = (outs[0], outs[1]) if plan.looped else zip(*outs)
        _store_rows(plan, dk_ref, t0, tile.valid, list(dks) if not plan.looped else dks)
        _store_rows(plan, dv_ref, t0, tile.valid, list(dvs) if not plan.looped else dvs)
        return state, _Sum(top, fp), dw, du

    init = (_fwd_from_prefix(prefix), inc_fwd, zeros, zeros)
    _, _, dw, du = _loop(plan.sub, body, init)
    _store(dw_ref, (s, slice(None)), dw, cmask)
    _store(du_ref, (s, slice(None)), du, cmask)


# --------------------------------------------------------------------------------------------- pallas_calls


def _compiler_params(plan: _Plan):
    if plan.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=1)


def _call(plan: _Plan, kernel, grid, in_specs, out_specs, out_shape, *args):
    name = "bi_wkv_" + kernel.func.__name__.strip("_")
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=plan.interpret, compiler_params=_compiler_params(plan), name=name)(*args)


class _Specs:
    """BlockSpecs of the (batch, channel block, segment) grid."""

    def __init__(self, plan: _Plan):
        bc = plan.block_c
        self.channel = pl.BlockSpec((bc,), lambda b, c, s: (c,))
        self.tokens = pl.BlockSpec((None, plan.tokens, bc), lambda b, c, s: (b, 0, c))

        def states(rows, fields):
            return pl.BlockSpec((None, rows, fields, bc), lambda b, c, s: (b, 0, 0, c))

        self.states = states
        self.per_tile = pl.BlockSpec((None, plan.num_segments * plan.sub, bc), lambda b, c, s: (b, 0, c))
        self.per_segment = pl.BlockSpec((None, plan.num_segments, bc), lambda b, c, s: (b, 0, c))
        self.channel2 = pl.BlockSpec((bc,), lambda b, c: (c,))

        def states2(rows, fields):
            return pl.BlockSpec((None, rows, fields, bc), lambda b, c: (b, 0, 0, c))

        self.states2 = states2


def _f32(plan: _Plan, *shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward(plan: _Plan, w, u, k, v, save: bool):
    sp = _Specs(plan)
    grid = (plan.batch, plan.num_cblocks, plan.num_segments)
    ns, nt, c = plan.num_segments, plan.num_segments * plan.sub, plan.channels
    seg_shape = _f32(plan, plan.batch, ns, 6, c)
    summary_outs = [sp.states(ns, 6)]
    summary_shapes = [seg_shape]
    if plan.sub > 1:
        summary_outs.append(sp.states(nt, 3))
        summary_shapes.append(_f32(plan, plan.batch, nt, 3, c))
    summ = _call(plan, functools.partial(_fwd_summary_kernel, plan), grid, [sp.channel, sp.tokens, sp.tokens],
                 summary_outs, summary_shapes, w, k, v)
    seg, fsub = summ[0], (summ[1] if plan.sub > 1 else None)
    inc = _call(plan, functools.partial(_fwd_combine_kernel, plan), grid[:2], [sp.channel2, sp.states2(ns, 6)],
                sp.states2(ns, 6), seg_shape, w, seg)
    in_specs = [sp.channel, sp.channel, sp.tokens, sp.tokens, sp.states(ns, 6)]
    args = [w, u, k, v, inc]
    if fsub is not None:
        in_specs.append(sp.states(nt, 3))
        args.append(fsub)
    out_specs = [sp.tokens]
    shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype)]
    if save:
        out_specs += [sp.tokens, sp.per_tile]
        shapes += [_f32(plan, *k.shape), _f32(plan, plan.batch, nt, c)]
    outs = _call(plan, functools.partial(_fwd_output_kernel, plan, save), grid, in_specs, out_specs, shapes, *args)
    if not save:
        return outs[0]
    y, inv, kappa = outs
    return y, (inv, kappa, inc, fsub)


def _backward(plan: _Plan, w, u, k, v, y, saved, g):
    inv, kappa, fwd_inc, fsub = saved
    sp = _Specs(plan)
    grid = (plan.batch, plan.num_cblocks, plan.num_segments)
    ns, nt, c = plan.num_segments, plan.num_segments * plan.sub, plan.channels
    seg_shape = _f32(plan, plan.batch, ns, 10, c)
    outs, shapes = [sp.states(ns, 10)], [seg_shape]
    if plan.sub > 1:
        outs.append(sp.states(nt, 10))
        shapes.append(_f32(plan, plan.batch, nt, 10, c))
    summ = _call(plan, functools.partial(_bwd_summary_kernel, plan), grid,
                 [sp.channel, sp.tokens, sp.tokens, sp.tokens, sp.per_tile], outs, shapes, w, g, y, inv, kappa)
    seg, bsub = summ[0], (summ[1] if plan.sub > 1 else None)
    inc = _call(plan, functools.partial(_bwd_combine_kernel, plan), grid[:2], [sp.channel2, sp.states2(ns, 10)],
                sp.states2(ns, 10), seg_shape, w, seg)
    in_specs = [sp.channel, sp.channel, sp.tokens, sp.tokens, sp.tokens, sp.states(ns, 6), sp.states(ns, 10)]
    args = [w, u, k, v, g, fwd_inc, inc]
    if plan.sub > 1:
        in_specs += [sp.states(nt, 3), sp.states(nt, 10)]
        args += [fsub, bsub]
    out_specs = [sp.tokens, sp.tokens, sp.per_segment, sp.per_segment]
    shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
              _f32(plan, plan.batch, ns, c), _f32(plan, plan.batch, ns, c)]
    dk, dv, dw, du = _call(plan, functools.partial(_bwd_output_kernel, plan), grid, in_specs, out_specs, shapes,
                           *args)
    return dw.sum(axis=(0, 1)), du.sum(axis=(0, 1)), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bi_wkv(plan: _Plan, w, u, k, v):
    return _forward(plan, w, u, k, v, save=False)


def _bi_wkv_fwd(plan: _Plan, w, u, k, v):
    y, saved = _forward(plan, w, u, k, v, save=True)
    return y, (w, u, k, v, y, saved)


def _bi_wkv_bwd(plan: _Plan, residuals, g):
    w, u, k, v, y, saved = residuals
    dw, du, dk, dv = _backward(plan, w, u, k, v, y, saved, g.astype(y.dtype))
    return dw.astype(w.dtype), du.astype(u.dtype), dk, dv


_bi_wkv.defvjp(_bi_wkv_fwd, _bi_wkv_bwd)


# --------------------------------------------------------------------------------------------- public entry


def bi_wkv_pallas(
    w: jax.Array,
    u: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    variant: str = "official",
    interpret: bool | None = None,
    block_c: int | None = None,
    tile_len: int | None = None,
) -> jax.Array:
    """Bidirectional WKV of k, v (B, T, C) with decay w and bonus u (C,); differentiable in all four.

    ``variant``: ``"official"`` (the shipped CUDA kernel's chunked semantics, models' default) or ``"paper"``.
    ``interpret``: None = compiled (Triton) on GPU, Pallas interpret mode elsewhere. ``block_c``: channels per
    program (power of two; default min(32, next power of two of C)). ``tile_len``: most tokens per tile (any
    positive int; default 16 compiled, 8 interpreted); tiles follow the official 32-way chunks, and neither
    parameter changes the result beyond float rounding. Accumulates in float32; float32, bfloat16 and
    float16 inputs; returns k's dtype.
    """
    w, u, k, v = check_inputs(w, u, k, v, variant=variant, caller="bi_wkv_pallas", dtypes=_SUPPORTED_DTYPES)
    batch, tokens, channels = k.shape
    if block_c is None:
        block_c = _default_block_c(channels)
    if not isinstance(block_c, int) or block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"bi_wkv_pallas: block_c must be a positive power of two (Triton); got {block_c!r}")
    if tile_len is not None and (not isinstance(tile_len, int) or tile_len < 1):
        raise ValueError(f"bi_wkv_pallas: tile_len must be a positive int; got {tile_len!r}")
    if interpret is None:
        interpret = default_interpret()
    if batch == 0 or channels == 0:
        return jnp.zeros(k.shape, k.dtype) + 0.0 * (k + v)  # keeps the gradient path (all zeros)
    plan = _Plan(official=variant == "official", batch=batch, tokens=tokens, channels=channels, block_c=block_c,
                 tile_len=tile_len or _tile_len_default(bool(interpret)), interpret=bool(interpret),
                 unrolled=_UNROLL_IN_INTERPRETER)
    return _bi_wkv(plan, w.astype(jnp.float32), u.astype(jnp.float32), k, v)
