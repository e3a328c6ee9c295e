"""Token mixers: the RWKV spatial mix (bidirectional WKV) and the CCM's channel mix.

Both work on NHWC grids. The official code flattens to tokens and rebuilds square grids with
``int(sqrt(N))``; we keep the (H, W) grid, so any multiple-of-16 input works, square or not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwkvunet_jax.models.layers import Dtype, LayerNorm, Linear, q_shift, trunc_normal_002


def _mix_vector(channels: int) -> nnx.Param:
    # The official (1, 1, C) mixing vectors, initialised to 0.5; kept as (C,) here.
    return nnx.Param(jnp.full((channels,), 0.5, jnp.float32))


class SpatialMix(nnx.Module):
    """VRWKV spatial mix: token shift, k/v/r projections, bidirectional WKV, key norm, sigmoid gate.

    ``wkv = BiWKV(spatial_decay / T, spatial_first / T, k, v)`` with T = H*W tokens, then
    ``output(sigmoid(r) * key_norm(wkv))``. Linear weights are trunc-normal(0.02), as the official
    encoder initialisation sets them.
    """

    def __init__(
        self,
        channels: int,
        *,
        wkv_variant: str = "official",
        wkv_impl: str = "auto",
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        self.spatial_decay = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.spatial_first = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.spatial_mix_k = _mix_vector(channels)
        self.spatial_mix_v = _mix_vector(channels)
        self.spatial_mix_r = _mix_vector(channels)
        linear = dict(kernel_init=trunc_normal_002, dtype=dtype, rngs=rngs)
        self.key = Linear(channels, channels, **linear)
        self.value = Linear(channels, channels, **linear)
        self.receptance = Linear(channels, channels, **linear)
        self.key_norm = LayerNorm(channels, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.output = Linear(channels, channels, **linear)
        self.wkv_variant = wkv_variant
        self.wkv_impl = wkv_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        from rwkvunet_jax.wkv import bi_wkv  # the models never import kernels at import time

        b, h, w, c = x.shape
        num_tokens = h * w
        xx = q_shift(x)
        mix_k, mix_v, mix_r = self.spatial_mix_k[...], self.spatial_mix_v[...], self.spatial_mix_r[...]
        xk = (x * mix_k + xx * (1 - mix_k)).astype(x.dtype)
        xv = (x * mix_v + xx * (1 - mix_v)).astype(x.dtype)
        xr = (x * mix_r + xx * (1 - mix_r)).astype(x.dtype)
        k = self.key(xk).reshape(b, num_tokens, c)
        v = self.value(xv).reshape(b, num_tokens, c)
        r = self.receptance(xr)
        decay = self.spatial_decay[...] / num_tokens
        first = self.spatial_first[...] / num_tokens
        y = bi_wkv(decay, first, k, v, impl=self.wkv_impl, variant=self.wkv_variant)
        y = self.key_norm(y.reshape(b, h, w, c))
        return self.output(jax.nn.sigmoid(r) * y)


class ChannelMix(nnx.Module):
    """VRWKV channel mix as the CCM uses it: ``sigmoid(r) * value(key_norm(relu(key(xk))**2))``.

    The key LayerNorm sits after the squared ReLU (official order). Linear layers use PyTorch's
    default init here, since the official CCM is not covered by the encoder's trunc-normal init.
    """

    def __init__(self, channels: int, hidden: int, *, dtype: Dtype = None, rngs: nnx.Rngs):
        self.spatial_mix_k = _mix_vector(channels)
        self.spatial_mix_r = _mix_vector(channels)
        self.key = Linear(channels, hidden, dtype=dtype, rngs=rngs)
        self.key_norm = LayerNorm(hidden, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.receptance = Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.value = Linear(hidden, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        xx = q_shift(x)
        mix_k, mix_r = self.spatial_mix_k[...], self.spatial_mix_r[...]
        xk = (x * mix_k + xx * (1 - mix_k)).astype(x.dtype)
        xr = (x * mix_r + xx * (1 - mix_r)).astype(x.dtype)
        k = jnp.square(jax.nn.relu(self.key(xk)))
        kv = self.value(self.key_norm(k))
        return jax.nn.sigmoid(self.receptance(xr)) * kv
