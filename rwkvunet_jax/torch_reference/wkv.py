"""Bidirectional WKV in plain PyTorch (CPU or any device), both variants, differentiable.

Two implementations of the same operator:

* :func:`bi_wkv_dense` builds the T x T weight table of the chosen variant explicitly (O(T^2) time
  and memory per channel). It is the definition, used to test the fast one.
* :func:`bi_wkv` computes the same sums in O(T) with prefix/suffix sums (``cumsum``/``cummax``),
  no Python loop over tokens, in float64 so that a single shift per sequence (or per chunk) keeps
  every exponential in range. Use it for real inputs (224 x 224 and above).

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

  and y_t = sum_m W v / (sum_m W + 1e-6 exp(o_t)), where o_t is the largest exponent the kernel
  keeps for token t: the maximum of {k_m - w(t-m): m < s}, {k_m - w(t-m-1): s <= m < t},
  {k_m + w(t-m): s < m < t}, {u + k_t}, {k_t if t > s} and {k_m - w(m-t): m > t}.

The fast version is exact for any shift, so it stays accurate while |spatial_decay| plus the
spread of k is below ~600 (float64 range); the dense one has no such limit. Gradients: o_t only
sets the scale of the epsilon and is held constant (detached), as in :mod:`rwkvunet_jax.wkv`.
"""

from __future__ import annotations

import math

import torch

VARIANTS = ("official", "paper")
OFFICIAL_EPS = 1e-6
OFFICIAL_NUM_CHUNKS = 32
# A finite "minus infinity": empty maxima and padded tokens use it, so no inf - inf = nan appears
# in the forward or the backward pass; exp() of anything near it is exactly 0 in float64.
_NEG = -1e300


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
    e_diag_resid = torch.where(diag & (t_idx > s_idx), kt.expand_as(e_main), torch.full_like(e_main, _NEG))
    o = torch.maximum(torch.maximum(e_main, e_resid), e_diag_resid).amax(dim=-1, keepdim=True).detach()

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
# Linear-time form.


def _exclusive_cumsum(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    # Shift by one instead of cumsum(x) - x: the subtraction would cancel catastrophically when a
    # token's own term dwarfs the sum of the ones before it.
    if reverse:
        x = x.flip(dim)
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    shifted = torch.cat([torch.zeros(pad_shape, dtype=x.dtype), x.narrow(dim, 0, x.shape[dim] - 1)], dim)
    out = torch.cumsum(shifted, dim)
    return out.flip(dim) if reverse else out


def _exclusive_cummax(x: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    if reverse:
        x = x.flip(dim)
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    shifted = torch.cat([torch.full(pad_shape, _NEG, dtype=x.dtype), x.narrow(dim, 0, x.shape[dim] - 1)], dim)
    out = torch.cummax(shifted, dim).values
    return out.flip(dim) if reverse else out


def _weighted_sums(exponent: torch.Tensor, v: torch.Tensor, dim: int, *, reverse: bool = False):
    """Exclusive prefix (or suffix) sums of exp(exponent) and exp(exponent) * v along ``dim``.

    Returned as (den, num, shift) with the true sums equal to den * exp(shift), num * exp(shift);
    ``shift`` is the maximum of ``exponent`` along ``dim`` (per chunk when ``dim`` is the axis inside
    chunks), so the scaled terms never overflow.
    """
    shift = exponent.amax(dim=dim, keepdim=True).detach()
    scaled = torch.exp(exponent - shift)
    den = _exclusive_cumsum(scaled, dim, reverse)
    num = _exclusive_cumsum(scaled * v, dim, reverse)
    return den, num, shift


def _fast_paper(w, u, k, v):
    t_len = k.shape[1]
    pos = torch.arange(t_len, dtype=torch.float64)[None, :, None]
    a_past = k + w * pos  # k_m + w m; past weight exp(a_m - w (t - 1))
    a_future = k - w * pos  # k_m - w m; future weight exp(a_m + w (t + 1))
    off_past = -w * (pos - 1)
    off_future = w * (pos + 1)
    o = torch.maximum(
        u + k,
        torch.maximum(_exclusive_cummax(a_past, 1) + off_past, _exclusive_cummax(a_future, 1, reverse=True) + off_future),
    ).detach()
    d_p, n_p, sh_p = _weighted_sums(a_past, v, 1)
    d_f, n_f, sh_f = _weighted_sums(a_future, v, 1, reverse=True)
    c_p = torch.exp(sh_p + off_past - o)
    c_f = torch.exp(sh_f + off_future - o)
    c_d = torch.exp(u + k - o)
    num = n_p * c_p + n_f * c_f + c_d * v
    den = d_p * c_p + d_f * c_f + c_d
    return num / den


def _fast_official(w, u, k, v):
    b, t_len, c = k.shape
    n = official_chunk_length(t_len)
    num_chunks = math.ceil(t_len / n)
    padded = num_chunks * n
    pos = torch.arange(t_len, dtype=torch.float64)[None, :, None]
    start = torch.div(torch.arange(t_len), n, rounding_mode="floor").to(torch.float64)[None, :, None] * n
    after_start = (pos > start).to(torch.float64)
    ew = torch.exp(w)

    def chunked(x: torch.Tensor, fill: float) -> torch.Tensor:
        x = torch.cat([x, torch.full((b, padded - t_len, c), fill, dtype=x.dtype)], 1) if padded > t_len else x
        return x.reshape(b, num_chunks, n, c)

    def unchunk(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, padded, c)[:, :t_len]

    # Exponent families (each one's weight for token t is exp(family_m + offset_t)):
    a_glob = k + w * pos  # earlier chunks: k_m - w (t - m)            -> offset -w t
    a_loc = k + w * (pos - start)  # same chunk, s <= m < t: k_m - w (t-m-1)  -> offset -w (t - 1 - s)
    r_loc = k - w * (pos - start)  # same chunk, s < m < t: k_m + w (t - m)   -> offset  w (t - s)
    f_glob = k - w * pos  # later tokens: k_m - w (m - t)              -> offset  w t
    off_glob = -w * pos
    off_loc = -w * (pos - 1 - start)
    off_res = w * (pos - start)
    off_fut = w * pos

    # Earlier chunks: per-chunk totals, then an exclusive sum over chunks.
    a_glob_c = chunked(a_glob, _NEG)
    v_c = chunked(v, 0.0)
    sh_g = a_glob_c.amax(dim=(1, 2), keepdim=True).detach()
    sc_g = torch.exp(a_glob_c - sh_g)
    d_g = _exclusive_cumsum(sc_g.sum(2, keepdim=True), 1).expand(b, num_chunks, n, c)
    n_g = _exclusive_cumsum((sc_g * v_c).sum(2, keepdim=True), 1).expand(b, num_chunks, n, c)
    max_g = _exclusive_cummax(a_glob_c.amax(2, keepdim=True), 1).expand(b, num_chunks, n, c)
    d_g, n_g, max_g = unchunk(d_g), unchunk(n_g), unchunk(max_g)
    sh_g = sh_g.reshape(b, 1, c)

    # Same chunk, past tokens (paper-style decay, includes the chunk start).
    a_loc_c = chunked(a_loc, _NEG)
    d_l, n_l, sh_l = _weighted_sums(a_loc_c, v_c, 2)
    max_l = _exclusive_cummax(a_loc_c, 2)
    # Same chunk residual: only tokens strictly after the chunk start take part.
    r_loc_c = chunked(torch.where(after_start.bool(), r_loc, torch.full_like(r_loc, _NEG)), _NEG)
    d_r, n_r, sh_r = _weighted_sums(r_loc_c, v_c, 2)
    max_r = _exclusive_cummax(r_loc_c, 2)
    d_l, n_l, max_l, d_r, n_r, max_r = map(unchunk, (d_l, n_l, max_l, d_r, n_r, max_r))
    sh_l = sh_l.expand(b, num_chunks, n, c).reshape(b, padded, c)[:, :t_len]
    sh_r = sh_r.expand(b, num_chunks, n, c).reshape(b, padded, c)[:, :t_len]

    # Later tokens, all chunks.
    d_f, n_f, sh_f = _weighted_sums(f_glob, v, 1, reverse=True)
    max_f = _exclusive_cummax(f_glob, 1, reverse=True)

    o = torch.stack(
        [
            max_g + off_glob,
            max_l + off_loc,
            max_r + off_res,
            u + k,
            torch.where(after_start.bool(), k, torch.full_like(k, _NEG)),
            max_f + off_fut,
        ]
    ).amax(0).detach()

    c_g = torch.exp(sh_g + off_glob - o)
    c_l = torch.exp(sh_l + off_loc - o)
    c_r = (1.0 - ew) * torch.exp(sh_r + off_res - o)
    c_f = torch.exp(sh_f + off_fut - o)
    self_w = torch.exp(k - o) * (torch.exp(u) + after_start * (1.0 - ew))
    num = n_g * c_g + n_l * c_l + n_r * c_r + n_f * c_f + self_w * v
    den = d_g * c_g + d_l * c_l + d_r * c_r + d_f * c_f + self_w
    return num / (den + OFFICIAL_EPS)


def bi_wkv(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, variant: str = "official"
) -> torch.Tensor:
    """Bidirectional WKV in O(T) per channel (float64 inside, differentiable).

    Args: ``w`` (decay per token) and ``u`` (bonus), shape (C,); ``k``, ``v`` of shape (B, T, C).
    ``variant``: ``"official"`` (the released kernel's chunked recurrence) or ``"paper"``.
    Returns (B, T, C) in k's dtype. See the module docstring for the exact formulas.
    """
    _check(w, u, k, v, variant)
    args = [x.to(torch.float64) for x in (w, u, k, v)]
    fn = _fast_official if variant == "official" else _fast_paper
    return fn(*args).to(k.dtype)
