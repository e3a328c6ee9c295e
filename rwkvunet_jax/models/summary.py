"""Parameter and MAC counts of a model, and the paper's figures to compare them with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rwkvunet_jax.models import flops

# Paper figures (params in M, FLOPs = MACs in G): Table 1 (encoders, ImageNet at 224), Table 5
# (segmentation at 256, one class) and the Synapse ablation (base at 224, 9 classes).
PAPER_FIGURES: dict[tuple[str, int, int | None], tuple[float, float]] = {
    ("rwkv_unet_encoder_t", 224, None): (2.6, 1.9),
    ("rwkv_unet_encoder_s", 224, None): (9.4, 4.8),
    ("rwkv_unet_encoder_b", 224, None): (16.7, 9.0),
    ("rwkv_unet_t", 256, 1): (3.3, 3.78),
    ("rwkv_unet_s", 256, 1): (9.9, 7.75),
    ("rwkv_unet_b", 256, 1): (17.4, 14.64),
    ("rwkv_unet_b", 224, 9): (17.4, 11.22),
}

# Parameters the official PyTorch forward pass uses, measured with hooks (docs/official-sizes.md);
# the official state_dicts also hold ~40% dead tensors, not counted here.
OFFICIAL_USED_PARAMS: dict[tuple[str, int, int], int] = {
    ("rwkv_unet_t", 1, 3): 3_145_761,
    ("rwkv_unet_t", 9, 3): 3_145_761 + 8 * 25,
    ("rwkv_unet_s", 9, 1): 9_702_145,
    ("rwkv_unet_s", 1, 1): 9_702_145 - 8 * 25,
    ("rwkv_unet_b", 9, 1): 17_125_713,
    ("rwkv_unet_b", 1, 1): 17_125_713 - 8 * 25,
    ("rwkv_unet_encoder_t", 1000, 3): 3_099_792,
    ("rwkv_unet_encoder_s", 1000, 3): 9_609_432,
    ("rwkv_unet_encoder_b", 1000, 3): 16_935_520,
}


def param_count(model: nnx.Module) -> int:
    """Number of trainable parameters (BatchNorm statistics excluded)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def model_macs(model: nnx.Module, height: int, width: int) -> dict[str, int]:
    """MACs per kind of one forward pass of one image, counted as the paper counts (see flops)."""
    spec = model.spec
    graphdef, state = nnx.split(model)

    def forward(state, x):
        module = nnx.merge(graphdef, state)
        module.eval()
        return module(x)

    x = jax.ShapeDtypeStruct((1, height, width, spec.in_chans), jnp.float32)
    return flops.count_macs(forward, state, x)


def paper_figures(name: str, height: int, width: int, num_classes: int) -> tuple[float, float] | None:
    """The paper's (params M, GFLOPs) for this configuration, if the paper reports it."""
    if height != width:
        return None
    for key in ((name, height, num_classes), (name, height, None)):
        if key in PAPER_FIGURES and (key[2] is not None or name.startswith("rwkv_unet_encoder")):
            return PAPER_FIGURES[key]
    return None
