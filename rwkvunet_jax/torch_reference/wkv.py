"""Bidirectional WKV in plain PyTorch (CPU or any device), both variants, differentiable.

Two implementations of the same operator:

* :func:`bi_wkv_dense` builds the T x T weight table of the chosen variant explicitly (O(T^2) time
  and memory per channel). It is the definition, used to test the fast one.
* :func:`bi_wkv` computes the same sums in O(T) as recurrences (float32 arithmetic for float32
  inputs, float64 for float64), each partial sum kept as (running max exponent, scaled sum) so
  nothing overflows: a loop over the n = ceil(T/32) positions of a chunk runs all chunks at once,
  then a loop over the (at most 32) chunks joins them. Use it for real inputs (224 x 224 and up).

Semantics, for one batch element and channel, tokens t, m in [0, T), decay w and bonus u (the
model passes ``spatial_decay / T`` and ``spatial_first / T``):

* ``"paper"`` (Vision-RWKV): y_t = sum_m W[t,m] v_m / sum_m W[t,m] with
  W[t,m] = exp(k_m - (|t-m| - 1) w) for m != t and exp(u + k_t) on the diagonal.
* ``"official"`` (what the released CUDA kernel computes): the tokens are cut into chunks of
  n = ceil(T / 32), s = n * floor(t / n) is the start of t's chunk, W[t,m] = exp(k_m) f(t,m) with

  ==================  ==========================================================
  m < s               exp(-w (t-m))
  m = s < t           exp(-w (t-m-1))
  s < m < t           exp(-w (t-m-1)) + (1 - exp(w)) exp(w (t-m))
  m = t               exp(u) + [t > s] (1 - exp(w))
  m > t               exp(-w (m-t))
  ==================  ==========================================================

  and y_t = sum_m W v / (sum_m W + 1e-6 exp(o_t)), where o_t is the running maximum exponent the
  kernel holds when it writes y_t; it never lowers a maximum, so tokens it already subtracted count:
  o_t = max(o1_t, o2_t, u + k_t) with o2_t = max({k_m - w(t-m): m < s} | {k_m - w(t-1-m): s <= m < t})
  and o1_t = max({k_m - w(m-s) + w(t-s): m >= s} | {k_m + w(t-m+1): s < m <= t}).

Gradients: o_t only
sets the scale of the epsilon and is held constant (detached), as in :mod:`rwkvunet_jax.wkv`.
"""

from __future__ import annotations

import math

import torch

VARIANTS = ("official", "paper")
OFFICIAL_EPS = 1e-6
OFFICIAL_NUM_CHUNKS = 32
# A finite "minus infinity": empty maxima and padded tokens use it, so no inf - inf = nan appears
# in the forward or the backward pass; exp() of anything near it is exactly 0 (float32 or 64).
_NEG = -1e30


def _check(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both have shape (B, T, C); got {tuple(k.shape)} and {tuple(v.shape)}")
    c = k.shape[-1]
    if w.shape != (c,) or u.shape != (c,):
        raise ValueError(f"w and u must have shape ({c},); got {tuple(w.shape)} and {tuple(u.shape)}")


def official_chunk_length(num_tokens: int) -> int:
    """Tokens per chunk of the released kernel: ceil(T / 32)."""
    return max(1, math.ceil(num_tokens / OFFICIAL_NUM_CHUNKS))


def _dense_official(w, u, k, v):
    # Everything as (B, C, T, T) with t on axis -2 and m on axis -1.
    b, t_len, c = k.shape
    n = official_chunk_length(t_len)
    pos = torch.arange(t_len, dtype=torch.float64)
    t_idx = pos[:, None].expand(t_len, t_len)
    m_idx = pos[None, :].expand(t_len, t_len)
    s_idx = torch.div(t_idx, n, rounding_mode="floor") * n
    wc = w[:, None, None]  # (C, 1, 1)
    kk = k.permute(0, 2, 1)[:, :, None, :]  # (B, C, 1, T): k_m
    kt = k.permute(0, 2, 1)[:, :, :, None]  # (B, C, T, 1): k_t
    uu = u[None, :, None, None]
    dist = t_idx - m_idx

    earlier = m_idx < s_idx
    at_start = (m_idx == s_idx) & (s_idx < t_idx)
    in_chunk = (m_idx > s_idx) & (m_idx < t_idx)
    diag = m_idx == t_idx
    future = m_idx > t_idx
    after_start = (t_idx > s_idx).to(torch.float64)

    # Exponents of every term of the table, _NEG where a term does not exist.
    e_main = torch.where(earlier, kk - wc * dist, torch.full_like(kk - wc * dist, _NEG))
    e_main = torch.where(at_start | in_chunk, kk - wc * (dist - 1), e_main)
    e_main = torch.where(future, kk + wc * dist, e_main)  # -w (m - t) = w (t - m)
    e_main = torch.where(diag, uu + kt, e_main)
    e_resid = torch.where(in_chunk, kk + wc * dist, torch.full_like(e_main, _NEG))
    # o_t's own sets: k_m + w(t - m) for m >= s and k_m + w(t - m + 1) for s < m <= t (the others are e_main's).
    e_grown = torch.where(m_idx >= s_idx, kk + wc * dist, torch.full_like(e_main, _NEG))
    e_grown1 = torch.where((m_idx > s_idx) & (m_idx <= t_idx), kk + wc * (dist + 1), torch.full_like(e_main, _NEG))
    o = torch.maximum(torch.maximum(e_main, e_grown), e_grown1).amax(dim=-1, keepdim=True).detach()

    one_minus_ew = (1.0 - torch.exp(w))[:, None, None]
    weights = (
        torch.exp(e_main - o)
        + one_minus_ew * torch.exp(e_resid - o)
        + one_minus_ew * after_start * torch.where(diag, torch.exp(kt - o), torch.zeros_like(e_main))
    )
    vv = v.permute(0, 2, 1)[:, :, None, :]
    num = (weights * vv).sum(-1)
    den = weights.sum(-1) + OFFICIAL_EPS
    return (num / den).permute(0, 2, 1)


def _dense_paper(w, u, k, v):
    t_len = k.shape[1]
    pos = torch.arange(t_len, dtype=torch.float64)
    dist = (pos[:, None] - pos[None, :]).abs()
    kk = k.permute(0, 2, 1)[:, :, None, :]
    logits = kk - (dist - 1) * w[:, None, None]
    eye = torch.eye(t_len, dtype=torch.bool)
    logits = torch.where(eye, u[None, :, None, None] + kk, logits)
    weights = torch.softmax(logits, dim=-1)
    return torch.einsum("bctm,bmc->btc", weights, v)


def bi_wkv_dense(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "official"
) -> torch.Tensor:
    """Bidirectional WKV from its T x T weight table (float64 inside); see the module docstring.

    Args: ``w``, ``u`` of shape (C,), ``k``, ``v`` of shape (B, T, C). Returns (B, T, C) in k's dtype.
    """
    _check(w, u, k, v, variant)
    args = [x.to(torch.float64) for x in (w, u, k, v)]
    fn = _dense_official if variant == "official" else _dense_paper
    return fn(*args).to(k.dtype)


# ----------------------------------------------------------------------------------------------
# Linear-time form: a scan inside chunks (all chunks at once), then a short scan over chunks.
#
# Every partial sum sum_m e^{x_m} [v_m, 1] is held as (m, X) with value X * e^{m}: m is the largest
# exponent absorbed so far (shifted by the decay since), so X stays O(number of terms) and nothing
# overflows. Five sums cover the official table for token t in the chunk starting at s:
#   A_t  = sum_{m<s}      e^{k_m - w(t-m)}                  (earlier chunks)
#   L_t  = sum_{s<=m<t}   e^{k_m - w(t-m)}                  (same chunk, past; the table has e^{w} L)
#   S_t  = sum_{s<m<t}    e^{k_m + w(t-m)}                  (same-chunk residual, times 1 - e^{w})
#   F_t  = sum_{t<m<end}  e^{k_m - w(m-t)}                  (same chunk, future)
#   H_t  = sum_{m>=end}   e^{k_m - w(m-t)}                  (later chunks)
# plus the token itself. The paper variant is e^{w} (A + L + F + H) + e^{u + k_t}. The running
# maxima m are exactly the exponent sets whose maximum o_t sets the official epsilon's scale.


def _step(m: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, k: torch.Tensor | None = None,
          kv: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum (m, x) times e^{shift}, plus e^{k} kv when given.

    The scale m is a constant for autograd (any scale gives the same value), so gradients flow only
    through the exponentials, never through the running maximum.
    """
    grown = m + shift
    top = (grown if k is None else torch.maximum(grown, k)).detach()
    x = x * torch.exp(grown - top).unsqueeze(-1)
    if k is not None:
        x = x + kv * torch.exp(k - top).unsqueeze(-1)
    return top, x


def _merge(m_a: torch.Tensor, x_a: torch.Tensor, shift: torch.Tensor, m_b: torch.Tensor, x_b: torch.Tensor):
    """The sum (m_a, x_a) times e^{shift}, plus the sum (m_b, x_b)."""
    grown = m_a + shift
    top = torch.maximum(grown, m_b).detach()
    return top, x_a * torch.exp(grown - top).unsqueeze(-1) + x_b * torch.exp(m_b - top).unsqueeze(-1)


def _chunked_scan(w, u, k, v, official: bool):
    b, t_len, c = k.shape
    n = official_chunk_length(t_len)
    num_chunks = -(-t_len // n)
    pad = num_chunks * n - t_len
    # Padding tokens get e^{k} = 0 in both numerator and denominator (kv = [0, 0]).
    kv = torch.stack([v, torch.ones_like(v)], dim=-1)
    if pad:
        k = torch.cat([k, torch.full((b, pad, c), _NEG, dtype=k.dtype)], 1)
        kv = torch.cat([kv, torch.zeros((b, pad, c, 2), dtype=kv.dtype)], 1)
    kc = k.reshape(b, num_chunks, n, c)
    kvc = kv.reshape(b, num_chunks, n, c, 2)
    empty_m = torch.full((b, num_chunks, c), _NEG, dtype=k.dtype)
    empty_x = torch.zeros((b, num_chunks, c, 2), dtype=k.dtype)

    # Inside chunks, forward: L (decay e^{-w}) and S (growth e^{w}, from the token after s).
    rec_l, rec_s = [], []
    m_l, x_l, m_s, x_s = empty_m, empty_x, empty_m, empty_x
    for j in range(n):
        rec_l.append((m_l, x_l))
        rec_s.append((m_s, x_s))
        k_j, kv_j = kc[:, :, j], kvc[:, :, j]
        m_l, x_l = _step(m_l, x_l, -w, k_j - w, kv_j)  # (L + e^{k} kv) e^{-w}
        if official:  # (S + [j > 0] e^{k} kv) e^{w}
            m_s, x_s = _step(m_s, x_s, w, k_j + w, kv_j) if j > 0 else _step(m_s, x_s, w)
    chunk_sum_fwd = (m_l, x_l)  # sum_{m in chunk} e^{k_m - w(end - m)}
    # Inside chunks, backward: F.
    rec_f = [None] * n
    m_f, x_f = empty_m, empty_x
    for j in reversed(range(n)):
        rec_f[j] = (m_f, x_f)
        m_f, x_f = _step(m_f, x_f, -w, kc[:, :, j] - w, kvc[:, :, j])
    chunk_sum_bwd = (m_f, x_f)  # sum_{m in chunk} e^{k_m - w(m - s + 1)}

    # Over chunks: P at each chunk start, H after each chunk end (at most 32 steps).
    rec_p, rec_h = [], [None] * num_chunks
    m_p, x_p = empty_m[:, 0], empty_x[:, 0]
    for ci in range(num_chunks):
        rec_p.append((m_p, x_p))
        m_p, x_p = _merge(m_p, x_p, -w * n, chunk_sum_fwd[0][:, ci], chunk_sum_fwd[1][:, ci])
    m_h, x_h = empty_m[:, 0], empty_x[:, 0]
    for ci in reversed(range(num_chunks)):
        rec_h[ci] = (m_h, x_h)  # sum_{m >= end} e^{k_m - w(m - end + 1)}
        m_h, x_h = _merge(m_h, x_h, -w * n, chunk_sum_bwd[0][:, ci], chunk_sum_bwd[1][:, ci])

    def tokens(records, axis):  # list over positions/chunks of (B, nc, C[, 2]) -> (B, T, C[, 2])
        ms = torch.stack([r[0] for r in records], axis)
        xs = torch.stack([r[1] for r in records], axis)
        return ms.reshape(b, num_chunks * n, c)[:, :t_len], xs.reshape(b, num_chunks * n, c, 2)[:, :t_len]

    j_pos = torch.arange(n, dtype=k.dtype)[None, None, :, None]
    m_p_chunk, x_p_chunk = (torch.stack([r[i] for r in rec_p], 1) for i in (0, 1))
    m_h_chunk, x_h_chunk = (torch.stack([r[i] for r in rec_h], 1) for i in (0, 1))
    m_a = (m_p_chunk[:, :, None] - w * j_pos).reshape(b, num_chunks * n, c)[:, :t_len]
    x_a = x_p_chunk[:, :, None].expand(b, num_chunks, n, c, 2).reshape(b, num_chunks * n, c, 2)[:, :t_len]
    m_hh = (m_h_chunk[:, :, None] - w * (n - 1 - j_pos)).reshape(b, num_chunks * n, c)[:, :t_len]
    x_hh = x_h_chunk[:, :, None].expand(b, num_chunks, n, c, 2).reshape(b, num_chunks * n, c, 2)[:, :t_len]
    m_l, x_l = tokens(rec_l, 2)
    m_f, x_f = tokens(rec_f, 2)
    k, kv = k[:, :t_len], kv[:, :t_len]

    if official:
        m_s, x_s = tokens(rec_s, 2)
        after_start = (torch.arange(t_len) % n > 0).to(k.dtype)[None, :, None]
        terms = [(m_a, x_a, None), (m_l + w, x_l, None), (m_s, x_s, 1.0 - torch.exp(w)), (m_f, x_f, None),
                 (m_hh, x_hh, None)]
        own = torch.where(after_start.bool(), k, torch.full_like(k, _NEG))
        # The kernel's running maximum o_t (module docstring): besides the terms' own maxima, the chunk start
        # k_s grown by w(t - s), the token itself, and w + max_{s<m<=t}(k_m + w(t-m)).
        pos = torch.arange(t_len)
        start_k = k[:, pos - pos % n] + w * (pos % n).to(k.dtype)[None, :, None]
        extra = [u + k, k, start_k, torch.maximum(m_s, own) + w]
        o = torch.stack([m for m, _, _ in terms] + extra).amax(0).detach()
        self_weight = torch.exp(k - o) * (torch.exp(u) + after_start * (1.0 - torch.exp(w)))
    else:
        terms = [(m + w, x, None) for m, x in ((m_a, x_a), (m_l, x_l), (m_f, x_f), (m_hh, x_hh))]
        o = torch.stack([m for m, _, _ in terms] + [u + k]).amax(0).detach()
        self_weight = torch.exp(u + k - o)
    total = kv * self_weight.unsqueeze(-1)
    for m, x, coef in terms:
        scale = torch.exp(m - o)
        total = total + x * (scale if coef is None else coef * scale).unsqueeze(-1)
    num, den = total[..., 0], total[..., 1]
    return num / (den + OFFICIAL_EPS) if official else num / den


def bi_wkv(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "official"
) -> torch.Tensor:
    """Bidirectional WKV in O(T) per channel, differentiable.

    Args: ``w`` (decay per token) and ``u`` (bonus), shape (C,); ``k``, ``v`` of shape (B, T, C).
    ``variant``: ``"official"`` (the released kernel's chunked recurrence) or ``"paper"``.
    Returns (B, T, C) in k's dtype; the arithmetic is float32 (float64 when an input is float64).
    See the module docstring for the exact formulas.
    """
    _check(w, u, k, v, variant)
    dtype = torch.float32
    for x in (w, u, k, v):
        dtype = torch.promote_types(dtype, x.dtype)
    args = [x.to(dtype) for x in (w, u, k, v)]
    return _chunked_scan(*args, official=variant == "official").to(k.dtype)
