"""Pallas kernel of the bidirectional WKV (forward and backward), variants ``official`` and ``paper``.

Semantics: exactly ``rwkvunet_jax.wkv.bi_wkv(..., impl="naive")`` (see that module's docstring), including the
official kernel's EPS * e^{o_t}. Per batch element and channel, y_t = N_t / D_t with N_t = sum_m W[t, m] v_m and
D_t = sum_m W[t, m] + eps_t, W[t, m] = e^{k_m} f(t, m).

Pieces. With r = e^{-w}, g = e^{w} and chunks of n = ceil(T / 32) tokens starting at s (official)::

    P_t = sum_{m<t} e^{k_m} r^{t-m}                                   (all earlier tokens)
    F_t = sum_{m>t} e^{k_m} r^{m-t}                                   (all later tokens)
    B_t = sum_{m<s} e^{k_m} r^{t-m} + sum_{s<=m<t} e^{k_m} r^{t-m-1}  (B_s = P_s, then B_{t+1} = r B_t + e^{k_t})
    S_t = sum_{s<m<t} e^{k_m} g^{t-m}                                 (same chunk)

    official: N_t = B_t + F_t - (g - 1) S_t + (e^u + [t>s](1 - g)) e^{k_t} v_t     (D: v -> 1, plus eps_t)
    paper:    N_t = g (P_t + F_t) + e^u e^{k_t} v_t

(1 - g may be negative, so the pieces are summed only at the output.) o_t, the official kernel's running
maximum that scales EPS, is the max-plus analogue of the same sums: e^{o_t} = max(G_t, H_t, e^{u + k_t}) with
G the largest term of B and H_t = g max(H_{t-1}, e^{k_t}) inside a chunk, H_s = max(e^{k_s}, largest term of F_s);
both are carried with one multiply and one max per token.

Numerics. Inside a tile of L tokens everything is held relative to one reference exponent kappa (the largest
key of the tile and of the incoming sums), so a token costs one exp2 (of k log2 e - kappa) and the recurrences
are multiply-adds by r or g (exponents are base 2: every exp is one hardware ex2). Between tiles a sum travels
as (reference exponent, scaled values) whose reference is its exact largest term. Accuracy: one reference
serves both directions inside a tile, so the kernel matches the dense definition to float32 rounding only while
the two directions' sums stay close enough to share it. With w < 0 (farther tokens weigh more) they
drift apart over the row: up to a row growth max(-w) log2(e) (T + 1) of 20 the kernel meets the tests'
tolerances (worst 0.76 of them, keys up to |k| ~ 50 included), at 24 with such keys and at 32-40 it misses
them by 1.2-1.8 times, and past ~100 the smaller sum vanishes before it is carried to where it dominates
(measured against float64, T = 160-784). ``bi_wkv_pallas`` therefore checks w and u at run time
(``_within_range``: that growth at most 20; for the official variant the same-chunk growth
max(w) log2(e) (n + 1) at most 96, past which that weight overflows float32; u log2(e) at most 96, e^u being one
float32 factor) and computes anything outside by the scan form (``bi_wkv(impl="scan")``: per-token running
references, as accurate as the dense definition in float32 there), under ``lax.cond`` when w and u are traced
(both forms compile, one runs; on GPU the conditional reads its predicate on the host). The models pass w = decay / T: row growth |decay| log2(e), at most ~7 for the
initial decays of -5 to 3.

Official weights for w n > 2. The same-chunk weight e^{-w(d-1)} + (1 - e^w) e^{w d} (token d places back)
turns negative once w d exceeds ~1 and dominates the row once w n exceeds ~2 (decay above ~64): D_t can
then be small or negative and y_t large, exactly as the official kernel and the naive reference compute it.
The kernel evaluates the same sums (no NaN or inf while |w| L is in range above); tests cover w n up to ~6.
The cancellation makes y ill-conditioned there, in float32 for every form: at T = 784 (n = 25) with w = 0.1
(w n = 2.5) the naive form, the scan form and the kernel miss float64 by 5.5, 5.9 and 14 times the tests'
tolerance on y; with w up to 0.14 (w n = 3.6, y up to ~3600) the naive and scan forms by 124 and 145 times.

Parallel layout (``_Plan``). Tiles follow the official chunks: a tile is g = tile_len // n whole chunks, or,
when n > tile_len, one of p = ceil(n / tile_len) parts of a chunk (the paper variant tiles freely). A
*segment* is q consecutive tiles (whole chunks) that one program walks in a loop; there are S = ceil(tiles /
q) <= 32 segments per row, as few as still give about ``_RESIDENT_PROGRAMS`` one-warp programs (all of them
resident on an H100/H200). The grid is (batch, channel blocks of ``block_c``, segments). No combine pass:
each program merges the other segments' totals itself (at most 31 steps, in parallel across programs), so
long T is never a serial walk over tiles: at T = 16384 (chunks of 512) a program walks its own segment only.
Forward: ``summary`` (walks its tiles right to left: each segment's P and F totals and, inside the segment,
F at each tile) and ``output`` (left to right: P, B, S carried, F from the summary; each program first
scans the <= 31 other segments' totals). Backward: ``summary`` (left to right: recomputes D from k, reads g and
y, and writes, per tile, the forward P it carried and the transposed sum F' of earlier rows; per segment the
transposed totals) and ``output`` (right to left: recomputes the forward tile, carries F and the transposed
sums of later rows, writes dk, dv and per-segment dw, du). Traffic: ``traffic_summary``.

Backward: with alpha_t = g_t / D_t and beta_t = -alpha_t y_t, dv_m = e^{k_m} X^a_m and dk_m = v_m dv_m +
e^{k_m} X^b_m, where X_m = sum_t f(t, m) c_t is the transposed operator: F' (earlier rows), P' and B' (later
rows; B' restarts at chunk ends), S' (later rows of the same chunk), each with its forward-mode tangent in w
for dw; du = sum_t e^{u + k_t}(alpha_t v_t + beta_t). o_t (the scale of EPS) is held constant for
differentiation. The compiled backward output rereads its tile's k and v (just read by the same program, so
served by L1/L2) rather than holding them in registers across the reverse sweep.

Footprint. Everything lives in registers: no shared memory (0 bytes per kernel in the report below), one
thread per channel, a tile's rows unrolled (the backward output holds ~4 floats per row of its tile). Scratch
in HBM, float32, per batch element and channel: per segment 6 (forward) and 10 + 2 (backward) floats; per tile
3 (F), 3 (P; 10 when chunks are split) and 5 (F') floats, i.e. ~0.45 floats per token at T = 784.

Measured (``python benchmarks/kernel_report.py --shapes``: Triton IR captured while lowering for CUDA on a CPU,
compiled for sm_90 by the pip triton 3.8 wheel; float32 official; per token and channel; compile in CPU seconds on
2 cores; "floor": the fewest registers, to a multiple of 8, with which ptxas compiles the same PTX without
spilling when capped by ``.maxnreg``, which Pallas's Triton backend cannot ask for; "before": the report's
recorded figures of commit cd26de8)::

    (24, 784, 576), grid 24 x 18 x 2, 1 warp   regs  floor  spill  SASS  EX2  instr/tok  exp/tok  compile s
    forward summary                             127    104      0   655   30       23.5     1.19        2.4
    forward output                              128    128      0  1402   35       53.5     1.24        3.8
    backward summary                            168    160      0  1730   38       64.2     1.36       20.8
    backward output                             254    216      0  3121   66      121.5     2.50       28.1

    target (issue 11)                  before (cd26de8)   now     met
    exp per token, forward                   14.2          2.42   yes
    exp per token, backward                  16.4          3.86   yes (<= 4)
    SASS instr per token, fwd+bwd           930.7        263.1    yes (<= 310)
    max registers per kernel                  255          254    no  (<= 168: backward output; its floor 216)
    spilled bytes                               0            0    yes
    max Triton compile s per kernel         286.0         28.1    yes (<= 30)
    training traffic, f32 arrays             31.0         14.0    yes (<= 14)

    split chunks, 10-row tiles          max regs (kernel)        spill  max compile s
    (24, 3136, 144)                     128 (backward output)        0            9.4
    (2, 16384, 576)                     153 (backward output)        0            9.4

Registers. The backward summary's side chains (the transposed sums and their tangents, needed only at the end
of a tile) are tied to its main recurrence (``_tied``): left free, ptxas computed them last and kept every row's
inputs live (198 registers). The backward output holds its tile's 25 rows through three sweeps: ptxas's
schedule takes 254 registers where 216 would do; ties like the summary's, reading and writing it in blocks of
4-16 rows, two warps per program, reloading v in the second sweep, and 13-row tiles (more than 4 exps per token)
all left it at 247-255 (or made Triton's compile 2-5 times longer). What the 216 hold: four values per row
between sweeps (F; then alpha, beta and the earlier rows' transposed sums: 100 at 25 rows) plus g (25) and the
reread k and v (50), which ptxas loads early. Measured proxies: without the third sweep the floor is still 184;
dropping the third sweep's tangents and dw leaves it at 216; reading g in 9-row blocks only after the first sweep
and rereading k, v in 13-row blocks only after the second brings it to 168, yet ptxas (12.9 and 13.3) still
allocates 255 and Triton's compile grows by ~40% (more memory operations), so the kernel keeps whole-tile reads.
The ~40 integer registers are the first read's row addresses, which the compiler shares with the dk, dv stores
at the tile's end: giving the first read addresses of its own (lane index tied to the incoming F, as the reread's
is) and starting the reread only once the second sweep ends also gives a floor of 168, with whole-tile g and k, v
reread in 13-row blocks (compile 26-31 s); ptxas still allocates 254. Its own schedule runs each sweep's carries
ahead of the rows that use them and loads early (liveness profile of the SASS: 230-250 values live at the peaks);
tying those chains to the rows moved the peak between sweeps but not the count, and made the compile 45 s.
Pallas's Triton backend has no ``maxnreg`` (``CompilerParams``: num_warps, num_stages), and a one-warp program
gains no occupancy between 225 and 255 registers, so ptxas has no reason to stop short of 255.
168 registers is where 12 one-warp programs fit per SM; at this shape the grid itself gives 864 programs, 6.5
per SM, all resident even at 254 registers (8 per SM on 132 SMs), so registers do not limit occupancy here.

Lowering: Triton-backed Pallas on GPU (``CompilerParams`` from ``jax.experimental.pallas.triton``); arrays
inside the kernels are rows of ``block_c`` channels (a power of two) and time indices are scalars, so T is
arbitrary. A tile is read and written as one 2-D block per array (one load or store in the Triton IR, whose
compile time grows with the number of memory operations times the size of the code) and split into rows in
registers. Elsewhere the same code runs in Pallas interpret mode, rows in a loop (shorter default tiles, which
keep XLA's compile quick; results do not depend on the tiling beyond float rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .wkv_spec import EMPTY_EXPONENT as _EMPTY
from .wkv_spec import EPS, NUM_CHUNKS, check_inputs, chunk_length

__all__ = ["bi_wkv_pallas", "default_interpret", "plan_summary", "traffic_summary"]

_LOG2E = 1.4426950408889634
_DEFAULT_TILE_LEN = 28  # compiled: most rows per tile (T = 784: one official chunk of 25 tokens per tile)
_DEFAULT_TILE_LEN_INTERPRET = 8  # interpret mode: short tiles keep XLA's compile of the row loops quick
# Compiled, official chunks longer than _DEFAULT_TILE_LEN (T > 896) split across tiles of at most this many rows.
# A split tile carries more sums (B, S and their transposes between tiles), and at 25-27 rows the backward output
# spills (kernel_report: 544 B at (24, 3136, 144), 588 at (1, 4096, 576), 680 at (2, 16384, 576)). At 10 rows
# no kernel spills at those shapes nor (8, 12544, 64) and (1, 1024, 960) (backward output 128-244 registers, the
# fewest of 9-13 rows at 4 of the 5; 11 and 13 rows spill at some), for ~10% more instructions per token and
# compile times of ~10 s.
_DEFAULT_SPLIT_TILE_LEN = 10
_DEFAULT_BLOCK_C = 32
# Segments per row: as few as still give about this many one-warp programs: 132 SMs x 6 warps (H100/H200;
# all resident even at 255 registers, 8 warps per SM). Fewer segments move fewer per-segment and per-tile
# sums through memory; the official CUDA kernel runs B * C / 32 warps, fewer still.
_RESIDENT_PROGRAMS = 132 * 6
# Lower bound of a tile's reference exponent: finite, and far enough above EMPTY that 2^(EMPTY - kappa) is 0.
_KAPPA_FLOOR = -1e29
# Clamp of rescaling exponents (log2): 2^100 times a value that underflowed stays finite.
_RESCALE_CAP = 100.0
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Decays the kernel takes (log2 units; beyond them bi_wkv_pallas computes the scan form, same values). Row
# growth, max(-w) log2(e) (T + 1): with w < 0 the farther tokens weigh more, and a tile's one reference then sits
# far above the sums of one direction, which lose digits and, past ~100, vanish before they are carried to where
# they dominate (measured against float64: within the tests' tolerances up to 20, 1.2-1.8 times them at 24 with
# large keys and at 32-40, 10^4 times them at 110-150). Official same-chunk growth, max(w) log2(e) (n + 1): the
# weight (1 - e^w) e^{w d} overflows float32 past ~127 inside a chunk (the sums are ill-conditioned long before:
# see "Official weights").
_MAX_ROW_GROWTH = 20.0
_MAX_CHUNK_GROWTH = 96.0
# And the bonus: e^u is one float32 factor (u log2(e) past ~127 overflows; 96 leaves room for its products).
_MAX_BONUS = 96.0
# Compiled: rows read or written after a tile's first sweep move in blocks of this many rows, each when first
# needed (reads) or complete (writes), so that a tile's rows are not all live in registers at once.
_ROW_BLOCK = 16
# The backward summary reads g and y in smaller blocks: the compiler issues a block's loads together, and at
# (24, 784, 576) blocks of 8 rows take its registers from 242 to 198 (for about twice the Triton compile time:
# more memory operations). The backward output reads and writes whole tiles instead: its registers are at the
# cap (254 at (24, 784, 576)) with blocks of 16, 8 or 4 rows alike, and Triton's compile time grows with the
# number of memory operations (its Coalesce pass slices the whole kernel once per load or store; each store is
# a load and a store in the Pallas lowering): whole tiles (and the single reads of _scan_segments) take it
# from 27 to 16 memory operations and its compile time down by about 40%.
_SUMMARY_ROW_BLOCK = 8
# Test hook: run the compiled path's unrolled, row-at-a-time code in interpret mode too (tests set it; slow to
# compile in XLA for long tiles).
_UNROLL_IN_INTERPRETER = False
# Test hook: always take the kernel, whatever the decays (tests of the kernel itself at the edges of its range).
_FORCE_KERNEL = False


def _div(x, n: int):
    """x // n for x >= 0 (a Python int or traced int32). lax.div: jnp's // and % are calls with literal
    operands, which the Triton lowering mis-binds inside a loop (operand types i32 and i1)."""
    return x // n if isinstance(x, int) else lax.div(x, jnp.int32(n))


def _rem(x, n: int):
    """x % n for x >= 0 (see _div)."""
    return x % n if isinstance(x, int) else lax.rem(x, jnp.int32(n))


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
    segments: int | None = None  # requested segments per row (None: from _RESIDENT_PROGRAMS)

    @property
    def looped(self) -> bool:
        """Rows of a tile run in a loop over (rows, block_c) arrays (interpret mode), else unrolled."""
        return self.interpret and not self.unrolled

    @property
    def chunk(self) -> int:  # official chunk length n (semantics)
        return chunk_length(self.tokens)

    @property
    def unit(self) -> int:  # tiles hold whole units (official chunks; single tokens for the paper variant)
        return self.chunk if self.official else 1

    @property
    def per_unit(self) -> int:  # p: tiles per chunk (> 1: chunks split across tiles)
        return -(-self.unit // self.tile_len)

    @property
    def split(self) -> bool:
        return self.per_unit > 1

    @property
    def rows(self) -> int:  # L: rows per tile
        if self.split:
            return -(-self.unit // self.per_unit)
        return min((self.tile_len // self.unit) * self.unit, self.tokens)

    @property
    def num_units(self) -> int:
        return -(-self.tokens // self.unit)

    @property
    def num_tiles(self) -> int:
        return self.num_units * self.per_unit if self.split else -(-self.tokens // self.rows)

    @property
    def num_cblocks(self) -> int:
        return -(-self.channels // self.block_c)

    @property
    def tiles_per_segment(self) -> int:  # q (a multiple of p)
        units = self.num_tiles // self.per_unit
        want = self.segments or -(-_RESIDENT_PROGRAMS // (self.batch * self.num_cblocks))
        want = max(1, min(want, NUM_CHUNKS, units))
        return self.per_unit * -(-units // want)

    @property
    def num_segments(self) -> int:
        return -(-self.num_tiles // self.tiles_per_segment)

    @property
    def tile_slots(self) -> int:  # rows of the per-tile state arrays: every tile a program visits
        return self.num_segments * self.tiles_per_segment

    @property
    def num_warps(self) -> int:
        return max(1, min(4, self.block_c // 32))

    def tile_start(self, tau):
        """First token of tile tau (a Python int or a traced int32)."""
        if self.split:
            return _div(tau, self.per_unit) * self.unit + _rem(tau, self.per_unit) * self.rows
        return tau * self.rows

    def tile_end(self, tau):
        """One past the last valid token of tile tau."""
        if self.split:
            return jnp.minimum((_div(tau, self.per_unit) + 1) * self.unit, self.tokens)
        return jnp.minimum(tau * self.rows + self.rows, self.tokens)

    def seg_start(self, s):
        return self.tile_start(s * self.tiles_per_segment)


def _tile_len_default(interpret: bool, official: bool, tokens: int) -> int:
    if interpret:
        return _DEFAULT_TILE_LEN_INTERPRET
    if official and chunk_length(tokens) > _DEFAULT_TILE_LEN:
        return _DEFAULT_SPLIT_TILE_LEN
    return _DEFAULT_TILE_LEN


def _default_block_c(channels: int) -> int:
    return min(_DEFAULT_BLOCK_C, pl.next_power_of_2(channels))


def _make_plan(official: bool, batch: int, tokens: int, channels: int, *, tile_len: int | None = None,
               block_c: int | None = None, segments: int | None = None, interpret: bool = False,
               unrolled: bool = False) -> _Plan:
    return _Plan(official, batch, tokens, channels, block_c or _default_block_c(channels),
                 tile_len or _tile_len_default(interpret, official, tokens), interpret, unrolled, segments)


def plan_summary(tokens: int, channels: int, *, batch: int = 1, tile_len: int | None = None,
                 block_c: int | None = None, segments: int | None = None, interpret: bool = False) -> dict:
    """Tiling the kernels use for (B, T, C), official variant: chunk n, rows per tile, tiles, segments, grid."""
    plan = _make_plan(True, batch, tokens, channels, tile_len=tile_len, block_c=block_c, segments=segments,
                      interpret=interpret)
    return {"chunk": plan.chunk, "rows_per_tile": plan.rows, "tiles_per_chunk": plan.per_unit,
            "tiles": plan.num_tiles, "tiles_per_segment": plan.tiles_per_segment,
            "segments": plan.num_segments, "block_c": plan.block_c, "num_warps": plan.num_warps,
            "grid": (batch, plan.num_cblocks, plan.num_segments)}


def traffic_summary(tokens: int, channels: int, *, batch: int = 1, tile_len: int | None = None,
                    segments: int | None = None) -> dict:
    """Nominal memory traffic in float32 array-equivalents (B*T*C*4 bytes each), every read and write counted.

    Token arrays: forward summary k, v; forward output k, v, y; backward summary k, g, y; backward output
    k, v, g, dk, dv (13 for a training step). Per tile inside segments: F (3 floats) written by the forward
    summary, read by the forward output and (2) the backward summary; the backward summary's P (3 + 7 when
    chunks are split across tiles) and F' (5) read back by the backward output. Per segment: P and F totals
    (6), the transposed totals (10) and dw, du (2) written once and read by the other segments' programs.
    ``reread_cache`` is the backward output's second read of its own tile's k and v (L1/L2, not DRAM).
    """
    plan = _make_plan(True, batch, tokens, channels, tile_len=tile_len, segments=segments)
    elems = tokens  # per channel and batch element
    inner = plan.num_tiles - plan.num_segments  # tiles whose right neighbour is in the same segment
    split_extra = 7 if plan.split else 0
    per_tile_fwd = 3 + 3  # F written, read by the forward output
    per_tile_bwd = 2 + (3 + split_extra + 5) * 2  # F read by the backward summary; P (+B, S, H) and F' w + r
    S = plan.num_segments
    reads = S * (S - 1)  # each program reads the totals of the S - 1 other segments, one direction each
    fwd_states = 6 * S + 3 * reads  # totals written; the forward output reads P or F (3) of each other segment
    bwd_states = 2 * reads + 3 * reads + 10 * S + 5 * reads + 2 * S  # bwd summary, bwd output; dw, du
    r = lambda x: round(x, 2)  # noqa: E731
    forward = 5 + (per_tile_fwd * inner + fwd_states) / elems
    backward = 8 + (per_tile_bwd * inner + bwd_states) / elems
    return {"forward": r(forward), "backward": r(backward), "training": r(forward + backward),
            "token_arrays_only": 13, "reread_cache": 2}


# ------------------------------------------------------------------------------------------ small helpers


def _exp2(x):
    return jnp.exp2(x)


def _log2(x):
    return jnp.maximum(jnp.log2(x), _EMPTY)


def _int32(x):
    return jnp.int32(x) if isinstance(x, int) else x


def _index(ref, index: tuple) -> tuple:
    """Every start an int32 (whole axes as int32 slices): under jax_enable_x64 Python ints and ``slice(None)``
    would become int64 next to the int32 program ids, which the indexing (dynamic_slice) rejects."""
    out = []
    for axis, i in enumerate(index):
        if isinstance(i, slice):
            if i != slice(None):
                raise ValueError(f"bi_wkv kernel: only whole-axis slices are used here; got {i}")
            i = pl.ds(jnp.int32(0), ref.shape[axis])
        out.append(_int32(i))
    return tuple(out)


def _load(ref, index, mask, other=0.0):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.load(ref.at[_index(ref, index)], mask=mask, other=other).astype(jnp.float32)


def _store(ref, index, value, mask):
    from jax.experimental.pallas import triton as pltriton

    pltriton.store(ref.at[_index(ref, index)], value.astype(ref.dtype), mask=mask)


def _fori(count: int, body, init):
    """lax.fori_loop(0, count, body, init) whose body sees an int32 index (as the program ids), also under
    jax_enable_x64. (Python bounds, not int32 ones: those change the loop's lowering.)"""
    return lax.fori_loop(0, count, lambda j, carry: body(lax.convert_element_type(j, jnp.int32), carry), init)


def _select(flag, a, b):
    """flag may be a Python bool (resolved at trace time) or a traced bool."""
    if flag is True:
        return a
    if flag is False:
        return b
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)


def _tied(values: tuple, dep) -> tuple:
    """values + 0 * dep: the same numbers (unless dep is inf or NaN, which then propagates), computed after dep.

    A scheduling device for the compiled kernels: a side chain that nothing needs until the end of a tile (a
    running tangent, say) is otherwise left by the compiler until the tile's end, keeping every row's inputs to
    it live in registers. Tying the main recurrence to it keeps the two in step. (LLVM and ptxas keep 0 * x, which
    is not 0 for x = inf or NaN: it compiles to one FFMA with the zero register.)
    """
    z = 0.0 * dep
    return tuple(x + z for x in values)


def _not(flag):
    return (not flag) if isinstance(flag, bool) else jnp.logical_not(flag)


class _Sum(NamedTuple):
    """sum_j x_j 2^{e_j} held as 2^{ref} * vals (ref: the largest exponent, or an upper bound near it)."""

    ref: Any
    vals: tuple


def _empty_sum(zeros, nvals: int) -> _Sum:
    return _Sum(jnp.full_like(zeros, _EMPTY), (zeros,) * nvals)


def _rescale(vals, delta):
    """vals * 2^{delta}, delta <= a small number unless the values underflowed (capped: never inf)."""
    s = _exp2(jnp.minimum(delta, _RESCALE_CAP))
    return tuple(x * s for x in vals)


def _shift(a: _Sum, steps, w2, rate: int) -> _Sum:
    """The sum ``steps`` tokens on (rate -1: decays by e^{-w} per token, +1: grows); tangents (vals[2:]) follow."""
    vals = a.vals
    if len(vals) == 4:
        x1, x2, d1, d2 = vals
        vals = (x1, x2, d1 + (rate * steps) * x1, d2 + (rate * steps) * x2)
    return _Sum(a.ref + (rate * steps) * w2, vals)


def _merge(a: _Sum, b: _Sum) -> _Sum:
    # One exp: the larger reference scales by exactly 1 (lax.select, not jnp.where: see _div).
    d = a.ref - b.ref
    a_top = d >= 0
    small = _exp2(-jnp.abs(d))
    one = jnp.ones_like(small)
    sa, sb = lax.select(a_top, one, small), lax.select(a_top, small, one)
    return _Sum(jnp.maximum(a.ref, b.ref), tuple(x * sa + y * sb for x, y in zip(a.vals, b.vals)))


def _with_ref(a: _Sum, ref) -> tuple:
    """a's values relative to 2^{ref} (ref >= a.ref)."""
    return _rescale(a.vals, a.ref - ref)


class _Consts(NamedTuple):
    """Per-program constants of one channel block (log2 units; r = e^{-w}, g = e^{w})."""

    w2: Any
    u2: Any
    r: Any
    g: Any
    eu: Any
    em1: Any  # g - 1
    c1g: Any  # (g - 1) g
    c1gd: Any  # d/dw of (g - 1) g


def _consts(plan: _Plan, wu_ref, cmask) -> _Consts:
    """From the rows w, u of ``wu_ref`` (one (2, block_c) read: every memory operation adds to Triton's compile)."""
    w2, u2 = (x * _LOG2E for x in _load_fields(plan, wu_ref, None, 2, cmask))
    r, g = _exp2(-w2), _exp2(w2)
    return _Consts(w2, u2, r, g, _exp2(u2), g - 1.0, (g - 1.0) * g, (2.0 * g - 1.0) * g)


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


def _seq_new(plan: _Plan, like):
    if plan.looped:
        return jax.tree.map(lambda x: jnp.zeros((plan.rows,) + x.shape, x.dtype), like)
    return [None] * plan.rows


def _set(plan: _Plan, seq, i, value):
    if plan.looped:
        return jax.tree.map(lambda a, x: lax.dynamic_update_index_in_dim(a, x, i, 0), seq, value)
    if isinstance(seq, _RowWriter):
        seq.put(i, value)
        return seq
    seq = list(seq)
    seq[i] = value
    return seq


def _sweep(plan: _Plan, body, carry, reverse: bool = False):
    """carry = body(i, carry) for each row (reversed: last row first)."""
    rows = plan.rows
    if plan.looped:
        return _fori(rows, lambda j, c: body(rows - 1 - j if reverse else j, c), carry)
    for i in (reversed(range(rows)) if reverse else range(rows)):
        carry = body(i, carry)
    return carry


def _seq_max(plan: _Plan, seq):
    if plan.looped:
        return jnp.max(seq, axis=0)
    return functools.reduce(jnp.maximum, seq[1:], seq[0])


def _start(plan: _Plan, jj, i):
    """Whether row i of tile jj of a segment starts an official chunk: a Python bool or a traced bool."""
    if not plan.official:
        return False
    if plan.split:
        if isinstance(i, int) and i > 0:
            return False
        first = _rem(jj, plan.per_unit) == 0
        return first if isinstance(i, int) else jnp.logical_and(i == 0, first)
    return _rem(i, plan.unit) == 0


def _end(plan: _Plan, jj, i):
    """Whether row i is the last row of its official chunk inside the tile (the tile's last row counts)."""
    if not plan.official:
        return False
    last = plan.rows - 1
    if plan.split:
        if isinstance(i, int) and i < last:
            return False
        final = _rem(jj, plan.per_unit) == plan.per_unit - 1
        return final if isinstance(i, int) else jnp.logical_and(i == last, final)
    if isinstance(i, int):
        return i % plan.unit == plan.unit - 1 or i == last
    return jnp.logical_or(_rem(i, plan.unit) == plan.unit - 1, i == last)


class _Tile(NamedTuple):
    """One tile's rows: log2 keys (EMPTY where invalid), values (0 where invalid, or None), valid masks."""

    k2: Any
    v: Any
    valid: Any


class _Left(NamedTuple):
    """Forward sums carried left to right, at a tile's first row: P; and, when official chunks are split
    across tiles, B, S and log2 H of the chunk in progress (ignored at a chunk start)."""

    p: _Sum
    b: _Sum | None = None
    s: _Sum | None = None
    h: Any = None


def _left_empty(plan: _Plan, zeros, nv: int) -> _Left:
    p = _empty_sum(zeros, nv)
    if plan.official and plan.split:
        return _Left(p, p, p, jnp.full_like(zeros, _EMPTY))
    return _Left(p)


def _left_shift(left: _Left, steps, w2) -> _Left:
    if left.b is None:
        return _Left(_shift(left.p, steps, w2, -1))
    return _Left(_shift(left.p, steps, w2, -1), _shift(left.b, steps, w2, -1), _shift(left.s, steps, w2, +1),
                 left.h + steps * w2)


# ------------------------------------------------------------------------------------- forward tile bodies


def _kappa(plan: _Plan, tile: _Tile, left: _Left, fut: _Sum):
    """A tile's reference exponent: its largest key and the references of the sums entering it."""
    kappa = jnp.maximum(jnp.maximum(_seq_max(plan, tile.k2), left.p.ref), jnp.maximum(fut.ref, _KAPPA_FLOOR))
    if left.b is not None:
        kappa = jnp.maximum(kappa, jnp.maximum(jnp.maximum(left.b.ref, left.s.ref), left.h))
    return kappa


def _fwd_tile(plan: _Plan, c: _Consts, tile: _Tile, kappa, left: _Left, fut: _Sum, jj, finish, finish_init,
              out_rows, *, want_left: bool, want_first: bool, tie=None):
    """The forward sums of one tile from the sums entering it (``left`` at row 0, ``fut`` = F at row L - 1).

    Rows carry (num, den) when tile.v is given, else (den,). Each row's x = (num, den + eps) or (den + eps,),
    relative to 2^kappa, goes to ``finish(i, x, e_i, (e_i v_i, e_i), carry) -> (stored, carry)`` as soon as it
    is known, so that no row of sums stays live; ``out_rows`` (None, or from _seq_new / _out_rows) keeps what
    it returns. Returns (out_rows, final carry, the left state at row L or None, F at row -1 or None).

    ``tie(carry)``, when given, is a value of finish's carry that each row's P and B then wait for (see _tied).
    """
    nv = 1 if tile.v is None else 2
    L = plan.rows
    w2, r, g = c.w2, c.r, c.g
    split = left.b is not None
    e = _map(plan, lambda k: _exp2(k - kappa), tile.k2)
    ew = _map(plan, lambda x, v: (x * v, x), e, tile.v) if nv == 2 else _map(plan, lambda x: (x,), e)
    zeros = jnp.zeros_like(w2)
    empty = jnp.full_like(w2, _EMPTY)
    internal = plan.official and not plan.split and plan.rows > plan.unit  # chunk starts after row 0

    # Reverse sweep: phi_i = F_i / r per row; zf = max_{m>i} k2_m - w2 m (F's largest term at chunk starts and
    # F's reference at row -1); zp = max_m k2_m + w2 m (P's reference at row L).
    def back(i, carry):
        phi, zf, zp, rows = carry
        rows = _set(plan, rows, i, (phi, zf) if plan.official else (phi,))
        k = _get(plan, tile.k2, i)
        phi = tuple(r * x + y for x, y in zip(phi, _get(plan, ew, i)))
        if plan.official or want_first:
            zf = jnp.maximum(zf, k - w2 * i)
        if want_left:
            zp = jnp.maximum(zp, k + w2 * i)
        return phi, zf, zp, rows

    phi0 = tuple(x * g for x in _with_ref(fut, kappa))
    like = ((zeros,) * nv, zeros) if plan.official else ((zeros,) * nv,)
    phi_first, zf_all, zp_all, back_rows = _sweep(plan, back, (phi0, empty, empty, _seq_new(plan, like)),
                                                  reverse=True)
    mp0 = _exp2(jnp.minimum(left.p.ref - kappa, _RESCALE_CAP))  # P's largest term at row 0, relative to kappa
    pi0 = tuple(x * mp0 * g for x in left.p.vals)  # pi = P / r
    if split:
        b0 = _with_ref(left.b, kappa)
        sg0 = tuple(x * r for x in _with_ref(left.s, kappa))  # sigma = S / g
        G0 = _exp2(jnp.minimum(left.b.ref - kappa, _RESCALE_CAP))
        H0 = _exp2(jnp.minimum(left.h - kappa, _RESCALE_CAP))
    else:
        b0, sg0, G0, H0 = (zeros,) * nv, (zeros,) * nv, zeros, zeros

    def fwd(i, carry):
        pi, bb, sg, G, H, mp, fc, rows = carry
        ei, ewi = _get(plan, e, i), _get(plan, ew, i)
        if plan.official:
            phi, zf = _get(plan, back_rows, i)
            start = _start(plan, jj, i)
            keep = _not(start)
            if start is not False:
                mf = _exp2(jnp.minimum(jnp.maximum(zf + w2 * i, fut.ref - w2 * (L - 1 - i)) - kappa, _RESCALE_CAP))
                bb = _select(start, tuple(r * x for x in pi), bb)
                sg = _select(start, (zeros,) * nv, sg)
                G = _select(start, mp, G)
                H = _select(start, jnp.maximum(ei, mf), g * jnp.maximum(H, ei))
            else:
                H = g * jnp.maximum(H, ei)
            c2 = _select(keep, c.eu - c.em1, c.eu)
            x = tuple(b + r * f - c.c1g * s_ + c2 * y for b, f, s_, y in zip(bb, phi, sg, ewi))
            eps = EPS * jnp.maximum(jnp.maximum(G, H), c.eu * ei)
            x = x[:-1] + (x[-1] + eps,)
        else:
            (phi,) = _get(plan, back_rows, i)
            x = tuple(p + f + c.eu * y for p, f, y in zip(pi, phi, ewi))
        stored, fc = finish(i, x, ei, ewi, fc)
        if tie is not None:
            dep = tie(fc)
            pi = _tied(pi, dep)
            if plan.official:
                bb = _tied(bb, dep)
        if out_rows is not None:
            rows = _set(plan, rows, i, stored)
        pi = tuple(r * p + y for p, y in zip(pi, ewi))
        if plan.official:
            bb = tuple(r * b + y for b, y in zip(bb, ewi))
            # S excludes the chunk's first token: sigma stays 0 past a start row.
            sg = _select(start, (zeros,) * nv, tuple(g * s_ + y for s_, y in zip(sg, ewi)))
            G = jnp.maximum(r * G, ei)
            if internal:  # P's largest term, for the next chunk start in the tile
                mp = r * jnp.maximum(mp, ei)
        return pi, bb, sg, G, H, mp, fc, rows

    pi, bb, sg, G, H, _, fc, rows = _sweep(plan, fwd, (pi0, b0, sg0, G0, H0, mp0, finish_init, out_rows))
    left_out = None
    if want_left:
        pref = jnp.maximum(left.p.ref, zp_all) - w2 * L
        p_out = _Sum(pref, _rescale(tuple(r * x for x in pi), kappa - pref))
        if split:
            bref = kappa + _log2(G)
            sref = kappa + _log2(g * sg[-1])
            left_out = _Left(p_out, _Sum(bref, _rescale(bb, kappa - bref)),
                             _Sum(sref, _rescale(tuple(g * x for x in sg), kappa - sref)), kappa + _log2(H))
        else:
            left_out = _Left(p_out)
    first = None
    if want_first:
        fref = jnp.maximum(zf_all - w2, fut.ref - w2 * L)
        first = _Sum(fref, _rescale(tuple(r * x for x in phi_first), kappa - fref))
    return rows, fc, left_out, first


def _fwd_local(plan: _Plan, c: _Consts, tile: _Tile):
    """Sums of one tile alone: (P at row L, F at row -1), each with its exact largest term as reference."""
    kappa = jnp.maximum(_seq_max(plan, tile.k2), _KAPPA_FLOOR)
    ew = _map(plan, lambda k, v: (_exp2(k - kappa) * v, _exp2(k - kappa)), tile.k2, tile.v)
    zeros = jnp.zeros_like(c.w2)
    empty = jnp.full_like(c.w2, _EMPTY)

    def step(sign):
        def body(i, carry):
            x, z = carry
            z = jnp.maximum(z, _get(plan, tile.k2, i) + sign * c.w2 * i)
            return tuple(c.r * a + b for a, b in zip(x, _get(plan, ew, i))), z
        return body

    p, zp = _sweep(plan, step(+1.0), ((zeros, zeros), empty))
    f, zf = _sweep(plan, step(-1.0), ((zeros, zeros), empty), reverse=True)
    p_ref = zp - c.w2 * plan.rows  # max_i k_i - w (L - i)
    f_ref = zf - c.w2  # max_i k_i - w (i + 1)
    return (_Sum(p_ref, _rescale(tuple(c.r * x for x in p), kappa - p_ref)),
            _Sum(f_ref, _rescale(tuple(c.r * x for x in f), kappa - f_ref)))


# ------------------------------------------------------------------------------------ backward tile bodies
# Transposed sums carry (a, b, da, db): the sums of alpha and beta and their tangents d/dw. A sum X' = X / r
# (or X / g) obeys X'_next = fac X' + c: one multiply-add per token.


def _alpha_beta(x, gi, yi, ok, cs):
    """(alpha, beta) of one row relative to the transposed reference: alpha = g / D, beta = -alpha y."""
    inv = 1.0 / jnp.where(ok, x[-1], 1.0)
    a = gi * cs * inv
    return a, -a * (x[0] * inv if yi is None else yi)


def _prime_from(a: _Sum, ref, g):
    """Transposed sum X and tangent dX relative to 2^ref, as (g X, g (X + dX)) = (X / r, its tangent)."""
    x1, x2, d1, d2 = _with_ref(a, ref)
    return (g * x1, g * x2, g * (x1 + d1), g * (x2 + d2))


def _advance(x, ca, cb, fac, rate: int):
    """One token of X' = fac X' + c with its tangent (d fac / dw = rate fac)."""
    a, b, da, db = x
    return (fac * a + ca, fac * b + cb, fac * (da + rate * a), fac * (db + rate * b))


def _unprime(x, r):
    """(X, dX) from X' = X / r and its tangent: X = r X', dX = r (dX' - X')."""
    a, b, da, db = x
    return (r * a, r * b, r * (da - a), r * (db - b))


def _bwd_local(plan: _Plan, c: _Consts, tile: _Tile, gs, ys, left: _Left, fut: _Sum, fprime: _Sum, jj):
    """Backward summary of one tile: the left state at row L, F' at row L and the tile's own P' at row -1."""
    kappa = _kappa(plan, tile, left, fut)
    lam = jnp.maximum(-kappa, fprime.ref)
    cs = _exp2(-kappa - lam)
    zeros = jnp.zeros_like(c.w2)

    def finish(i, x, ei, ewi, carry):
        fp, ploc, rho = carry
        a, b = _alpha_beta(x, _get(plan, gs, i), _get(plan, ys, i), _get(plan, tile.valid, i), cs)
        k = i + 1.0  # the tile's P' at row -1: sum_i r^{i+1} c_i and its tangent
        ploc = (ploc[0] + rho * a, ploc[1] + rho * b, ploc[2] - k * rho * a, ploc[3] - k * rho * b)
        return None, (_advance(fp, a, b, c.r, -1), ploc, rho * c.r)

    init = (_prime_from(fprime, lam, c.g), (zeros,) * 4, c.r)
    # Tied to the last tangent of the tile's own P' (the end of the side chains): at (24, 784, 576) this takes
    # the compiled kernel from 198 registers to 168 (no spills) for ~3 more instructions per token. Not when
    # chunks are split: at (24, 3136, 144) with 25-row tiles the same tie took it from 232 to 255.
    _, (fp, ploc, _), left_out, _ = _fwd_tile(plan, c, tile, kappa, left, fut, jj, finish, init, None,
                                              want_left=True, want_first=False,
                                              tie=None if plan.split else lambda fc: fc[1][3])
    return left_out, _Sum(lam, _unprime(fp, c.r)), _Sum(lam, ploc)


def _bwd_tile(plan: _Plan, c: _Consts, tile: _Tile, gs, left: _Left, fut: _Sum, fprime: _Sum, right, jj,
              reload, outs):
    """Backward output of one tile. ``right`` = (P', B', S') at row L - 1 (B', S' None unless split).

    ``reload(kappa)``, compiled, returns a function of the row giving (e, e v) again from a second read of k
    and v, so that they need not stay live across the sweeps. Rows of (dk, dv) go to ``outs``. Returns
    (outs, F at row -1, (P', B', S') at row -1, dw, du).
    """
    pright, bright, sright = right
    kappa = _kappa(plan, tile, left, fut)
    lam = jnp.maximum(jnp.maximum(-kappa, fprime.ref), pright.ref)
    if bright is not None:
        lam = jnp.maximum(lam, jnp.maximum(bright.ref, sright.ref))
    cs = _exp2(-kappa - lam)
    # e^{k} relative to the transposed reference, 2^{kappa + lam} (capped), without another exp
    sc = jnp.minimum(1.0 / cs, 2.0 ** _RESCALE_CAP)
    r, g = c.r, c.g
    zeros = jnp.zeros_like(c.w2)

    # Forward sweep (with the forward recompute): alpha, beta; F' (earlier rows) per row; its dw share; du.
    def finish(i, x, ei, ewi, carry):
        fp, dw, du = carry
        a, b = _alpha_beta(x, _get(plan, gs, i), None, _get(plan, tile.valid, i), cs)
        xa, xb, dxa, dxb = _unprime(fp, r) if plan.official else fp
        dw = dw + ewi[0] * dxa + ei * dxb
        du = du + ewi[0] * a + ei * b
        return (a, b, xa, xb), (_advance(fp, a, b, r, -1), dw, du)

    init = (_prime_from(fprime, lam, g), zeros, zeros)
    rows, (_, dw, du), _, first = _fwd_tile(plan, c, tile, kappa, left, fut, jj, finish, init,
                                            _seq_new(plan, (zeros,) * 4), want_left=False, want_first=True)
    if reload is not None:
        erow = reload(kappa)
    else:
        e = _map(plan, lambda k: _exp2(k - kappa), tile.k2)
        ev = _map(plan, lambda x, v: x * v, e, tile.v)
        erow = lambda i, dep: (_get(plan, e, i), _get(plan, ev, i))  # noqa: E731

    # Reverse sweep: P' and, official, B' and S' (later rows); outputs.
    def back(i, carry):
        pp, bp, sp, dw, outs = carry
        a, b, xa, xb = _get(plan, rows, i)
        if plan.official:
            end = _end(plan, jj, i)
            if end is not False:
                bp = _select(end, _unprime(pp, r), bp)
                sp = _select(end, (zeros,) * 4, sp)
            keep = _not(_start(plan, jj, i))
            # (lax.select on arrays: jnp.where(keep, 1.0, 0.0) is a call with literal operands, which the
            # Triton lowering mis-binds inside a loop)
            kf = (1.0 if keep else 0.0) if isinstance(keep, bool) else lax.select(
                jnp.broadcast_to(keep, zeros.shape), jnp.ones_like(zeros), zeros)
            c2 = c.eu - kf * c.em1
            xa = xa + bp[0] - (kf * c.c1g) * sp[0] + c2 * a
            xb = xb + bp[1] - (kf * c.c1g) * sp[1] + c2 * b
            dxa = bp[2] - kf * (c.c1g * sp[2] + c.c1gd * sp[0] + g * a)
            dxb = bp[3] - kf * (c.c1g * sp[3] + c.c1gd * sp[1] + g * b)
        else:
            xa, xb = xa + pp[0] + c.eu * a, xb + pp[1] + c.eu * b
            dxa, dxb = pp[2], pp[3]
        ei, evi = erow(i, pp[0])
        outs = _set(plan, outs, i, (sc * (evi * xa + ei * xb), sc * (ei * xa)))
        dw = dw + evi * dxa + ei * dxb
        pp = _advance(pp, a, b, r, -1)
        if plan.official:
            bp = _advance(bp, a, b, r, -1)
            sp = _advance(sp, a, b, g, +1)
        return pp, bp, sp, dw, outs

    pp0 = _prime_from(pright, lam, g)
    if bright is not None:
        bp0, sp0 = _with_ref(bright, lam), _with_ref(sright, lam)
        sp0 = (r * sp0[0], r * sp0[1], r * (sp0[2] - sp0[0]), r * (sp0[3] - sp0[1]))  # S' / g and its tangent
    else:
        bp0 = sp0 = (zeros,) * 4
    pp, bp, sp, dw, outs = _sweep(plan, back, (pp0, bp0, sp0, dw, outs), reverse=True)
    right_out = [_Sum(lam, _unprime(pp, r)), None, None]
    if bright is not None:
        right_out[1] = _Sum(lam, bp)
        right_out[2] = _Sum(lam, (g * sp[0], g * sp[1], g * (sp[2] + sp[0]), g * (sp[3] + sp[1])))
    return outs, first, tuple(right_out), sc * dw, c.eu * sc * du


# ------------------------------------------------------------------------------------------ kernel plumbing


def _channel_mask(plan: _Plan, cblock) -> jax.Array:
    return cblock * plan.block_c + lax.broadcasted_iota(jnp.int32, (plan.block_c,), 0) < plan.channels


def _rows_split(x, n: int, width: int) -> list:
    parts = jnp.split(x, x.shape[0], axis=0) if x.shape[0] > 1 else [x]
    return [p.reshape(width) for p in parts[:n]]


def _rows_join(rows: list, padded: int):
    """(padded, width) from rows (stacked in pairs along a new last axis, then transposed back)."""
    xs = list(rows) + [jnp.zeros_like(rows[0])] * (padded - len(rows))
    while len(xs) > 1:
        xs = [jnp.stack([a, b], axis=-1) for a, b in zip(xs[::2], xs[1::2])]
    x = xs[0]
    nb = x.ndim - 1
    return jnp.transpose(x, tuple(range(nb, 0, -1)) + (0,)).reshape(padded, -1)


def _block_index(plan: _Plan, start, count: int, width: int, one=None):
    """Index arrays of rows start .. start + count - 1 (padded to a power of two) x ``width`` lanes.

    Compiled, the lane index is multiplied by a run-time 1 so that Triton sees no contiguity along the lanes:
    it then gives each thread one lane's column of rows (no vectorised load and no shuffle through shared
    memory to split it into rows).
    """
    padded = pl.next_power_of_2(count)
    if one is None:
        one = jnp.minimum(pl.program_id(0), 0) + 1
    rows = start + lax.broadcasted_iota(jnp.int32, (padded, width), 0)
    lanes = lax.broadcasted_iota(jnp.int32, (padded, width), 1) * one
    return padded, rows, lanes


def _load_block(plan: _Plan, ref, start, count: int, row_ok, cmask, prefix=(), other=0.0, one=None) -> list:
    """Rows start .. start + count - 1 of ``ref`` (index ``prefix`` first) as a list of (block_c,) rows."""
    if plan.interpret:
        padded = pl.next_power_of_2(count)
        iota = lax.broadcasted_iota(jnp.int32, (padded, plan.block_c), 0)
        mask = (iota < count) & row_ok(start + iota) & cmask[None, :]
        x = _load(ref, prefix + (pl.ds(start, padded), slice(None)), mask, other)
    else:
        padded, rows, lanes = _block_index(plan, start, count, plan.block_c, one)
        iota = rows - start
        mask = (iota < count) & row_ok(rows) & cmask[None, :]
        x = _load(ref, prefix + (rows, lanes), mask, other)
    return _rows_split(x, count, plan.block_c)


def _store_block(plan: _Plan, ref, start, rows: list, row_ok, cmask, prefix=()) -> None:
    count = len(rows)
    if plan.interpret:
        padded = pl.next_power_of_2(count)
        iota = lax.broadcasted_iota(jnp.int32, (padded, plan.block_c), 0)
        mask = (iota < count) & row_ok(start + iota) & cmask[None, :]
        _store(ref, prefix + (pl.ds(start, padded), slice(None)), _rows_join(rows, padded), mask)
        return
    padded, idx, lanes = _block_index(plan, start, count, plan.block_c)
    mask = (idx - start < count) & row_ok(idx) & cmask[None, :]
    _store(ref, prefix + (idx, lanes), _rows_join(rows, padded), mask)


def _load_tile_rows(plan: _Plan, ref, t0, end, cmask, other=0.0):
    """A tile's rows of one token array: rows list (compiled) or a (rows, block_c) block (interpret)."""
    if plan.looped:
        iota = lax.broadcasted_iota(jnp.int32, (plan.rows, plan.block_c), 0)
        return _load(ref, (pl.ds(t0, plan.rows), slice(None)), (t0 + iota < end) & cmask[None, :], other)
    return _load_block(plan, ref, t0, plan.rows, lambda t: t < end, cmask, other=other)


def _store_tile_rows(plan: _Plan, ref, t0, end, cmask, rows) -> None:
    if plan.looped:
        iota = lax.broadcasted_iota(jnp.int32, (plan.rows, plan.block_c), 0)
        _store(ref, (pl.ds(t0, plan.rows), slice(None)), rows, (t0 + iota < end) & cmask[None, :])
        return
    _store_block(plan, ref, t0, list(rows), lambda t: t < end, cmask)


class _LazyRows:
    """Compiled: a tile's rows of one token array, read in blocks of ``block`` rows when first indexed."""

    def __init__(self, plan: _Plan, ref, t0, end, cmask, other=0.0, fn=None, block: int = _ROW_BLOCK):
        self.args, self.other, self.fn, self.blocks = (plan, ref, t0, end, cmask), other, fn, {}
        self.block = block
        self.dep = None  # compiled: a (block_c,) value that the next block's addresses depend on (see reload)

    def __getitem__(self, i: int):
        plan, ref, t0, end, cmask = self.args
        blk, off = divmod(i, self.block)
        if blk not in self.blocks:
            lo = blk * self.block
            one = None
            if self.dep is not None:
                one = (self.dep == self.dep).astype(jnp.int32)[None, :]
            rows = _load_block(plan, ref, t0 + lo, min(self.block, plan.rows - lo), lambda t: t < end, cmask,
                               other=self.other, one=one)
            self.blocks[blk] = [self.fn(x) for x in rows] if self.fn else rows
        return self.blocks[blk][off]


class _RowWriter:
    """Compiled: rows of one or more token arrays written in blocks of ``block`` rows once complete."""

    def __init__(self, plan: _Plan, refs, t0, end, cmask, block: int = _ROW_BLOCK):
        self.args, self.refs, self.pending, self.block = (plan, t0, end, cmask), refs, {}, block

    def put(self, i: int, value) -> None:
        plan, t0, end, cmask = self.args
        blk = i // self.block
        rows = self.pending.setdefault(blk, {})
        rows[i] = value
        lo, hi = blk * self.block, min((blk + 1) * self.block, plan.rows)
        if len(rows) == hi - lo:
            values = [rows[j] for j in range(lo, hi)]
            for n, ref in enumerate(self.refs):
                part = [x[n] for x in values] if len(self.refs) > 1 else values
                _store_block(plan, ref, t0 + lo, part, lambda t: t < end, cmask)


def _late_rows(plan: _Plan, ref, t0, end, cmask, other=0.0, fn=None, block: int = _ROW_BLOCK):
    """Rows needed only after the tile's first sweep: an array (interpret) or _LazyRows (compiled) read in
    blocks of ``block`` rows."""
    if plan.looped:
        x = _load_tile_rows(plan, ref, t0, end, cmask, other)
        return fn(x) if fn else x
    return _LazyRows(plan, ref, t0, end, cmask, other, fn, block)


def _out_rows(plan: _Plan, refs, t0, end, cmask, like, block: int = _ROW_BLOCK):
    """Where a sweep puts its output rows: an array carried through the loop, or a _RowWriter."""
    if plan.looped:
        return _seq_new(plan, like)
    return _RowWriter(plan, refs, t0, end, cmask, block)


def _flush_rows(plan: _Plan, refs, t0, end, cmask, rows) -> None:
    if plan.looped:
        for n, ref in enumerate(refs):
            _store_tile_rows(plan, ref, t0, end, cmask, rows[n] if len(refs) > 1 else rows)


def _valid_rows(plan: _Plan, t0, end, cmask):
    if plan.looped:
        iota = lax.broadcasted_iota(jnp.int32, (plan.rows, plan.block_c), 0)
        return (t0 + iota < end) & cmask[None, :]
    return [cmask & (t0 + i < end) for i in range(plan.rows)]


def _load_tile(plan: _Plan, k_ref, v_ref, tau, cmask):
    t0, end = plan.tile_start(tau), plan.tile_end(tau)
    valid = _valid_rows(plan, t0, end, cmask)
    # Invalid rows read -inf: 2^(k2 - kappa) is then 0 and they never win a max.
    k2 = _map(plan, lambda k: k * _LOG2E, _load_tile_rows(plan, k_ref, t0, end, cmask, other=-jnp.inf))
    v = _load_tile_rows(plan, v_ref, t0, end, cmask) if v_ref is not None else None
    return t0, end, _Tile(k2, v, valid)


def _load_fields(plan: _Plan, ref, pos, nfields: int, mask) -> list:
    """Fields 0 .. nfields - 1 of row ``pos`` of a (rows, fields, block_c) state block (0 where masked); pos None:
    of a (fields, block_c) block."""
    prefix = () if pos is None else (pos,)
    if plan.interpret:
        return [_load(ref, prefix + (f, slice(None)), mask) for f in range(nfields)]
    return _load_block(plan, ref, 0, nfields, lambda f: f < nfields, mask, prefix=prefix)


def _store_fields(plan: _Plan, ref, pos, fields: list, mask) -> None:
    """Counterpart of _load_fields: one store of all fields."""
    prefix = () if pos is None else (pos,)
    if plan.interpret:
        for f, x in enumerate(fields):
            _store(ref, prefix + (f, slice(None)), x, mask)
        return
    _store_block(plan, ref, 0, fields, lambda f: f < len(fields), mask, prefix=prefix)


def _sums_from(fields, sizes, mask) -> list:
    """Split loaded fields into _Sums of (1 + size) fields each (references EMPTY where masked)."""
    out, i = [], 0
    for n in sizes:
        out.append(_Sum(jnp.where(mask, fields[i], _EMPTY), tuple(fields[i + 1:i + 1 + n])))
        i += 1 + n
    return out


def _fields_of(*sums) -> list:
    return [x for a in sums for x in (a.ref,) + tuple(a.vals)]


def _left_fields(left: _Left) -> list:
    if left.b is None:
        return _fields_of(left.p)
    return _fields_of(left.p, left.b, left.s) + [left.h]


def _left_from(plan: _Plan, fields, mask, nv: int) -> _Left:
    if not (plan.official and plan.split):
        return _Left(*_sums_from(fields, (nv,), mask))
    p, b, s = _sums_from(fields, (nv, nv, nv), mask)
    return _Left(p, b, s, jnp.where(mask, fields[-1], _EMPTY))


def _left_size(plan: _Plan, nv: int) -> int:
    return 1 + nv + ((2 * (1 + nv) + 1) if plan.official and plan.split else 0)


def _loop(count: int, body, init):
    """``body(j, carry)`` for the tiles j of a segment: inline when there is one, else a loop."""
    if count == 1:
        return body(0, init)
    return _fori(count, body, init)


def _scan_segments(plan: _Plan, seg_ref, s, cmask, w2, sizes: tuple, left: int, right: int, keep: int | None = None):
    """The other segments' totals merged into segment s, from ``seg_ref`` (per segment: _Sums of ``sizes`` values).

    Sum ``left`` of each segment s2 < s (held at the first token of segment s2 + 1) arrives at segment s's first
    token, sum ``right`` of each s2 > s (held at the token before segment s2) at its last token; both decay
    towards s. ``keep``: only the last ``keep`` values of each sum. Returns (from the left, from the right).
    """
    n = plan.num_segments
    zeros = jnp.zeros_like(w2)
    acc = (_empty_sum(zeros, keep or sizes[left]), _empty_sum(zeros, keep or sizes[right]))
    if n == 1:
        return acc
    first = [sum(1 + size for size in sizes[:j]) for j in range(len(sizes))]  # field of each sum's reference
    spans = ((first[left], 1 + sizes[left]), (first[right], 1 + sizes[right]))

    def load(sl, sr):
        """Sum ``left`` of segment sl and sum ``right`` of segment sr: one read when compiled (each memory
        operation adds to Triton's compile time)."""
        oks = (sl >= 0, sr < n)
        poss = (jnp.clip(sl, 0, n - 1), jnp.clip(sr, 0, n - 1))
        if plan.interpret:
            parts = [[_load(seg_ref, (pos, f0 + f, slice(None)), cmask & ok) for f in range(cnt)]
                     for pos, ok, (f0, cnt) in zip(poss, oks, spans)]
        else:
            (f0, n0), (f1, n1) = spans
            _, rows, lanes = _block_index(plan, 0, n0 + n1, plan.block_c)
            lower = rows < n0
            pick = lambda a, b: lax.select(lower, jnp.full_like(rows, a), jnp.full_like(rows, b))  # noqa: E731
            mask = (rows < n0 + n1) & lax.select(lower, jnp.broadcast_to(oks[0], rows.shape),
                                                  jnp.broadcast_to(oks[1], rows.shape)) & cmask[None, :]
            fields = _rows_split(_load(seg_ref, (pick(*poss), rows + pick(f0, f1 - n0), lanes), mask), n0 + n1,
                                 plan.block_c)
            parts = [fields[:n0], fields[n0:]]
        sums = [_sums_from(part, (cnt - 1,), cmask & ok)[0] for part, ok, (_, cnt) in zip(parts, oks, spans)]
        return [a if keep is None else _Sum(a.ref, a.vals[-keep:]) for a in sums]

    nxt = plan.seg_start(s + 1)

    def body(i, acc):
        lo, hi = acc
        sl, sr = s - 1 - i, s + 1 + i
        a, b = load(sl, sr)
        lo = _merge(lo, _shift(a, plan.seg_start(s) - plan.seg_start(sl + 1), w2, -1))
        hi = _merge(hi, _shift(b, plan.seg_start(sr) - nxt, w2, -1))
        return lo, hi

    return _fori(n - 1, body, acc)


def _fwd_scan(plan: _Plan, seg_ref, s, cmask, w2, nv: int):
    """P entering segment s (at its first token) and F entering from the right (at its last token); per segment
    the forward summary stores P_tot (P at the first token of the next segment) and F_tot (F at the token
    before the segment)."""
    return _scan_segments(plan, seg_ref, s, cmask, w2, (2, 2), 0, 1, keep=nv)


# ------------------------------------------------------------------------------------------ forward kernels


def _fwd_summary_kernel(plan: _Plan, wu_ref, k_ref, v_ref, seg_ref, *sub_refs):
    s = pl.program_id(2)
    cmask = _channel_mask(plan, pl.program_id(1))
    c = _consts(plan, wu_ref, cmask)
    zeros = jnp.zeros_like(c.w2)
    q = plan.tiles_per_segment
    nxt = plan.seg_start(s + 1)

    def body(jj, carry):
        fcarry, ptot = carry
        tau = s * q + (q - 1 - jj)  # tiles right to left
        t0, _, tile = _load_tile(plan, k_ref, v_ref, tau, cmask)
        p_loc, f_loc = _fwd_local(plan, c, tile)
        if sub_refs:  # F from the later tiles of the segment, at the token before the next tile
            _store_fields(plan, sub_refs[0], tau, _fields_of(fcarry), cmask)
        t1 = plan.tile_start(tau + 1)
        fcarry = _merge(f_loc, _shift(fcarry, t1 - t0, c.w2, -1))
        ptot = _merge(ptot, _shift(p_loc, nxt - (t0 + plan.rows), c.w2, -1))
        return fcarry, ptot

    fcarry, ptot = _loop(q, body, (_empty_sum(zeros, 2), _empty_sum(zeros, 2)))
    _store_fields(plan, seg_ref, s, _fields_of(ptot, fcarry), cmask)


def _future(plan: _Plan, s, tau, t0, f_in: _Sum, sub_ref, cmask, w2, nv: int) -> _Sum:
    """F at tile tau's last row (t0 + L - 1): the segment's incoming F plus the segment's later tiles."""
    last = t0 + plan.rows - 1
    fut = _shift(f_in, (plan.seg_start(s + 1) - 1) - last, w2, -1)
    if sub_ref is not None:
        f = _sums_from(_load_fields(plan, sub_ref, tau, 3, cmask), (2,), cmask)[0]
        f = f if nv == 2 else _Sum(f.ref, f.vals[1:])
        fut = _merge(fut, _shift(f, (plan.tile_start(tau + 1) - 1) - last, w2, -1))
    return fut


def _fwd_output_kernel(plan: _Plan, save: bool, wu_ref, k_ref, v_ref, seg_ref, *refs):
    refs = list(refs)
    sub_ref = refs.pop(0) if plan.tiles_per_segment > 1 else None
    y_ref = refs.pop(0)
    lsub_ref = refs.pop(0) if save and plan.tiles_per_segment > 1 else None
    s = pl.program_id(2)
    cmask = _channel_mask(plan, pl.program_id(1))
    c = _consts(plan, wu_ref, cmask)
    zeros = jnp.zeros_like(c.w2)
    q = plan.tiles_per_segment
    p_in, f_in = _fwd_scan(plan, seg_ref, s, cmask, c.w2, 2)
    left0 = _left_empty(plan, zeros, 2)._replace(p=p_in)

    def body(jj, left):
        tau = s * q + jj
        t0, end, tile = _load_tile(plan, k_ref, v_ref, tau, cmask)
        fut = _future(plan, s, tau, t0, f_in, sub_ref, cmask, c.w2, 2)
        if lsub_ref is not None:  # the backward output's forward sums entering each tile
            _store_fields(plan, lsub_ref, tau, _left_fields(left), cmask)
        kappa = _kappa(plan, tile, left, fut)
        ys = _out_rows(plan, (y_ref,), t0, end, cmask, zeros)
        ys, _, left, _ = _fwd_tile(plan, c, tile, kappa, left, fut, jj, lambda i, x, ei, ewi, fc: (x[0] / x[1], fc),
                                   (), ys, want_left=q > 1, want_first=False)
        _flush_rows(plan, (y_ref,), t0, end, cmask, ys)
        if left is None:
            return left0
        return _left_shift(left, plan.tile_start(tau + 1) - (t0 + plan.rows), c.w2)

    _loop(q, body, left0)


# ------------------------------------------------------------------------------------------ backward kernels


def _bwd_scan(plan: _Plan, seg_ref, s, cmask, w2):
    """P' entering segment s from the right (at its last token) and F' from the left (at its first token); per
    segment the backward summary stores P'_tot (at the token before the segment) and F'_tot (at the first token
    of the next segment)."""
    fp_in, pp_in = _scan_segments(plan, seg_ref, s, cmask, w2, (4, 4), 1, 0)
    return pp_in, fp_in


def _bwd_summary_kernel(plan: _Plan, wu_ref, k_ref, g_ref, y_ref, fseg_ref, *refs):
    refs = list(refs)
    fsub_ref = refs.pop(0) if plan.tiles_per_segment > 1 else None
    seg_ref = refs.pop(0)
    fpsub_ref = refs.pop(0) if plan.tiles_per_segment > 1 else None
    s = pl.program_id(2)
    cmask = _channel_mask(plan, pl.program_id(1))
    c = _consts(plan, wu_ref, cmask)
    zeros = jnp.zeros_like(c.w2)
    q = plan.tiles_per_segment
    start = plan.seg_start(s)
    p_in, f_in = _fwd_scan(plan, fseg_ref, s, cmask, c.w2, 1)

    def body(jj, carry):
        left, fprime, ptot = carry
        tau = s * q + jj
        t0, end, tile = _load_tile(plan, k_ref, None, tau, cmask)
        gs = _late_rows(plan, g_ref, t0, end, cmask, block=_SUMMARY_ROW_BLOCK)
        ys = _late_rows(plan, y_ref, t0, end, cmask, block=_SUMMARY_ROW_BLOCK)
        fut = _future(plan, s, tau, t0, f_in, fsub_ref, cmask, c.w2, 1)
        if fpsub_ref is not None:
            _store_fields(plan, fpsub_ref, tau, _fields_of(fprime), cmask)
        left, fprime, ploc = _bwd_local(plan, c, tile, gs, ys, left, fut, fprime, jj)
        t1 = plan.tile_start(tau + 1)
        ptot = _merge(ptot, _shift(ploc, (t0 - 1) - (start - 1), c.w2, -1))
        return (_left_shift(left, t1 - (t0 + plan.rows), c.w2), _shift(fprime, t1 - (t0 + plan.rows), c.w2, -1),
                ptot)

    left0 = _left_empty(plan, zeros, 1)._replace(p=p_in)
    _, fprime, ptot = _loop(q, body, (left0, _empty_sum(zeros, 4), _empty_sum(zeros, 4)))
    _store_fields(plan, seg_ref, s, _fields_of(ptot, fprime), cmask)


def _bwd_output_kernel(plan: _Plan, wu_ref, k_ref, v_ref, g_ref, fseg_ref, bseg_ref, *refs):
    refs = list(refs)
    q = plan.tiles_per_segment
    lsub_ref, fpsub_ref = (refs.pop(0), refs.pop(0)) if q > 1 else (None, None)
    dk_ref, dv_ref, dwu_ref = refs
    s = pl.program_id(2)
    cmask = _channel_mask(plan, pl.program_id(1))
    c = _consts(plan, wu_ref, cmask)
    zeros = jnp.zeros_like(c.w2)
    p_in, f_in = _fwd_scan(plan, fseg_ref, s, cmask, c.w2, 2)
    pp_in, fp_in = _bwd_scan(plan, bseg_ref, s, cmask, c.w2)
    start, nxt = plan.seg_start(s), plan.seg_start(s + 1)
    split = plan.official and plan.split
    last_tau = s * q + q - 1
    last_row = plan.tile_start(last_tau) + plan.rows - 1

    def body(jj_rev, carry):
        fut, right, dw, du = carry
        jj = q - 1 - jj_rev  # tiles right to left
        tau = s * q + jj
        t0, end, tile = _load_tile(plan, k_ref, v_ref, tau, cmask)
        gs = _late_rows(plan, g_ref, t0, end, cmask, block=plan.rows)
        fprime = _shift(fp_in, t0 - start, c.w2, -1)
        if lsub_ref is not None:
            left = _left_from(plan, _load_fields(plan, lsub_ref, tau, _left_size(plan, 2), cmask), cmask, 2)
            fprime = _merge(fprime, _sums_from(_load_fields(plan, fpsub_ref, tau, 5, cmask), (4,), cmask)[0])
        else:
            left = _left_empty(plan, zeros, 2)._replace(p=p_in)

        reload = None
        if not plan.looped:
            def reload(kappa):  # e and e v again, from k and v reread as the reverse sweep reaches them
                es = _late_rows(plan, k_ref, t0, end, cmask, -jnp.inf, lambda k: _exp2(k * _LOG2E - kappa),
                                block=plan.rows)
                vs = _late_rows(plan, v_ref, t0, end, cmask, block=plan.rows)
                def row(i, dep):
                    # The reread's lane index is multiplied by (dep == dep), a 1 that depends on the reverse
                    # sweep's carry: otherwise the compiler reuses the first read's addresses and keeps two
                    # 64-bit addresses per row live across the tile (72 bytes spilled at (24, 784, 576), none
                    # now). A NaN carry reads lane 0 instead, in bounds, where the outputs are NaN anyway.
                    es.dep = vs.dep = dep
                    return es[i], es[i] * vs[i]
                return row

        outs = _out_rows(plan, (dk_ref, dv_ref), t0, end, cmask, (zeros, zeros), block=plan.rows)
        outs, first, right, dw_t, du_t = _bwd_tile(plan, c, tile, gs, left, fut, fprime, right, jj, reload, outs)
        _flush_rows(plan, (dk_ref, dv_ref), t0, end, cmask, outs)
        # Carry F and the transposed sums to the previous tile's last row.
        prev_last = plan.tile_start(tau - 1) + plan.rows - 1
        fut = _shift(first, (t0 - 1) - prev_last, c.w2, -1)
        pr, br, sr = right
        pr = _shift(pr, (t0 - 1) - prev_last, c.w2, -1)
        if split:  # B' decays towards earlier tokens like P'; S' grows
            br = _shift(br, (t0 - 1) - prev_last, c.w2, -1)
            sr = _shift(sr, (t0 - 1) - prev_last, c.w2, +1)
        return fut, (pr, br, sr), dw + dw_t, du + du_t

    fut0 = _shift(f_in, (nxt - 1) - last_row, c.w2, -1)
    pr0 = _shift(pp_in, (nxt - 1) - last_row, c.w2, -1)
    empty4 = _empty_sum(zeros, 4)
    right0 = (pr0, empty4, empty4) if split else (pr0, None, None)
    _, _, dw, du = _loop(q, body, (fut0, right0, zeros, zeros))
    _store_fields(plan, dwu_ref, s, [dw, du], cmask)


# --------------------------------------------------------------------------------------------- pallas_calls


def _compiler_params(plan: _Plan):
    if plan.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=plan.num_warps, num_stages=1)


def _call(plan: _Plan, kernel, in_specs, out_specs, out_shape, *args):
    grid = (plan.batch, plan.num_cblocks, plan.num_segments)
    base = kernel.func if isinstance(kernel, functools.partial) else kernel
    name = "bi_wkv_" + base.__name__.strip("_")
    kernel = functools.partial(kernel.func, plan, *kernel.args, **kernel.keywords) if isinstance(
        kernel, functools.partial) else functools.partial(kernel, plan)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=plan.interpret, compiler_params=_compiler_params(plan),
                          name=name)(*args)


class _Specs:
    """BlockSpecs of the (batch, channel block, segment) grid."""

    def __init__(self, plan: _Plan):
        bc = plan.block_c
        self.decays = pl.BlockSpec((2, bc), lambda b, c, s: (0, c))  # rows w, u
        self.tokens = pl.BlockSpec((None, plan.tokens, bc), lambda b, c, s: (b, 0, c))

        def states(rows, fields):
            return pl.BlockSpec((None, rows, fields, bc), lambda b, c, s: (b, 0, 0, c))

        self.states = states


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward(plan: _Plan, w, u, k, v, save: bool):
    """y and, when ``save``, the residuals of the backward: the summary's per-segment and per-tile sums and the
    forward sums entering each tile."""
    sp = _Specs(plan)
    ns, nt, c, b = plan.num_segments, plan.tile_slots, plan.channels, plan.batch
    many = plan.tiles_per_segment > 1
    outs, shapes = [sp.states(ns, 6)], [_f32(b, ns, 6, c)]
    if many:
        outs.append(sp.states(nt, 3))
        shapes.append(_f32(b, nt, 3, c))
    wu = jnp.stack([w, u])
    summ = _call(plan, _fwd_summary_kernel, [sp.decays, sp.tokens, sp.tokens], outs, shapes, wu, k, v)
    in_specs = [sp.decays, sp.tokens, sp.tokens] + outs
    out_specs, out_shapes = [sp.tokens], [jax.ShapeDtypeStruct(k.shape, k.dtype)]
    if save and many:
        nl = _left_size(plan, 2)
        out_specs.append(sp.states(nt, nl))
        out_shapes.append(_f32(b, nt, nl, c))
    outs = _call(plan, functools.partial(_fwd_output_kernel, save), in_specs, out_specs, out_shapes,
                 wu, k, v, *summ)
    return outs[0], tuple(summ) + tuple(outs[1:])


def _backward(plan: _Plan, w, u, k, v, y, fwd_sums, g):
    sp = _Specs(plan)
    ns, nt, c, b = plan.num_segments, plan.tile_slots, plan.channels, plan.batch
    many = plan.tiles_per_segment > 1
    fseg, fsub, lsub = (fwd_sums + (None, None))[:3]
    fwd_specs = [sp.states(ns, 6)] + ([sp.states(nt, 3)] if many else [])
    outs, shapes = [sp.states(ns, 10)], [_f32(b, ns, 10, c)]
    if many:
        outs.append(sp.states(nt, 5))
        shapes.append(_f32(b, nt, 5, c))
    wu = jnp.stack([w, u])
    summ = _call(plan, _bwd_summary_kernel, [sp.decays, sp.tokens, sp.tokens, sp.tokens] + fwd_specs,
                 outs, shapes, wu, k, g, y, *([fseg, fsub] if many else [fseg]))
    in_specs = [sp.decays, sp.tokens, sp.tokens, sp.tokens, fwd_specs[0], outs[0]]
    args = [wu, k, v, g, fseg, summ[0]]
    if many:
        in_specs += [sp.states(nt, _left_size(plan, 2)), outs[1]]
        args += [lsub, summ[1]]
    out_specs = [sp.tokens, sp.tokens, sp.states(ns, 2)]
    shapes = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype), _f32(b, ns, 2, c)]
    dk, dv, dwu = _call(plan, _bwd_output_kernel, in_specs, out_specs, shapes, *args)
    dw, du = dwu.sum(axis=(0, 1))
    return dw, du, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bi_wkv(plan: _Plan, w, u, k, v):
    return _forward(plan, w, u, k, v, save=False)[0]


def _within_range(plan: _Plan, w, u) -> jax.Array:
    """Whether the kernel covers the decays w and bonus u (a bool array, traced under jit): see _MAX_ROW_GROWTH."""
    w2 = w * _LOG2E
    ok = jnp.max(-w2, initial=0.0) * (plan.tokens + 1) <= _MAX_ROW_GROWTH
    ok = ok & (jnp.max(u * _LOG2E, initial=0.0) <= _MAX_BONUS)
    if plan.official:
        ok = ok & (jnp.max(w2, initial=0.0) * (plan.chunk + 1) <= _MAX_CHUNK_GROWTH)
    return ok


def _bi_wkv_fwd(plan: _Plan, w, u, k, v):
    y, sums = _forward(plan, w, u, k, v, save=True)
    return y, (w, u, k, v, y, sums)


def _bi_wkv_bwd(plan: _Plan, residuals, g):
    w, u, k, v, y, sums = residuals
    dw, du, dk, dv = _backward(plan, w, u, k, v, y, sums, g.astype(y.dtype))
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
    segments: int | None = None,
) -> jax.Array:
    """Bidirectional WKV of k, v (B, T, C) with decay w and bonus u (C,); differentiable in all four.

    ``variant``: ``"official"`` (the shipped CUDA kernel's chunked semantics, models' default) or ``"paper"``.
    ``interpret``: None = compiled (Triton) on GPU, Pallas interpret mode elsewhere. ``block_c``: channels per
    program (power of two; default min(32, next power of two of C)). ``tile_len``: most tokens per tile (any
    positive int; default 28 compiled, 10 when official chunks are longer, 8 interpreted); tiles follow the
    official 32-way chunks. ``segments``: programs per row and channel block (at most 32; default: as few as
    fill a GPU). None of the last three changes the result beyond float rounding. Accumulates in float32;
    float32, bfloat16 and float16 inputs (also with jax_enable_x64 on); returns k's dtype. Decays past the
    kernel's numerics (w < 0 with max(-w) log2(e) (T + 1) > 20, official same-chunk growth max(w) log2(e) (n + 1)
    > 96, or u log2(e) > 96; see the module docstring) are computed by the scan form, chosen at run time under
    jit (``lax.cond``).
    """
    w, u, k, v = check_inputs(w, u, k, v, variant=variant, caller="bi_wkv_pallas", dtypes=_SUPPORTED_DTYPES)
    batch, tokens, channels = k.shape
    if block_c is None:
        block_c = _default_block_c(channels)
    if not isinstance(block_c, int) or block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"bi_wkv_pallas: block_c must be a positive power of two (Triton); got {block_c!r}")
    if tile_len is not None and (not isinstance(tile_len, int) or tile_len < 1):
        raise ValueError(f"bi_wkv_pallas: tile_len must be a positive int; got {tile_len!r}")
    if segments is not None and (not isinstance(segments, int) or not 1 <= segments <= NUM_CHUNKS):
        raise ValueError(f"bi_wkv_pallas: segments must be an int in [1, {NUM_CHUNKS}]; got {segments!r}")
    if interpret is None:
        interpret = default_interpret()
    if batch == 0 or channels == 0:
        return jnp.zeros(k.shape, k.dtype) + 0.0 * (k + v)  # keeps the gradient path (all zeros)
    plan = _make_plan(variant == "official", batch, tokens, channels, tile_len=tile_len, block_c=block_c,
                      segments=segments, interpret=bool(interpret), unrolled=_UNROLL_IN_INTERPRETER)
    w, u = w.astype(jnp.float32), u.astype(jnp.float32)
    kernel = lambda w, u, k, v: _bi_wkv(plan, w, u, k, v)  # noqa: E731
    if _FORCE_KERNEL:
        return kernel(w, u, k, v)
    ok = _within_range(plan, w, u)
    # The scan form lives with the other XLA forms in rwkvunet_jax.wkv, which imports this module: imported here.
    from rwkvunet_jax.wkv import bi_wkv

    scan = lambda w, u, k, v: bi_wkv(w, u, k, v, impl="scan", variant=variant)  # noqa: E731
    try:
        take_kernel = bool(ok)  # concrete w and u: only the form that runs is traced and compiled
    except jax.errors.ConcretizationTypeError:
        return lax.cond(ok, kernel, scan, w, u, k, v)
    return (kernel if take_kernel else scan)(w, u, k, v)
