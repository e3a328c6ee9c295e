"""Encoder blocks (IR and IR-RWKV, the stem is an IR block with SE) and the decoder up-block."""

from __future__ import annotations

import jax
from flax import nnx

from rwkvunet_jax.models.layers import (
    BatchNorm2d,
    ConvNormAct,
    DropPath,
    Dtype,
    LayerNorm,
    LayerNorm2d,
    SqueezeExcite,
    resize_bilinear,
)
from rwkvunet_jax.models.mixers import SpatialMix


class InvertedResidual(nnx.Module):
    """The official ``iRMB``-style block: IR block, or IR-RWKV block when ``attn`` is set.

    x -> input norm -> 1x1 expand (BN, ReLU) -> [x + DropPath(ln1(SpatialMix(x)))] ->
    depth-wise conv (BN, SiLU) [-> SE] with an inner residual when ``has_skip`` -> 1x1 project ->
    shortcut + DropPath(x) when ``has_skip``.

    Quirks kept from the official code for weight compatibility: the expansion always uses ReLU and
    the depth-wise conv SiLU whatever the stage's nominal activation; ``ln1`` is a post-norm on the
    attention branch; the same drop-path rate is applied to the attention branch and the residual.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        exp_ratio: float,
        stride: int = 1,
        norm_in: str | None = None,
        attn: bool = False,
        dw_kernel: int = 5,
        se_ratio: float = 0.0,
        drop_path: float = 0.0,
        wkv_variant: str = "official",
        wkv_impl: str = "auto",
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        dim_mid = int(dim_in * exp_ratio)
        self.has_skip = dim_in == dim_out and stride == 1
        if norm_in == "bn":
            self.norm = BatchNorm2d(dim_in, dtype=dtype, rngs=rngs)
        elif norm_in == "ln":
            self.norm = LayerNorm2d(dim_in, dtype=dtype, rngs=rngs)
        elif norm_in is None:
            self.norm = None
        else:
            raise ValueError(f"norm_in must be 'bn', 'ln' or None, got {norm_in!r}")
        self.conv = ConvNormAct(dim_in, dim_mid, 1, act="relu", dtype=dtype, rngs=rngs)
        if attn:
            self.att = SpatialMix(dim_mid, wkv_variant=wkv_variant, wkv_impl=wkv_impl, dtype=dtype, rngs=rngs)
            self.ln1 = LayerNorm(dim_mid, epsilon=1e-5, dtype=dtype, rngs=rngs)
        else:
            self.att = None
            self.ln1 = None
        self.conv_local = ConvNormAct(
            dim_mid, dim_mid, dw_kernel, stride=stride, groups=dim_mid, act="silu", dtype=dtype, rngs=rngs
        )
        self.se = SqueezeExcite(dim_mid, round(dim_mid * se_ratio), dtype=dtype, rngs=rngs) if se_ratio > 0 else None
        self.proj = ConvNormAct(dim_mid, dim_out, 1, norm=False, act=None, dtype=dtype, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs) if (self.has_skip or attn) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        shortcut = x
        if self.norm is not None:
            x = self.norm(x)
        x = self.conv(x)
        if self.att is not None:
            x = x + self.drop_path(self.ln1(self.att(x)))
        y = self.conv_local(x)
        if self.se is not None:
            y = self.se(y)
        x = x + y if self.has_skip else y
        x = self.proj(x)
        if self.has_skip:
            x = shortcut + self.drop_path(x)
        return x


class UpBlock(nnx.Module):
    """Decoder block: 1x1 (BN, ReLU) -> depth-wise 9x9 (BN, SiLU) -> 1x1 (BN, ReLU) -> bilinear x2."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype: Dtype = None, rngs: nnx.Rngs):
        self.conv = ConvNormAct(dim_in, dim_in, 1, act="relu", dtype=dtype, rngs=rngs)
        self.conv_local = ConvNormAct(dim_in, dim_in, 9, groups=dim_in, act="silu", dtype=dtype, rngs=rngs)
        self.proj = ConvNormAct(dim_in, dim_out, 1, act="relu", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(self.conv_local(self.conv(x)))
        return resize_bilinear(x, 2 * x.shape[1], 2 * x.shape[2])
