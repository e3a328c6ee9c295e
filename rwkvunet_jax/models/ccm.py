"""Cross-Channel Mix (CCM): the skip-connection module that mixes the three encoder scales."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwkvunet_jax.models.layers import Conv2d, DropPath, Dtype, LayerNorm, resize_bilinear
from rwkvunet_jax.models.mixers import ChannelMix


class CCM(nnx.Module):
    """``CCMix(in_dims=[d2, d1, d0], target_dim=d0)`` of the official code.

    Each skip is bilinearly resized to the stage-1 grid (H/2, W/2), projected to d0 channels (1x1,
    bias), concatenated, mixed by ``z + DropPath(ln1(ChannelMix(z)))``, split back, projected to its
    own width and resized to its own grid. Unlike the official module, the target grid comes from the
    input at run time instead of being fixed at construction. The drop path is always active in
    training: the official code tests the truthiness of a function, which is always true.
    """

    def __init__(self, in_dims: tuple[int, ...], target_dim: int, *, drop_path: float = 0.05,
                 dtype: Dtype = None, rngs: nnx.Rngs):
        self.projections = nnx.List([
            Conv2d(d, target_dim, 1, use_bias=True, dtype=dtype, rngs=rngs) for d in in_dims
        ])
        mixed = target_dim * len(in_dims)
        self.ln1 = LayerNorm(mixed, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.channel = ChannelMix(mixed, 2 * mixed, dtype=dtype, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.final_projections = nnx.List([
            Conv2d(target_dim, d, 1, use_bias=True, dtype=dtype, rngs=rngs) for d in in_dims
        ])

    def __call__(self, features: list[jax.Array]) -> list[jax.Array]:
        """Mixes ``[enc3, enc2, enc1]`` (deepest first, enc1 at H/2) and returns them in that order."""
        th, tw = features[-1].shape[1:3]
        projected = [proj(resize_bilinear(f, th, tw)) for proj, f in zip(self.projections, features)]
        z = jnp.concatenate(projected, axis=-1)
        z = z + self.drop_path(self.ln1(self.channel(z)))
        chunks = jnp.split(z, len(features), axis=-1)
        outputs = []
        for proj, chunk, f in zip(self.final_projections, chunks, features):
            outputs.append(resize_bilinear(proj(chunk), f.shape[1], f.shape[2]))
        return outputs
