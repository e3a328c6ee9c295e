"""Depth-wise 2-D convolution for XLA:CPU as shifted-slice sums, with a hand-written gradient.

XLA:CPU runs ``lax.conv_general_dilated(..., feature_group_count=C)`` with one channel per group through
generic code: on RWKV-UNet-T at 224 (batch 4) the depth-wise convolutions and their gradients took most of
a training step. This path is 28-56x faster forward and 5-20x faster for the gradient on those shapes
(2 cores; ``benchmarks/depthwise_grad_cpu.py``). Written as a sum of kh*kw shifted (and strided)
slices times the per-channel tap, the forward fuses into one vectorised loop over NHWC (channels
innermost). Autodiff of that sum would be slow again (kh*kw padded copies for the input gradient and
kh*kw full-array reductions for the kernel gradient, each reading the whole activation from memory), so the
gradient is written out:

* input gradient: the same shifted-slice sum over the output gradient (dilated by the stride, padded to a
  "full" correlation) with the kernel flipped;
* kernel gradient: a loop over output rows; each iteration reduces the kh*kw products of one output row
  with the kh input rows under it, which stay in cache.

``benchmarks/depthwise_grad_cpu.py`` compares it with ``lax.conv``. Other backends keep ``lax.conv``
(cuDNN and the TPU compiler have proper depth-wise kernels); :class:`rwkvunet_jax.models.layers.Conv2d`
chooses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["depthwise_conv2d"]

Padding = tuple[tuple[int, int], tuple[int, int]]


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    """Depth-wise convolution (cross-correlation, like PyTorch and lax) of NHWC ``x`` with ``kernel`` (kh, kw, C).

    ``padding`` is ((top, bottom), (left, right)) of zeros; ``stride`` applies to both axes. The arithmetic
    is float32 at least (bfloat16 inputs accumulate in float32); the result has ``x``'s dtype.
    """
    if x.ndim != 4 or kernel.ndim != 3 or kernel.shape[2] != x.shape[3]:
        raise ValueError(
            f"depthwise_conv2d: expected x (N, H, W, C) and kernel (kh, kw, C); got x {x.shape}, kernel {kernel.shape}"
        )
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return _depthwise(x, kernel, int(stride), padding)


def _output_size(size: int, pad: tuple[int, int], k: int, stride: int) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def _shifted_sum(padded: jax.Array, kernel: jax.Array, stride: int, out_h: int, out_w: int) -> jax.Array:
    """sum_{a,b} padded[:, a + stride*i, b + stride*j, :] * kernel[a, b], in the compute dtype."""
    kh, kw = kernel.shape[:2]
    total = None
    for a in range(kh):
        for b in range(kw):
            window = padded[:, a : a + stride * (out_h - 1) + 1 : stride, b : b + stride * (out_w - 1) + 1 : stride]
            term = window * kernel[a, b]
            total = term if total is None else total + term
    return total


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
    compute = _compute_dtype(x)
    (pt, pb), (pl, pr) = padding
    kh, kw = kernel.shape[:2]
    out_h = _output_size(x.shape[1], padding[0], kh, stride)
    out_w = _output_size(x.shape[2], padding[1], kw, stride)
    padded = jnp.pad(x.astype(compute), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    return _shifted_sum(padded, kernel.astype(compute), stride, out_h, out_w).astype(x.dtype)


def _depthwise_fwd(x, kernel, stride, padding):
    return _depthwise(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, residuals, grad_out):
    x, kernel = residuals
    compute = _compute_dtype(x)
    kh, kw = kernel.shape[:2]
    height, width = x.shape[1:3]
    out_h, out_w = grad_out.shape[1:3]
    g = grad_out.astype(compute)
    k = kernel.astype(compute)
    (pt, pb), (pl, pr) = padding

    # d x[p] = sum_{a,b} g[(p + pad - a) / stride] k[a, b] over the integer quotients: a full correlation of the
    # stride-dilated gradient with the flipped kernel. Rows/columns of the padded input that no window reaches
    # (the high side when (H + pads - kh) is not a multiple of the stride) get the negative high pad, a crop.
    def full_pad(size, lo, k_len, out_len):
        low = k_len - 1 - lo
        high = size + k_len - 1 - low - (stride * (out_len - 1) + 1)
        return low, high, stride - 1

    dilated = lax.pad(
        g,
        jnp.zeros((), compute),
        ((0, 0, 0), full_pad(height, pt, kh, out_h), full_pad(width, pl, kw, out_w), (0, 0, 0)),
    )
    grad_x = _shifted_sum(dilated, k[::-1, ::-1], 1, height, width).astype(x.dtype)

    # d k[a, b] = sum_{n,i,j} padded[n, a + stride*i, b + stride*j] g[n, i, j], one output row i per iteration.
    padded = jnp.pad(x.astype(compute), ((0, 0), (pt, pb), (pl, pr), (0, 0)))

    def add_row(i, acc):
        rows = lax.dynamic_slice_in_dim(padded, stride * i, kh, axis=1)
        g_row = lax.dynamic_slice_in_dim(g, i, 1, axis=1)
        taps = [
            jnp.sum(rows[:, a : a + 1, b : b + stride * (out_w - 1) + 1 : stride] * g_row, axis=(0, 1, 2))
            for a in range(kh)
            for b in range(kw)
        ]
        return acc + jnp.stack(taps).reshape(kh, kw, -1)

    grad_k = lax.fori_loop(0, out_h, add_row, jnp.zeros(kernel.shape, compute)).astype(kernel.dtype)
    return grad_x, grad_k


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)
