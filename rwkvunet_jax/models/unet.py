"""RWKV-UNet: encoder, CCM skips, depth-wise decoder and the final 1x1 classifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwkvunet_jax.models.blocks import UpBlock
from rwkvunet_jax.models.ccm import CCM
from rwkvunet_jax.models.encoder import Encoder, prepare_input
from rwkvunet_jax.models.layers import Conv2d
from rwkvunet_jax.models.spec import ModelSpec


class RWKVUNet(nnx.Module):
    """The segmentation network; returns per-pixel logits (B, H, W, num_classes), float32.

    Decoder: ``decoder1(x4)`` -> concat with the mixed enc3 -> ``decoder2`` -> concat enc2 ->
    ``decoder3`` -> concat enc1 -> ``decoder4`` (back at H) -> ``final_conv``. In each concat the
    decoder output comes first, as officially. The stem output is not used as a skip.
    """

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        dtype = spec.compute_dtype
        d0, d1, d2, d3 = spec.widths
        self.encoder = Encoder(spec, rngs=rngs)
        self.ccm = CCM((d2, d1, d0), d0, drop_path=spec.ccm_drop_path, dtype=dtype, rngs=rngs)
        self.decoder1 = UpBlock(d3, d2, dtype=dtype, rngs=rngs)
        self.decoder2 = UpBlock(2 * d2, d1, dtype=dtype, rngs=rngs)
        self.decoder3 = UpBlock(2 * d1, d0, dtype=dtype, rngs=rngs)
        self.decoder4 = UpBlock(2 * d0, spec.stem_width, dtype=dtype, rngs=rngs)
        self.final_conv = Conv2d(spec.stem_width, spec.num_classes, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.spec = spec

    def __call__(self, x: jax.Array) -> jax.Array:
        enc1, enc2, enc3, x4 = self.encoder.features(prepare_input(x, self.spec))
        enc3, enc2, enc1 = self.ccm([enc3, enc2, enc1])
        x = self.decoder1(x4)
        x = self.decoder2(jnp.concatenate([x, enc3], axis=-1))
        x = self.decoder3(jnp.concatenate([x, enc2], axis=-1))
        x = self.decoder4(jnp.concatenate([x, enc1], axis=-1))
        return self.final_conv(x).astype(jnp.float32)
