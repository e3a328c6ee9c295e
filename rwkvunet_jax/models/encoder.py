"""The RWKV-UNet encoder (stem + four stages) and its ImageNet classifier."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkvunet_jax.models.blocks import InvertedResidual
from rwkvunet_jax.models.layers import LayerNorm2d, Linear, trunc_normal_002
from rwkvunet_jax.models.spec import ModelSpec

# Per stage (1-4): block input norm, whether IR-RWKV blocks (attention) are used.
STAGE_NORMS = ("bn", "bn", "ln", "ln")
STAGE_ATTENTION = (False, False, True, True)
DW_KERNEL = 5


def check_input(x: jax.Array, in_chans: int) -> None:
    """Raises ValueError unless ``x`` is (B, H, W, in_chans) float with H, W multiples of 16."""
    expected = f"(batch, height, width, {in_chans}) with height and width positive multiples of 16"
    if x.ndim != 4:
        raise ValueError(f"expected a rank-4 NHWC input {expected}, got shape {tuple(x.shape)}")
    _, h, w, c = x.shape
    if c != in_chans:
        raise ValueError(f"expected {in_chans} input channel(s): shape {expected}, got shape {tuple(x.shape)}")
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f"height and width must be positive multiples of 16: expected {expected}, got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"expected a floating-point input, got dtype {x.dtype}")


def prepare_input(x: jax.Array, spec: ModelSpec) -> jax.Array:
    """Validates ``x``, repeats a single channel to three (official S/B) and casts to the compute dtype."""
    check_input(x, spec.in_chans)
    if spec.in_chans == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return x.astype(spec.compute_dtype)


class Encoder(nnx.Module):
    """Stem (``stage0``) and four stages (``stage1``..``stage4``) of IR / IR-RWKV blocks.

    The first block of each stage downsamples by 2 in its depth-wise conv, has no skip and expands by
    twice the stage ratio; the others keep the width, have skips and (stages 3-4) attention.
    """

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        dtype = spec.compute_dtype
        common = dict(wkv_variant=spec.wkv_variant, wkv_impl=spec.wkv_impl, dtype=dtype, rngs=rngs)
        self.stage0 = nnx.List([
            InvertedResidual(spec.stem_in_chans, spec.stem_width, exp_ratio=1.0, norm_in=None,
                             dw_kernel=DW_KERNEL, se_ratio=1.0, **common)
        ])
        rates = np.linspace(0.0, spec.drop_path_rate, sum(spec.depths)).tolist()
        dim_prev, block_index = spec.stem_width, 0
        for i, (depth, width, ratio) in enumerate(zip(spec.depths, spec.widths, spec.exp_ratios)):
            blocks = []
            for j in range(depth):
                first = j == 0
                blocks.append(InvertedResidual(
                    dim_prev if first else width,
                    width,
                    exp_ratio=2 * ratio if first else ratio,
                    stride=2 if first else 1,
                    norm_in=STAGE_NORMS[i],
                    attn=STAGE_ATTENTION[i] and not first,
                    dw_kernel=DW_KERNEL,
                    drop_path=rates[block_index],
                    **common,
                ))
                block_index += 1
            setattr(self, f"stage{i + 1}", nnx.List(blocks))
            dim_prev = width
        self.spec = spec

    def stages(self) -> list[nnx.List]:
        return [self.stage0, self.stage1, self.stage2, self.stage3, self.stage4]

    def features(self, x: jax.Array) -> list[jax.Array]:
        """Runs the encoder on a prepared input; returns the outputs of stages 1-4 (H/2 .. H/16)."""
        outputs = []
        for index, stage in enumerate(self.stages()):
            for block in stage:
                x = block(x)
            if index > 0:
                outputs.append(x)
        return outputs

    def __call__(self, x: jax.Array) -> jax.Array:
        """Stage-4 features (B, H/16, W/16, widths[3]) of an NHWC image batch."""
        return self.features(prepare_input(x, self.spec))[-1]


class EncoderClassifier(Encoder):
    """The encoder with its final channel LayerNorm, global average pool and linear head.

    The official encoder's ``forward`` stops at stage 4 and never calls ``norm``/``head``; this is the
    classification path its ImageNet pretraining used. Names match the official encoder file
    (``stage0..4``, ``norm.norm``, ``head``).
    """

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        super().__init__(spec, rngs=rngs)
        self.norm = LayerNorm2d(spec.widths[-1], dtype=spec.compute_dtype, rngs=rngs)
        # The official encoder init: trunc-normal(0.02) weight, zero bias.
        self.head = Linear(spec.widths[-1], spec.num_classes, use_bias=True, kernel_init=trunc_normal_002, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Class logits (B, num_classes), float32."""
        x = self.features(prepare_input(x, self.spec))[-1]
        x = jnp.mean(self.norm(x), axis=(1, 2))
        return self.head(x.astype(jnp.float32))
