"""The bidirectional WKV operator of Vision-RWKV / RWKV-UNet, in two variants and three implementations.

Per batch element and channel, with T tokens, decay ``w`` and bonus ``u`` (the model passes
``spatial_decay / T`` and ``spatial_first / T``), keys ``k`` and values ``v``, both variants compute a
weighted mean of the values::

    y_t = sum_m W[t, m] v_m / (sum_m W[t, m] + eps_t),    W[t, m] = e^{k_m} f(t, m).

``variant="paper"`` is the Vision-RWKV formula, no epsilon::

    f(t, m) = e^{-(|t-m| - 1) w}  for m != t,    f(t, t) = e^{u}.

``variant="official"`` is what the shipped CUDA kernel of the official code really computes (fact sheet 2.2).
The T tokens are cut into chunks of n = ceil(T / 32) tokens and the kernel's forward scan restarts at each
chunk start s = n * floor(t / n)::

    m < s      (earlier chunks)          e^{-w (t-m)}
    m = s < t  (chunk start, past)       e^{-w (t-m-1)}
    s < m < t  (same chunk, past)        e^{-w (t-m-1)} + (1 - e^{w}) e^{w (t-m)}
    m = t                                e^{u} + [t > s] (1 - e^{w})
    m > t      (future, any chunk)       e^{-w (m-t)}

and eps_t = EPS * e^{o_t} with EPS = 1e-6 and o_t the running maximum exponent the kernel holds when it
writes y_t. The kernel never lowers a running maximum, so o_t also covers tokens it has already subtracted
from its future sum (the chunk start, and each token of the chunk as the sweep passes it)::

    o_t  = max(o1_t, o2_t, u + k_t)
    o2_t = max( max_{m<s} k_m - w(t-m),  max_{s<=m<t} k_m - w(t-1-m) )
    o1_t = max( max_{m>=s} k_m - w(m-s) + w(t-s),  max_{s<m<=t} k_m + w(t-m+1) )

so at T = 1 the kernel gives y = v / (1 + EPS e^{-u}), not v / (1 + EPS). o_t bounds every exponent of the
table, which is why it can also serve as the normalising reference of the sums.

The variants differ: by about w * e^{k} relative for small per-token decays (1e-3 for |decay| ~ 1 at 784
tokens), but by several percent at the WKV output when |w| per token is not small (short sequences, large
learned decays). ``official`` is the models' default because the official weights were trained with it.

Implementations (``impl``):

* ``"naive"``: the dense O(T^2) definitions above, evaluated in float32 (float64 for float64 inputs with
  x64 enabled) in blocks of channels and query rows so that moderate T (<= ~1024) fits in memory. The
  reference the other implementations are tested against.
* ``"scan"``: linear in T in time and memory (forward and backward, by autodiff through ``lax.scan``), any
  backend, no cap on T. Every partial sum is kept as (running max exponent, scaled numerator, scaled
  denominator) so that |k| up to ~80 and negative w neither overflow nor underflow in float32. Official: a
  forward scan carries the global exclusive prefix P, the within-chunk past sum (P at the chunk start, then
  decayed with the paper's |t-m|-1 rule) and the within-chunk residual S; a reverse scan carries the global
  exclusive suffix F. Because 1 - e^{w} may be negative, the terms are combined only after the scans.
* ``"chunked"``: ``rwkvunet_jax.kernels.wkv_chunked``: the same sums in chunked matrix form, any backend. The
  tokens are cut into tiles aligned with the official chunks; within a tile every piece is a triangular 0/1
  matrix times the tile's scaled keys (matrix products at full float32 precision), and the states entering the
  tiles come from log-step scans over the T/L tile summaries. No loop grows with T beyond T/L (the lowered
  forward and gradient hold only loops of log2(L) and log2(T/L) steps); tiles whose keys span more exponent
  range than float32 allows run row by row instead (``lax.cond``, exact). Hand-written VJPs.
* ``"pallas"``: a Pallas kernel chosen by the platform the call is lowered for (``lax.platform_dependent``):
  the Triton kernel ``rwkvunet_jax.kernels.bi_wkv.bi_wkv_pallas`` on CUDA/ROCm, the Mosaic kernel of the
  chunked form ``rwkvunet_jax.kernels.bi_wkv_tpu.bi_wkv_tpu`` on TPU (float32/bfloat16), and elsewhere the
  Triton kernel in interpret mode (``interpret=True`` forces that everywhere).
* ``"auto"``: ``"pallas"`` on GPU and TPU backends when the kernel imports; on CPU ``"scan"``: on 2 shared CPU
  cores (C = 576, B = 1, float32, official; median of 3 side-by-side runs) the chunked form took 0.76x, 1.8x,
  1.5x, 1.3x the scan's time for the forward at T = 196, 784, 3136, 12544, and 1.9x, 0.92x, 1.24x, 1.23x for
  forward+backward: faster only at T = 784 with gradients (by less than the run-to-run spread) and at T = 196
  forward-only.

Gradients: the largest exponent o_t only sets the scale of EPS, and it is held constant for differentiation
(``stop_gradient``) in every implementation, so gradients agree across implementations.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from rwkvunet_jax.kernels import running_sum as rsum
from rwkvunet_jax.kernels.wkv_chunked import bi_wkv_chunked
from rwkvunet_jax.kernels.wkv_spec import EMPTY_EXPONENT as _EMPTY
from rwkvunet_jax.kernels.wkv_spec import EPS, NUM_CHUNKS, VARIANTS, check_inputs, chunk_length

__all__ = ["EPS", "IMPLS", "VARIANTS", "NUM_CHUNKS", "bi_wkv", "bi_wkv_dense", "chunk_length", "resolve_impl"]

IMPLS = ("auto", "naive", "scan", "chunked", "pallas")
_PALLAS_MODULE = "rwkvunet_jax.kernels.bi_wkv"  # Triton (GPU)
_TPU_MODULE = "rwkvunet_jax.kernels.bi_wkv_tpu"  # Mosaic (TPU)
# Elements of one (B, query rows, T, channels) block of the dense evaluation (float32: 64 MiB per temporary).
_NAIVE_BLOCK_ELEMENTS = 1 << 24


def resolve_impl(impl: str = "auto") -> str:
    """Return the implementation ``bi_wkv`` runs for ``impl``: ``"auto"`` becomes ``"pallas"`` or ``"scan"``."""
    if impl not in IMPLS:
        raise ValueError(f"bi_wkv: unknown impl {impl!r}; expected one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu" and _pallas_importable():
        return "pallas"
    if backend == "tpu" and _pallas_importable(_TPU_MODULE):
        return "pallas"
    # CPU: the scan measured faster than the chunked form (benchmarks/wkv.py; the README gives the table).
    return "scan"


def bi_wkv(
    w: jax.Array,
    u: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    impl: str = "auto",
    variant: str = "official",
    interpret: bool | None = None,
) -> jax.Array:
    """Bidirectional WKV of keys ``k`` and values ``v`` (B, T, C) with per-channel decay ``w`` and bonus ``u`` (C,).

    Returns (B, T, C) in ``k``'s dtype; the arithmetic is float32 (float64 for float64 inputs). ``impl`` is
    one of ``"auto" | "naive" | "scan" | "chunked" | "pallas"`` and ``variant`` one of ``"official" | "paper"``
    (see the module docstring for the exact formulas). ``interpret`` is passed to the Pallas kernel when it runs
    (``None``: compiled on GPU, interpret mode elsewhere); the XLA forms (``"naive"``, ``"scan"``, ``"chunked"``)
    reject it, and ``"auto"`` ignores it when it picks one of them.
    """
    w, u, k, v = _validate(w, u, k, v, impl, variant)
    chosen = resolve_impl(impl)
    if chosen == "pallas":
        return _pallas(w, u, k, v, variant=variant, interpret=interpret).astype(k.dtype)
    if interpret is not None and impl != "auto":
        raise ValueError(f"bi_wkv: interpret={interpret!r} only applies to impl='pallas', got impl={impl!r}")
    compute = _compute_dtype(w, u, k, v)
    if chosen == "chunked":
        return bi_wkv_chunked(w, u, k, v, variant=variant)
    if chosen == "naive":
        return _naive(w, u, k, v, variant=variant, compute_dtype=compute)
    return _scan(w, u, k, v, variant=variant, compute_dtype=compute)


def bi_wkv_dense(
    w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array, *, variant: str = "official",
    block_elements: int = _NAIVE_BLOCK_ELEMENTS,
) -> jax.Array:
    """``bi_wkv(..., impl="naive")`` (the O(T^2) reference) with its memory budget made explicit.

    The dense (B, rows, T, channels) weights are evaluated in blocks of at most ``block_elements`` elements:
    whole rows for as many channels as fit, else one channel and as many query rows as fit.
    """
    w, u, k, v = _validate(w, u, k, v, "naive", variant)
    if block_elements < 1:
        raise ValueError(f"bi_wkv_dense: block_elements must be positive, got {block_elements}")
    return _naive(w, u, k, v, variant=variant, compute_dtype=_compute_dtype(w, u, k, v),
                  block_elements=int(block_elements))


# --------------------------------------------------------------------------------------------------- checks


def _validate(w: Any, u: Any, k: Any, v: Any, impl: str, variant: str) -> tuple[jax.Array, ...]:
    if impl not in IMPLS:
        raise ValueError(f"bi_wkv: unknown impl {impl!r}; expected one of {IMPLS}")
    return check_inputs(w, u, k, v, variant=variant, caller="bi_wkv")


def _compute_dtype(*xs: jax.Array) -> jnp.dtype:
    # float32 at least (bfloat16/float16 accumulate in float32); float64 only when an input is float64.
    return jnp.promote_types(jnp.float32, jnp.result_type(*(x.dtype for x in xs)))


def _pallas_importable(module: str = _PALLAS_MODULE) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _pallas(w, u, k, v, *, variant: str, interpret: bool | None) -> jax.Array:
    """The Pallas kernel of the platform the call is lowered for: Triton on CUDA/ROCm, Mosaic on TPU.

    ``interpret=True`` runs the Triton kernel in interpret mode anywhere. Otherwise ``lax.platform_dependent``
    picks the kernel at lowering time (so ``.lower(lowering_platforms=("tpu",))`` on any machine gives the
    Mosaic kernel); other platforms (CPU) run the Triton kernel, in interpret mode unless ``interpret=False``.
    """
    triton = _load_pallas()
    if interpret:
        return triton(w, u, k, v, variant=variant, interpret=True)
    branches = dict(
        cuda=lambda *a: triton(*a, variant=variant, interpret=False),
        rocm=lambda *a: triton(*a, variant=variant, interpret=False),
        default=lambda *a: triton(*a, variant=variant, interpret=interpret),
    )
    mosaic = _load_tpu()
    if mosaic is not None and k.dtype in (jnp.float32, jnp.bfloat16):
        branches["tpu"] = lambda *a: mosaic(*a, variant=variant, interpret=False).astype(k.dtype)
    return lax.platform_dependent(w, u, k, v, **branches)


def _load_tpu() -> Callable[..., jax.Array] | None:
    try:
        return importlib.import_module(_TPU_MODULE).bi_wkv_tpu
    except ImportError:
        return None


def _load_pallas() -> Callable[..., jax.Array]:
    try:
        module = importlib.import_module(_PALLAS_MODULE)
    except ImportError as err:
        raise ImportError(
            f"bi_wkv(impl='pallas') needs the Pallas kernel module {_PALLAS_MODULE} (kernels/bi_wkv.py), "
            f"which failed to import: {err}. Use impl='scan' (any backend) or impl='auto'."
        ) from err
    return module.bi_wkv_pallas


# ---------------------------------------------------------------------------------------------- naive O(T^2)


def _exponents(
    w: jax.Array, u: jax.Array, k: jax.Array, t: jax.Array, variant: str
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Exponents of W[t, m] for query rows ``t`` (Tq,) and all keys, shaped (B, Tq, T, C).

    Returns (main, residual, scale): W = e^{main} + (1 - e^{w}) e^{residual} (residual -inf where absent), and
    for the official variant the extra exponents of the kernel's running maximum o_t (module docstring), so
    that o_t = max over m of (main, scale). Paper: residual and scale are None.
    """
    num_tokens = k.shape[1]
    m = jnp.arange(num_tokens)[None, :]
    t = t[:, None]
    d = t - m
    if variant == "paper":
        decays = jnp.where(m == t, 0, jnp.abs(d) - 1)
    else:
        start = chunk_length(num_tokens) * (t // chunk_length(num_tokens))
        decays = jnp.where(m < start, d, jnp.where(m < t, d - 1, -d))
    main = k[:, None, :, :] - w * decays[None, :, :, None].astype(k.dtype)
    main = main + jnp.where((m == t)[None, :, :, None], u, 0.0)
    if variant == "paper":
        return main, None, None
    grown = k[:, None, :, :] + w * d[None, :, :, None].astype(k.dtype)  # k_m + w (t - m)
    # The residual covers s < m < t and, for t > s, the token itself (there d = 0, so e^{k_t} as the table says).
    residual = jnp.where(((m > start) & (m <= t))[None, :, :, None], grown, -jnp.inf)
    # o1's sets: k_m - w(m-s) + w(t-s) = k_m + w(t-m) for every m >= s, and k_m + w(t-m+1) for s < m <= t
    # (o2's sets and u + k_t are exactly the main exponents of m < t and m = t).
    scale = jnp.maximum(jnp.where((m >= start)[None, :, :, None], grown, -jnp.inf), residual + w)
    return main, residual, scale


def _naive_rows(w: jax.Array, u: jax.Array, k: jax.Array, v: jax.Array, t: jax.Array, variant: str) -> jax.Array:
    main, residual, scale = _exponents(w, u, k, t, variant)
    top = jnp.max(main, axis=2, keepdims=True)
    if scale is not None:
        # top = o_t, which bounds every exponent of the table, so EPS needs no rescaling.
        top = jnp.maximum(top, jnp.max(scale, axis=2, keepdims=True))
    top = lax.stop_gradient(top)
    weights = jnp.exp(main - top)
    eps = 0.0
    if residual is not None:
        weights = weights + (1.0 - jnp.exp(w)) * jnp.exp(residual - top)
        eps = EPS
    num = jnp.einsum("btmc,bmc->btc", weights, v)
    den = jnp.sum(weights, axis=2) + eps
    return num / den


def _naive_impl(
    w, u, k, v, *, variant: str, compute_dtype: jnp.dtype, block_elements: int = _NAIVE_BLOCK_ELEMENTS
) -> jax.Array:
    batch, num_tokens, channels = k.shape
    out_dtype = k.dtype
    w, u, k, v = (x.astype(compute_dtype) for x in (w, u, k, v))
    # Block sizes: whole rows for as many channels as fit, else one channel and as many query rows as fit.
    row_elements = batch * num_tokens * num_tokens
    if row_elements <= block_elements:
        rows, group = num_tokens, min(channels, block_elements // row_elements)
    else:
        rows, group = max(1, block_elements // (batch * num_tokens)), 1
    num_groups, num_row_blocks = -(-channels // group), -(-num_tokens // rows)
    pad_c = num_groups * group - channels
    # Padding channels get w = u = k = v = 0 (finite) and are dropped at the end.
    w, u = (jnp.pad(x, (0, pad_c)).reshape(num_groups, group) for x in (w, u))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_c))).reshape(batch, num_tokens, num_groups, group) for x in (k, v))
    k, v = (jnp.moveaxis(x, 2, 0) for x in (k, v))
    # Padding query rows repeat the last token; their results are dropped.
    query = jnp.minimum(jnp.arange(num_row_blocks * rows), num_tokens - 1).reshape(num_row_blocks, rows)

    # Checkpointed so that the backward pass recomputes each block instead of storing all (B, T, T, C).
    rows_of = jax.checkpoint(functools.partial(_naive_rows, variant=variant))

    def block(args):
        wg, ug, kg, vg = args
        return lax.map(lambda t: rows_of(wg, ug, kg, vg, t), query)

    y = lax.map(block, (w, u, k, v))  # (groups, row blocks, B, rows, group)
    y = jnp.transpose(y, (2, 1, 3, 0, 4)).reshape(batch, num_row_blocks * rows, num_groups * group)
    return y[:, :num_tokens, :channels].astype(out_dtype)


_naive = jax.jit(_naive_impl, static_argnames=("variant", "compute_dtype", "block_elements"))


# ------------------------------------------------------------------------------------------------ scan O(T)
# Partial sums are carried as log-domain running sums (rwkvunet_jax.kernels.running_sum): (top, age, a, b) with
# the reference exponent top + rate * age, recomputed from an exact token count rather than accumulated.


def _remat(step):
    # Differentiating a scan saves every intermediate of every step; with the step rematerialised only the
    # carry and inputs are saved per token and the step's few exps are recomputed in the backward pass.
    return jax.checkpoint(step, prevent_cse=False)


def _scan_impl(w, u, k, v, *, variant: str, compute_dtype: jnp.dtype) -> jax.Array:
    out_dtype = k.dtype
    num_tokens = k.shape[1]
    w, u = w.astype(compute_dtype), u.astype(compute_dtype)
    # Time-major (T, B, C) for lax.scan.
    k, v = (jnp.swapaxes(x.astype(compute_dtype), 0, 1) for x in (k, v))
    zero = jnp.zeros_like(k[0])

    def suffix_step(suffix, kv):
        # Official F_{t-1} = e^{-w}(F_t + e^{k_t}); paper B_{t-1} = e^{-w} B_t + e^{k_t}.
        k_t, v_t = kv
        if variant == "official":
            new = rsum.decay(rsum.absorb(suffix, -w, k_t, v_t))
        else:
            new = rsum.absorb(rsum.decay(suffix), -w, k_t, v_t)
        return new, rsum.emit(suffix, -w)

    _, future = lax.scan(_remat(suffix_step), rsum.empty(zero), (k, v), reverse=True)

    if variant == "paper":

        def past_step(past, kv):
            k_t, v_t = kv
            return rsum.absorb(rsum.decay(past), -w, k_t, v_t), rsum.emit(past, -w)

        _, past = lax.scan(_remat(past_step), rsum.empty(zero), (k, v))
        terms = [(1.0, past), (1.0, future)]
        top = jnp.maximum(jnp.maximum(past[0], future[0]), u + k)
        eps = 0.0
    else:
        chunk = chunk_length(num_tokens)
        later = (jnp.arange(num_tokens) % chunk) != 0  # t > s, i.e. not the first token of its chunk

        def official_step(carry, xs):
            prefix, past, residual = carry
            k_t, v_t, later_t = xs
            # At a chunk start the within-chunk sums restart: past from the global prefix, residual empty.
            past = rsum.select(later_t, past, prefix)
            residual = rsum.select(later_t, residual, rsum.empty(zero))
            out = (rsum.emit(past, -w), rsum.emit(residual, w))
            prefix = rsum.decay(rsum.absorb(prefix, -w, k_t, v_t))  # P_{t+1} = e^{-w}(P_t + e^{k_t})
            past = rsum.absorb(rsum.decay(past), -w, k_t, v_t)  # e^{-w} (earlier chunks + Q_t) + e^{k_t}
            # S_{t+1} = e^{w}(S_t + [t>s] e^{k_t})
            residual = rsum.decay(rsum.absorb(residual, w, k_t, v_t, present=later_t))
            return (prefix, past, residual), out

        _, (past, residual) = lax.scan(_remat(official_step), (rsum.empty(zero),) * 3, (k, v, later))
        leak = 1.0 - jnp.exp(w)  # may be negative: the reason the terms are combined only here
        terms = [(1.0, past), (leak, residual), (1.0, future)]
        # The kernel's running maximum o_t (module docstring), which sets the scale of EPS. o2_t is the past
        # sum's running maximum. o1_t: max_{m>=s} k_m - w(m-s), taken at the chunk start s from the exclusive
        # future maximum, then grown by w(t-s); and w + max_{s<m<=t} k_m + w(t-m), the residual's running
        # maximum with the token itself.
        starts = jnp.arange(num_tokens) - jnp.arange(num_tokens) % chunk
        at_start = jnp.maximum(k, future[0])[starts]
        grown = at_start + w * (jnp.arange(num_tokens) % chunk)[:, None, None].astype(k.dtype)
        self_k = jnp.where(later[:, None, None], k, _EMPTY)
        top = jnp.maximum(jnp.maximum(past[0], grown), jnp.maximum(residual[0], self_k) + w)
        top = jnp.maximum(top, u + k)  # o_t bounds every exponent of the table: no rescaling of EPS needed
        eps = EPS

    top = lax.stop_gradient(top)
    self_den = jnp.exp(u + k - top)
    if variant == "official":
        self_den = self_den + leak * jnp.exp(self_k - top)  # e^{k_t} only when t > s
    num = v * self_den
    den = self_den + eps
    for coef, (ref, a, b) in terms:
        scale = coef * jnp.exp(ref - top)
        num = num + a * scale
        den = den + b * scale
    return jnp.swapaxes(num / den, 0, 1).astype(out_dtype)


_scan = jax.jit(_scan_impl, static_argnames=("variant", "compute_dtype"))
