"""Pallas kernel of the bidirectional WKV (forward and backward), variants ``official`` and ``paper``.

Semantics: exactly ``rwkvunet_jax.wkv.bi_wkv(..., impl="naive")`` (see that module's docstring). Per batch
element and channel, y_t = sum_m e^{k_m} f(t, m) v_m / (sum_m e^{k_m} f(t, m) + eps_t).

Linear-time form. For the official variant (chunks of n = ceil(T / 32) tokens starting at s), the weights of
token t split into pieces that are each a linear recurrence over tokens:

* G_t, earlier chunks, sum_{m<s} e^{-w(t-m)} e^{k_m}: decays by e^{-w} per token; at a chunk start it
  absorbs e^{-w} Q (so G + e^{-w} Q is the global exclusive prefix);
* Q_t, same chunk, sum_{s<=m<t} e^{-w(t-m-1)} e^{k_m}: decays by e^{-w}, restarts empty at chunk starts;
* S_t, same-chunk residual, sum_{s<m<t} e^{w(t-m)} e^{k_m}: grows by e^{w}, restarts, weight 1 - e^{w};
* the token itself, e^{k_t}(e^{u} + [t > s](1 - e^{w}));
* F_t = e^{-w} B_t, all later tokens, with B_t = sum_{m>t} e^{-w(m-t-1)} e^{k_m} a reverse recurrence.

The paper variant is Q (never restarted) + self (e^{u}) + B. Every piece is held as (top, age, scaled sums):
its running maximum exponent is ``top + rate * w * age`` (rate -1 for decaying, +1 for growing pieces), so
|k| of 60 and negative w neither overflow nor underflow, and ``age`` counts tokens exactly, so float32
rounding of the reference exponent does not pile up over long sequences. Pieces are combined only at the
output because 1 - e^{w} may be negative.

Parallel layout (``_Plan``): the grid is (batch, channel blocks, time tiles of ``chunk_len`` tokens). Three
``pallas_call``s per pass:

1. ``summary``: each tile runs its recurrences from empty states and writes the end states (a few numbers
   per channel).
2. ``combine``: one program per (batch, channel block) scans the tile summaries in both directions and writes
   each tile's incoming states (tile-level transfer: age by the tile length, or restart if the tile holds a
   chunk start). Cheap: its traffic is a few numbers per tile, and summaries are read in groups so that their
   loads overlap.
3. ``output``: each tile reruns its recurrences from the incoming states. The rows of a tile are unrolled, so
   all its loads are issued at once and the reverse-direction partial sums stay in registers until the
   forward sweep combines them into the output rows. Tiles run in reverse order of pass 1, so the most
   recently read keys and values are still in L2.

The official chunking (n = ceil(T/32)) is semantics and is followed exactly; the time tiles are only the
unit of parallelism, so results do not depend on ``chunk_len`` beyond float rounding.

Backward: with D_t the denominator, alpha_t = g_t / D_t and beta_t = -g_t y_t / D_t,
dv_m = e^{k_m} X^a_m, dk_m = e^{k_m}(v_m X^a_m + X^b_m) where X = sum_t f(t, m) x_t is the *transposed*
operator (the paper's f is symmetric; the official transposed operator has the same pieces with the chunk
structure mirrored, so its segmented sweep runs backwards in time). dw = sum_m e^{k_m}(v_m dX^a_m/dw + dX^b_m/dw),
computed by carrying d/dw twins of every piece (forward-mode for the single scalar w per channel), and
du = sum_t e^{u + k_t}(alpha_t v_t + beta_t). The same three-pass scheme runs on alpha, beta with exponents
-o_t; the forward pass saves only o_t (the largest exponent) and the scaled denominator. As in the naive
definition, o_t (the scale of EPS) is held constant for differentiation.

Lowering: Triton-backed Pallas on GPU (``CompilerParams`` from ``jax.experimental.pallas.triton``; a bare
``pallas_call`` would go to Mosaic GPU on jax >= 0.10). Every array inside the kernels is one row of
``block_c`` channels (a power of two); time indices are scalars, so T is arbitrary. Channels beyond C and
tokens beyond T are masked. Elsewhere the kernels run in Pallas interpret mode, where a tile's rows run in a
``fori_loop`` over (tile, block_c) blocks instead of being unrolled (XLA compiles long unrolled recurrences
very slowly); the per-row arithmetic is the same code, and a test runs the unrolled path interpreted too.

Traffic (forward, per token and channel): k, v are read twice (summary and output passes) and y written
once, plus 8 (official) or 4 (paper) float32 summary numbers per tile, each moved four times (written by
pass 1, read and written by pass 2, read by pass 3); with the default 16-token tiles that is about 7 float32
array-equivalents against the nominal 3 (k, v, y), less where the second read of k, v hits L2. Larger
``chunk_len`` trades summary traffic for registers. Not yet measured on a GPU: benchmarks/gpu_check.sh
prints the numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .wkv_spec import EMPTY_EXPONENT as _EMPTY
from .wkv_spec import EPS, check_inputs, chunk_length

__all__ = ["bi_wkv_pallas", "default_interpret", "plan_summary"]

# Tiles whose summaries the combine pass loads at once (their loads overlap).
_COMBINE_GROUP = 8
_DEFAULT_TILE_FORWARD = 16
_DEFAULT_TILE_BACKWARD = 8
_DEFAULT_BLOCK_C = 32
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_interpret() -> bool:
    """``interpret=None`` resolves to this: compiled on GPU backends, Pallas interpret mode elsewhere."""
    return jax.default_backend() != "gpu"


# ------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one pass (forward operator, or transposed operator with w-tangents)."""

    official: bool
    batch: int
    tokens: int
    channels: int
    tile: int
    block_c: int
    num_warps: int
    interpret: bool
    backward: bool = False
    # Interpret mode normally loops over a tile's rows (XLA compiles unrolled recurrences very slowly); tests
    # set this to run the compiled path's unrolled, row-at-a-time code in the interpreter (small tiles only).
    unrolled: bool = False

    @property
    def looped(self) -> bool:
        return self.interpret and not self.unrolled

    @property
    def chunk(self) -> int:  # official chunk length n (semantics, not tiling)
        return chunk_length(self.tokens)

    @property
    def num_tiles(self) -> int:
        return -(-self.tokens // self.tile)

    @property
    def num_cblocks(self) -> int:
        return -(-self.channels // self.block_c)

    @property
    def transposed(self) -> bool:
        # The official transposed operator restarts at chunk *ends*, i.e. its segmented sweep runs backwards.
        return self.official and self.backward

    @property
    def seg_rates(self) -> tuple[int, ...]:
        return (-1, -1, +1) if self.official else (-1,)  # (G, Q, S) or (Q,)

    @property
    def fields(self) -> int:  # numbers per piece in summaries: (ref, x1, x2, dx1, dx2) or compact (lam, ratio)
        return 5 if self.backward else 2

    @property
    def num_fields(self) -> int:
        return (len(self.seg_rates) + 1) * self.fields


def plan_summary(tokens: int, channels: int, *, chunk_len: int | None = None, block_c: int | None = None) -> dict:
    """Tile sizes, grid and summary sizes the kernels use for (T, C) (for benchmarks and logs)."""
    fwd_tile = chunk_len or _DEFAULT_TILE_FORWARD
    bwd_tile = chunk_len or _DEFAULT_TILE_BACKWARD
    bc = block_c or _default_block_c(channels)
    return {
        "block_c": bc,
        "num_warps": _num_warps(bc),
        "forward_tile": fwd_tile,
        "backward_tile": bwd_tile,
        "forward_grid_per_batch": (-(-channels // bc), -(-tokens // fwd_tile)),
        "backward_grid_per_batch": (-(-channels // bc), -(-tokens // bwd_tile)),
    }


def _default_block_c(channels: int) -> int:
    return min(_DEFAULT_BLOCK_C, pl.next_power_of_2(channels))


def _num_warps(block_c: int) -> int:
    return max(1, min(4, block_c // 32))


# ---------------------------------------------------------------------------------- running-max partial sums


class _Acc(NamedTuple):
    """sum_j x_j e^{a_j} as e^{ref} * vals with ref = top + rate * w * age (rate is static per piece).

    ``vals`` is (x1, x2) or, in the backward pass, (x1, x2, dx1, dx2) where dx = d(sum)/dw * e^{-ref}.
    """

    top: jax.Array
    age: jax.Array
    vals: tuple[jax.Array, ...]


def _empty(zeros: jax.Array, nvals: int) -> _Acc:
    return _Acc(jnp.full_like(zeros, _EMPTY), zeros, (zeros,) * nvals)


def _ref(a: _Acc, w: jax.Array, rate: int) -> jax.Array:
    return a.top + (rate * w) * a.age


def _aged(a: _Acc, steps: Any, rate: int) -> _Acc:
    """Multiply by e^{rate * w * steps} (``steps`` tokens later); the tangent gains rate * steps * sum."""
    vals = a.vals
    if len(vals) == 4:
        x1, x2, d1, d2 = vals
        vals = (x1, x2, d1 + (rate * steps) * x1, d2 + (rate * steps) * x2)
    return _Acc(a.top, a.age + steps, vals)


def _merge(a: _Acc, b: _Acc, w: jax.Array, rate: int) -> _Acc:
    """a + b (same rate); one exponential: the larger side keeps scale 1."""
    diff = _ref(a, w, rate) - _ref(b, w, rate)
    small = jnp.exp(-jnp.abs(diff))
    keep = diff >= 0
    sa = jnp.where(keep, 1.0, small)
    sb = jnp.where(keep, small, 1.0)
    return _Acc(
        jnp.where(keep, a.top, b.top),
        jnp.where(keep, a.age, b.age),
        tuple(x * sa + y * sb for x, y in zip(a.vals, b.vals)),
    )


def _add_term(a: _Acc, e: jax.Array, xs: tuple[jax.Array, jax.Array], w: jax.Array, rate: int) -> _Acc:
    """a + e^{e} (x1, x2); the new term has no w-dependence (zero tangent)."""
    diff = _ref(a, w, rate) - e
    small = jnp.exp(-jnp.abs(diff))
    keep = diff >= 0
    sa = jnp.where(keep, 1.0, small)
    sb = jnp.where(keep, small, 1.0)
    vals = (a.vals[0] * sa + xs[0] * sb, a.vals[1] * sa + xs[1] * sb) + tuple(d * sa for d in a.vals[2:])
    return _Acc(jnp.where(keep, a.top, e), jnp.where(keep, a.age, 0.0), vals)


def _pick(flag: jax.Array, a: _Acc, b: _Acc) -> _Acc:
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def _pack(a: _Acc, w: jax.Array, rate: int, backward: bool) -> list[jax.Array]:
    """Summary fields of a piece; forward sums are positive, so (log-sum, ratio) suffices."""
    ref = _ref(a, w, rate)
    if backward:
        return [ref, *a.vals]
    num, den = a.vals
    present = den > 0
    safe = jnp.where(present, den, 1.0)
    return [jnp.where(present, ref + jnp.log(safe), _EMPTY), jnp.where(present, num / safe, 0.0)]


def _unpack(fields: Sequence[jax.Array], backward: bool) -> _Acc:
    zeros = jnp.zeros_like(fields[0])
    if backward:
        return _Acc(fields[0], zeros, tuple(fields[1:]))
    lam, ratio = fields
    return _Acc(lam, zeros, (ratio, (lam > 0.5 * _EMPTY).astype(jnp.float32)))


# ------------------------------------------------------------------------------------------- token sweeps


class _Row(NamedTuple):
    t: jax.Array  # token index (int32 scalar)
    e: jax.Array  # exponent of the token's term (k, or -o in the backward pass); _EMPTY where invalid
    xs: tuple[jax.Array, jax.Array]  # (v, 1) forward, (alpha, beta) scaled, backward; 0 where invalid


def _flags(plan: _Plan, t: jax.Array) -> dict[str, jax.Array]:
    """Chunk flags of token t (official only): start of a segment in sweep order, residual in/out masks."""
    r = lax.rem(t, jnp.int32(plan.chunk))
    later = r != 0  # t > s
    if plan.transposed:
        start = (r == plan.chunk - 1) | (t == plan.tokens - 1)
        return {"start": start, "res_in": None, "res_out": later, "later": later}
    return {"start": r == 0, "res_in": later, "res_out": None, "later": later}


def _seg_start(plan: _Plan, state: tuple[_Acc, ...], flags: dict, w: jax.Array) -> tuple[_Acc, ...]:
    if not plan.official:
        return state
    g, q, s = state
    empty = _empty(jnp.zeros_like(w), len(q.vals))
    start = flags["start"]
    g = _pick(start, _merge(g, _aged(q, 1.0, -1), w, -1), g)
    return g, _pick(start, empty, q), _pick(start, empty, s)


def _seg_update(plan: _Plan, state: tuple[_Acc, ...], row: _Row, flags: dict, w: jax.Array) -> tuple[_Acc, ...]:
    if not plan.official:
        (q,) = state
        return (_add_term(_aged(q, 1.0, -1), row.e, row.xs, w, -1),)
    g, q, s = state
    g = _aged(g, 1.0, -1)
    q = _add_term(_aged(q, 1.0, -1), row.e, row.xs, w, -1)
    if flags["res_in"] is None:
        s = _add_term(s, row.e, row.xs, w, +1)
    else:
        inc = flags["res_in"]
        s = _add_term(s, jnp.where(inc, row.e, _EMPTY), tuple(jnp.where(inc, x, 0.0) for x in row.xs), w, +1)
    return g, q, _aged(s, 1.0, +1)


def _loop(plan: _Plan, reverse: bool, body: Callable, carry: Any) -> Any:
    """Run ``body(i, carry)`` over the tile's rows: unrolled when compiled (rows stay in registers and all
    loads issue at once), a ``fori_loop`` in interpret mode (XLA's compile time grows steeply with unrolled
    recurrences)."""
    n = plan.tile
    if plan.looped:
        return lax.fori_loop(0, n, lambda s, c: body(n - 1 - s if reverse else s, c), carry)
    for i in range(n - 1, -1, -1) if reverse else range(n):
        carry = body(i, carry)
    return carry


def _seq_empty(plan: _Plan, like: Any) -> Any:
    """Per-row storage: a list (unrolled) or arrays with a leading tile axis (looped)."""
    if plan.looped:
        return jax.tree.map(lambda a: jnp.zeros((plan.tile,) + a.shape, a.dtype), like)
    return [None] * plan.tile


def _seq_get(plan: _Plan, seq: Any, i: Any) -> Any:
    if plan.looped:
        return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, 0, keepdims=False), seq)
    return seq[i]


def _seq_set(plan: _Plan, seq: Any, i: Any, value: Any) -> Any:
    if plan.looped:
        return jax.tree.map(lambda a, x: lax.dynamic_update_index_in_dim(a, x.astype(a.dtype), i, 0), seq, value)
    seq = list(seq)
    seq[i] = value
    return seq


class _Rows(NamedTuple):
    """The tile's token terms: exponent e (k, or -o in the backward pass; _EMPTY where invalid) and values
    xs ((v, 1) forward, scaled (alpha, beta) backward; 0 where invalid), as per-row storage."""

    tile0: jax.Array
    e: Any
    xs: Any

    def get(self, plan: _Plan, i: Any) -> _Row:
        return _Row(self.tile0 + i, _seq_get(plan, self.e, i), tuple(_seq_get(plan, self.xs, i)))


def _seg_sweep(plan, rows: _Rows, state, w, emit=None, out=None):
    """Segmented pieces over the tile in sweep order; ``out = emit(i, state, row, flags, out)`` before each
    update. Returns (final state, out)."""

    def body(i, carry):
        state, out = carry
        row = rows.get(plan, i)
        flags = _flags(plan, row.t) if plan.official else {}
        state = _seg_start(plan, state, flags, w)
        if emit is not None:
            out = emit(i, state, row, flags, out)
        return _seg_update(plan, state, row, flags, w), out

    return _loop(plan, plan.transposed, body, (state, out))


def _plain_sweep(plan, rows: _Rows, acc, w, keep: bool = False):
    """The unsegmented piece (B forward / H transposed) in the opposite direction. Returns (final, exclusive
    partial sums per row or None)."""

    def body(i, carry):
        acc, partials = carry
        if keep:
            partials = _seq_set(plan, partials, i, acc)
        row = rows.get(plan, i)
        return _add_term(_aged(acc, 1.0, -1), row.e, row.xs, w, -1), partials

    return _loop(plan, not plan.transposed, body, (acc, _seq_empty(plan, acc) if keep else None))


def _assemble(plan, state, plain, row, flags, w, u):
    """Combine every piece at one token: returns (top, X1, X2[, dX1, dX2]) scaled by e^{-top}."""
    ew = jnp.exp(w)
    leak = 1.0 - ew  # may be negative
    tangent = plan.backward
    # (reference exponent, coefficient, d coefficient / dw, vals)
    terms = []
    if plan.official:
        g, q, s = state
        terms.append((_ref(g, w, -1), 1.0, 0.0, g.vals))
        terms.append((_ref(q, w, -1), 1.0, 0.0, q.vals))
        out = flags["res_out"]
        s_ref = _ref(s, w, +1)
        if out is None:
            terms.append((s_ref, leak, -ew, s.vals))
        else:
            terms.append((jnp.where(out, s_ref, _EMPTY), jnp.where(out, leak, 0.0), jnp.where(out, -ew, 0.0), s.vals))
        f = _aged(plain, 1.0, -1)  # F = e^{-w} B
        terms.append((_ref(f, w, -1), 1.0, 0.0, f.vals))
        later = flags["later"]
        self_vals = tuple(row.xs) + ((0.0, 0.0) if tangent else ())
        terms.append((row.e + u, 1.0, 0.0, self_vals))
        terms.append((jnp.where(later, row.e, _EMPTY), jnp.where(later, leak, 0.0), jnp.where(later, -ew, 0.0), self_vals))
    else:
        (q,) = state
        terms.append((_ref(q, w, -1), 1.0, 0.0, q.vals))
        terms.append((_ref(plain, w, -1), 1.0, 0.0, plain.vals))
        terms.append((row.e + u, 1.0, 0.0, tuple(row.xs) + ((0.0, 0.0) if tangent else ())))
    top = terms[0][0]
    for ref, *_ in terms[1:]:
        top = jnp.maximum(top, ref)
    acc = None
    for ref, coef, dcoef, vals in terms:
        scale = jnp.exp(ref - top)
        parts = [coef * scale * vals[0], coef * scale * vals[1]]
        if tangent:
            parts += [scale * (coef * vals[2] + dcoef * vals[0]), scale * (coef * vals[3] + dcoef * vals[1])]
        acc = parts if acc is None else [a + p for a, p in zip(acc, parts)]
    return top, acc


# ---------------------------------------------------------------------------------------- kernel helpers


def _index(index: tuple) -> tuple:
    # Python ints become int32 scalars: interpret mode's discharge rules expect arrays or slices.
    return tuple(jnp.int32(i) if isinstance(i, int) else i for i in index)


def _load(ref, index, mask):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(ref.at[_index(index)], mask=mask, other=0.0).astype(jnp.float32)


def _store(ref, index, value, mask):
    from jax.experimental.pallas import triton as pltriton

    pltriton.store(ref.at[_index(index)], value.astype(ref.dtype), mask=mask)


class _TileIO:
    """Token rows of one tile in and out of (T, block_c) blocks, as per-row storage (see ``_loop``).

    Compiled: one (block_c,) row per access: Triton wants power-of-two arrays, and a row load works for any
    T. Interpret mode: one (tile, block_c) access per array, rows indexed inside the loop.
    """

    def __init__(self, plan: _Plan, tile0: jax.Array, cmask: jax.Array):
        self.plan, self.tile0, self.cmask = plan, tile0, cmask
        self._blocks: dict[int, jax.Array] = {}

    def valid(self, i: Any) -> jax.Array:
        """(block_c,) mask of row i, or (tile, block_c) for i=None in interpret mode."""
        if i is None:
            rows = self.tile0 + lax.broadcasted_iota(jnp.int32, (self.plan.tile, self.plan.block_c), 0)
            return (rows < self.plan.tokens) & self.cmask[None, :]
        return self.cmask & (self.tile0 + i < self.plan.tokens)

    def _block(self, ref) -> jax.Array:
        if id(ref) not in self._blocks:
            self._blocks[id(ref)] = _load(ref, (pl.ds(self.tile0, self.plan.tile), slice(None)), self.valid(None))
        return self._blocks[id(ref)]

    def get(self, ref, i: Any) -> jax.Array:
        if self.plan.looped:
            return lax.dynamic_index_in_dim(self._block(ref), i, 0, keepdims=False)
        return _load(ref, (self.tile0 + i, slice(None)), self.valid(i))

    def map(self, fn: Callable, *refs) -> Any:
        """Per-row storage of fn(*(row of each ref), valid), fn elementwise (so it also takes whole blocks)."""
        if self.plan.looped:
            return fn(*(self._block(r) for r in refs), self.valid(None))
        return [fn(*(self.get(r, i) for r in refs), self.valid(i)) for i in range(self.plan.tile)]

    def outputs(self, names: Sequence[str], like: jax.Array) -> dict | None:
        """Carry for ``put``: output blocks in interpret mode, nothing when compiled (rows stored at once)."""
        if self.plan.looped:
            return {n: jnp.zeros((self.plan.tile,) + like.shape, jnp.float32) for n in names}
        return None

    def put(self, out: dict | None, refs: dict, name: str, i: Any, value: jax.Array) -> dict | None:
        if self.plan.looped:
            return {**out, name: lax.dynamic_update_index_in_dim(out[name], value, i, 0)}
        _store(refs[name], (self.tile0 + i, slice(None)), value, self.valid(i))
        return out

    def flush(self, out: dict | None, refs: dict) -> None:
        if self.plan.looped:
            for name, block in out.items():
                _store(refs[name], (pl.ds(self.tile0, self.plan.tile), slice(None)), block, self.valid(None))


def _load_fields(plan: _Plan, ref, j, mask, first: int = 0, count: int | None = None) -> list[jax.Array]:
    """Fields [first, first + count) of tile j's summary row (one (block_c,) row each)."""
    count = plan.num_fields - first if count is None else count
    if plan.looped:
        slab = _load(ref, (j, slice(None), slice(None)), mask[None, :])
        return [slab[f] for f in range(first, first + count)]
    return [_load(ref, (j, f, slice(None)), mask) for f in range(first, first + count)]


def _store_fields(plan: _Plan, ref, j, fields: Sequence[jax.Array], mask, first: int = 0) -> None:
    if plan.looped and first == 0 and len(fields) == plan.num_fields:
        _store(ref, (j, slice(None), slice(None)), jnp.stack(fields), mask[None, :])
        return
    for f, value in enumerate(fields):
        _store(ref, (j, first + f, slice(None)), value, mask)


def _channel_mask(plan: _Plan, cblock: jax.Array) -> jax.Array:
    return cblock * plan.block_c + lax.broadcasted_iota(jnp.int32, (plan.block_c,), 0) < plan.channels


def _grid_ids(plan: _Plan, reverse: bool) -> tuple[jax.Array, jax.Array]:
    """(channel block, tile) of this program; ``reverse`` flips the launch order (see the index maps)."""
    cblock, tile = pl.program_id(1), pl.program_id(2)
    if reverse:
        return plan.num_cblocks - 1 - cblock, plan.num_tiles - 1 - tile
    return cblock, tile


def _unpack_all(plan: _Plan, fields: Sequence[jax.Array]) -> list[_Acc]:
    nf = plan.fields
    return [_unpack(fields[i * nf:(i + 1) * nf], plan.backward) for i in range(len(fields) // nf)]


def _pack_all(plan: _Plan, pieces: Sequence[_Acc], rates: Sequence[int], w: jax.Array) -> list[jax.Array]:
    fields: list[jax.Array] = []
    for piece, rate in zip(pieces, rates):
        fields += _pack(piece, w, rate, plan.backward)
    return fields


def _load_incoming(plan, inc_ref, j, cmask, zeros):
    nv = 4 if plan.backward else 2
    if inc_ref is None:
        return tuple(_empty(zeros, nv) for _ in plan.seg_rates), _empty(zeros, nv)
    pieces = _unpack_all(plan, _load_fields(plan, inc_ref, j, cmask))
    return tuple(pieces[:-1]), pieces[-1]


# ------------------------------------------------------------------------------------------------- kernels


def _forward_rows(io: _TileIO, k_ref, v_ref) -> _Rows:
    e = io.map(lambda k, valid: jnp.where(valid, k, _EMPTY), k_ref)
    xs = io.map(lambda v, valid: (v, valid.astype(jnp.float32)), v_ref)
    return _Rows(io.tile0, e, xs)


def _backward_rows(io: _TileIO, o_ref, d_ref, g_ref, y_ref) -> _Rows:
    """Rows of the transposed operator: exponent -o_t, values (g / d, -g y / d) (D_t = e^{o_t} d_t)."""
    e = io.map(lambda o, valid: jnp.where(valid, -o, _EMPTY), o_ref)

    def values(d, g, y, valid):
        alpha = jnp.where(valid, g / jnp.where(valid, d, 1.0), 0.0)
        return alpha, -alpha * y

    return _Rows(io.tile0, e, io.map(values, d_ref, g_ref, y_ref))


def _summary_kernel(plan: _Plan, w_ref, *refs):
    *in_refs, summ_ref = refs
    cblock, j = _grid_ids(plan, reverse=False)
    cmask = _channel_mask(plan, cblock)
    w = _load(w_ref, (slice(None),), cmask)
    io = _TileIO(plan, j * plan.tile, cmask)
    rows = _backward_rows(io, *in_refs) if plan.backward else _forward_rows(io, *in_refs)
    zeros = jnp.zeros_like(w)
    nv = 4 if plan.backward else 2
    seg, _ = _seg_sweep(plan, rows, tuple(_empty(zeros, nv) for _ in plan.seg_rates), w)
    plain, _ = _plain_sweep(plan, rows, _empty(zeros, nv), w)
    _store_fields(plan, summ_ref, j, _pack_all(plan, (*seg, plain), (*plan.seg_rates, -1), w), cmask)


def _seg_has_start(plan: _Plan, j: jax.Array) -> jax.Array:
    """Whether tile j holds a token where the segmented sweep restarts (official only)."""
    n = jnp.int32(plan.chunk)
    tau = j * plan.tile
    r = lax.rem(tau, n)
    if plan.transposed:  # restarts at the last token of each chunk and at T - 1
        return (tau + (n - 1 - r) < tau + plan.tile) | (tau + plan.tile >= plan.tokens)
    return tau + lax.rem(n - r, n) < tau + plan.tile


def _seg_transfer(plan, j, carry, local, w):
    steps = float(plan.tile)
    if not plan.official:
        (q,) = carry
        return (_merge(_aged(q, steps, -1), local[0], w, -1),)
    g, q, s = carry
    gl, ql, sl = local
    empty = _empty(jnp.zeros_like(w), len(q.vals))
    restart = _seg_has_start(plan, j)
    q_aged = _aged(q, steps, -1)
    g_new = _merge(_aged(g, steps, -1), _pick(restart, _aged(q_aged, 1.0, -1), empty), w, -1)
    g_new = _merge(g_new, gl, w, -1)
    q_new = _merge(_pick(restart, empty, q_aged), ql, w, -1)
    s_new = _merge(_pick(restart, empty, _aged(s, steps, +1)), sl, w, +1)
    return g_new, q_new, s_new


def _combine_kernel(plan: _Plan, w_ref, summ_ref, inc_ref):
    cmask = _channel_mask(plan, pl.program_id(1))
    w = _load(w_ref, (slice(None),), cmask)
    zeros = jnp.zeros_like(w)
    nv = 4 if plan.backward else 2
    nf, nseg = plan.fields, len(plan.seg_rates)
    num_tiles = plan.num_tiles
    # Compiled: a group of tiles per step so that their summary loads overlap. Interpret: one (small HLO).
    group = 1 if plan.looped else _COMBINE_GROUP
    seg_rates, plain_rates = plan.seg_rates, (-1,)

    def seg_transfer(j, carry, local):
        return _seg_transfer(plan, j, carry, local, w)

    def plain_transfer(j, carry, local):
        return (_merge(_aged(carry[0], float(plan.tile), -1), local[0], w, -1),)

    # Both directions in one loop: step ``pos`` visits tile pos forwards and tile NT-1-pos backwards.
    fwd_rates, fwd_first, fwd_transfer = (plain_rates, nseg, plain_transfer) if plan.transposed else (
        seg_rates, 0, seg_transfer)
    bwd_rates, bwd_first, bwd_transfer = (seg_rates, 0, seg_transfer) if plan.transposed else (
        plain_rates, nseg, plain_transfer)

    def body(gi, carry):
        fwd, bwd = carry
        tiles = []
        for i in range(group):
            pos = gi * group + i
            valid = (pos < num_tiles) & cmask
            jf, jb = pos, num_tiles - 1 - pos
            local_f = _unpack_all(plan, _load_fields(plan, summ_ref, jf, valid, fwd_first * nf, len(fwd_rates) * nf))
            local_b = _unpack_all(plan, _load_fields(plan, summ_ref, jb, valid, bwd_first * nf, len(bwd_rates) * nf))
            tiles.append((valid, jf, jb, local_f, local_b))
        for valid, jf, jb, local_f, local_b in tiles:
            _store_fields(plan, inc_ref, jf, _pack_all(plan, fwd, fwd_rates, w), valid, fwd_first * nf)
            _store_fields(plan, inc_ref, jb, _pack_all(plan, bwd, bwd_rates, w), valid, bwd_first * nf)
            fwd = fwd_transfer(jf, fwd, local_f)
            bwd = bwd_transfer(jb, bwd, local_b)
        return fwd, bwd

    init = (tuple(_empty(zeros, nv) for _ in fwd_rates), tuple(_empty(zeros, nv) for _ in bwd_rates))
    lax.fori_loop(0, -(-num_tiles // group), body, init)


def _forward_output_kernel(plan: _Plan, has_incoming: bool, save: bool, w_ref, u_ref, k_ref, v_ref, *refs):
    refs = list(refs)
    inc_ref = refs.pop(0) if has_incoming else None
    names = ("y", "o", "d") if save else ("y",)
    out_refs = dict(zip(names, refs))
    cblock, j = _grid_ids(plan, reverse=True)
    cmask = _channel_mask(plan, cblock)
    w = _load(w_ref, (slice(None),), cmask)
    u = _load(u_ref, (slice(None),), cmask)
    io = _TileIO(plan, j * plan.tile, cmask)
    rows = _forward_rows(io, k_ref, v_ref)
    seg, plain = _load_incoming(plan, inc_ref, j, cmask, jnp.zeros_like(w))
    _, partials = _plain_sweep(plan, rows, plain, w, keep=True)
    eps = EPS if plan.official else 0.0

    def emit(i, state, row, flags, out):
        top, (num, den) = _assemble(plan, state, _seq_get(plan, partials, i), row, flags, w, u)
        den = den + eps
        out = io.put(out, out_refs, "y", i, num / den)
        if save:
            out = io.put(out, out_refs, "o", i, top)
            out = io.put(out, out_refs, "d", i, den)
        return out

    _, out = _seg_sweep(plan, rows, seg, w, emit, io.outputs(names, w))
    io.flush(out, out_refs)


def _backward_output_kernel(plan: _Plan, has_incoming: bool, w_ref, u_ref, k_ref, v_ref, o_ref, d_ref, g_ref,
                            y_ref, *refs):
    refs = list(refs)
    inc_ref = refs.pop(0) if has_incoming else None
    dk_ref, dv_ref, dw_ref, du_ref = refs
    out_refs = {"dk": dk_ref, "dv": dv_ref}
    cblock, j = _grid_ids(plan, reverse=True)
    cmask = _channel_mask(plan, cblock)
    w = _load(w_ref, (slice(None),), cmask)
    u = _load(u_ref, (slice(None),), cmask)
    io = _TileIO(plan, j * plan.tile, cmask)
    rows = _backward_rows(io, o_ref, d_ref, g_ref, y_ref)
    seg, plain = _load_incoming(plan, inc_ref, j, cmask, jnp.zeros_like(w))
    _, partials = _plain_sweep(plan, rows, plain, w, keep=True)

    def emit(i, state, row, flags, carry):
        out, dw, du = carry
        top, (x1, x2, d1, d2) = _assemble(plan, state, _seq_get(plan, partials, i), row, flags, w, u)
        valid = io.valid(i)
        k, v = io.get(k_ref, i), io.get(v_ref, i)
        # k_m + top <= 0 up to rounding (o_t bounds every exponent); the clamp only guards masked lanes.
        scale = jnp.where(valid, jnp.exp(jnp.minimum(k + top, 80.0)), 0.0)
        out = io.put(out, out_refs, "dv", i, scale * x1)
        out = io.put(out, out_refs, "dk", i, scale * (v * x1 + x2))
        dw = dw + scale * (v * d1 + d2)
        # d/du: only the token's own term e^{u + k_t}; alpha_t = e^{-o_t} x1 (row.e = -o_t).
        self_scale = jnp.where(valid, jnp.exp(jnp.minimum(u + k + row.e, 80.0)), 0.0)
        du = du + self_scale * (v * row.xs[0] + row.xs[1])
        return out, dw, du

    zeros = jnp.zeros_like(w)
    _, (out, dw, du) = _seg_sweep(plan, rows, seg, w, emit, (io.outputs(("dk", "dv"), w), zeros, zeros))
    io.flush(out, out_refs)
    _store(dw_ref, (j, slice(None)), dw, cmask)
    _store(du_ref, (j, slice(None)), du, cmask)


# --------------------------------------------------------------------------------------------- pallas_calls


def _compiler_params(plan: _Plan):
    if plan.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=1)


def _specs(plan: _Plan, reverse: bool):
    """BlockSpec factories for the (batch, channel block, tile) grid; ``reverse`` flips the launch order."""
    nb, nc = plan.batch, plan.num_cblocks

    def b_(b):
        return nb - 1 - b if reverse else b

    def c_(c):
        return nc - 1 - c if reverse else c

    bc = plan.block_c
    channel = pl.BlockSpec((bc,), lambda b, c, j: (c_(c),))
    tokens = pl.BlockSpec((None, plan.tokens, bc), lambda b, c, j: (b_(b), 0, c_(c)))
    per_tile = pl.BlockSpec((None, plan.num_tiles, bc), lambda b, c, j: (b_(b), 0, c_(c)))
    summary = pl.BlockSpec((None, plan.num_tiles, plan.num_fields, bc), lambda b, c, j: (b_(b), 0, 0, c_(c)))
    return channel, tokens, per_tile, summary


def _call(plan: _Plan, kernel, grid, in_specs, out_specs, out_shape, *args):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=plan.interpret,
        compiler_params=_compiler_params(plan),
        name="bi_wkv_" + kernel.func.__name__.strip("_"),
    )(*args)


def _incoming(plan: _Plan, w: jax.Array, inputs: Sequence[jax.Array]) -> jax.Array | None:
    """Passes 1 and 2: every tile's incoming states (None when there is a single tile)."""
    if plan.num_tiles == 1:
        return None
    grid = (plan.batch, plan.num_cblocks, plan.num_tiles)
    channel, tokens, _, summary = _specs(plan, reverse=False)
    shape = jax.ShapeDtypeStruct((plan.batch, plan.num_tiles, plan.num_fields, plan.channels), jnp.float32)
    summ = _call(plan, functools.partial(_summary_kernel, plan), grid,
                 [channel] + [tokens] * len(inputs), summary, shape, w, *inputs)
    channel2 = pl.BlockSpec((plan.block_c,), lambda b, c: (c,))
    summary2 = pl.BlockSpec((None, plan.num_tiles, plan.num_fields, plan.block_c), lambda b, c: (b, 0, 0, c))
    return _call(plan, functools.partial(_combine_kernel, plan), (plan.batch, plan.num_cblocks),
                 [channel2, summary2], summary2, shape, w, summ)


def _forward(plan: _Plan, w, u, k, v, save: bool):
    inc = _incoming(plan, w, (k, v))
    grid = (plan.batch, plan.num_cblocks, plan.num_tiles)
    channel, tokens, _, summary = _specs(plan, reverse=True)
    in_specs = [channel, channel, tokens, tokens] + ([summary] if inc is not None else [])
    args = (w, u, k, v) + ((inc,) if inc is not None else ())
    shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype)]
    if save:
        shapes += [jax.ShapeDtypeStruct(k.shape, jnp.float32)] * 2
    kernel = functools.partial(_forward_output_kernel, plan, inc is not None, save)
    return _call(plan, kernel, grid, in_specs, [tokens] * len(shapes), shapes, *args)


def _backward(plan: _Plan, w, u, k, v, y, o, d, g):
    inc = _incoming(plan, w, (o, d, g, y))
    grid = (plan.batch, plan.num_cblocks, plan.num_tiles)
    channel, tokens, per_tile, summary = _specs(plan, reverse=True)
    in_specs = [channel, channel] + [tokens] * 6 + ([summary] if inc is not None else [])
    args = (w, u, k, v, o, d, g, y) + ((inc,) if inc is not None else ())
    partial_shape = jax.ShapeDtypeStruct((plan.batch, plan.num_tiles, plan.channels), jnp.float32)
    shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), partial_shape,
              partial_shape]
    kernel = functools.partial(_backward_output_kernel, plan, inc is not None)
    dk, dv, dw, du = _call(plan, kernel, grid, in_specs, [tokens, tokens, per_tile, per_tile], shapes, *args)
    return dw.sum(axis=(0, 1)), du.sum(axis=(0, 1)), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bi_wkv(fplan: _Plan, bplan: _Plan, w, u, k, v):
    return _forward(fplan, w, u, k, v, save=False)[0]


def _bi_wkv_fwd(fplan: _Plan, bplan: _Plan, w, u, k, v):
    y, o, d = _forward(fplan, w, u, k, v, save=True)
    return y, (w, u, k, v, y, o, d)


def _bi_wkv_bwd(fplan: _Plan, bplan: _Plan, residuals, g):
    w, u, k, v, y, o, d = residuals
    dw, du, dk, dv = _backward(bplan, w, u, k, v, y, o, d, g.astype(y.dtype))
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
    chunk_len: int | None = None,
    _unrolled: bool = False,
) -> jax.Array:
    """Bidirectional WKV of k, v (B, T, C) with decay w and bonus u (C,); differentiable in all four.

    ``variant``: ``"official"`` (the shipped CUDA kernel's chunked semantics, models' default) or ``"paper"``.
    ``interpret``: None = compiled (Triton) on GPU, Pallas interpret mode elsewhere. ``block_c``: channels per
    program (power of two; default min(32, next power of two of C)). ``chunk_len``: tokens per time tile (any
    positive int; default 16 forward, 8 backward); neither changes the result beyond float rounding.
    Accumulates in float32; float32, bfloat16 and float16 inputs; returns k's dtype. ``_unrolled`` (tests):
    in interpret mode, run the compiled path's unrolled row-at-a-time code instead of the row loop.
    """
    w, u, k, v = check_inputs(w, u, k, v, variant=variant, caller="bi_wkv_pallas", dtypes=_SUPPORTED_DTYPES)
    batch, tokens, channels = k.shape
    if block_c is None:
        block_c = _default_block_c(channels)
    if not isinstance(block_c, int) or block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"bi_wkv_pallas: block_c must be a positive power of two (Triton); got {block_c!r}")
    if chunk_len is not None and (not isinstance(chunk_len, int) or chunk_len < 1):
        raise ValueError(f"bi_wkv_pallas: chunk_len must be a positive int; got {chunk_len!r}")
    if interpret is None:
        interpret = default_interpret()
    if batch == 0 or channels == 0:
        return jnp.zeros(k.shape, k.dtype) + 0.0 * (k + v)  # keeps the gradient path (all zeros)
    common = dict(official=variant == "official", batch=batch, tokens=tokens, channels=channels,
                  block_c=block_c, num_warps=_num_warps(block_c), interpret=bool(interpret), unrolled=_unrolled)
    fplan = _Plan(tile=chunk_len or _DEFAULT_TILE_FORWARD, backward=False, **common)
    bplan = _Plan(tile=chunk_len or _DEFAULT_TILE_BACKWARD, backward=True, **common)
    return _bi_wkv(fplan, bplan, w, u, k, v)
