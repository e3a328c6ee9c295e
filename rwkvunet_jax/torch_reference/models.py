"""The six RWKV-UNet models in PyTorch, with the official state_dict layout (NCHW in, logits out).

``build_torch_model("rwkv_unet_b", num_classes=9, in_chans=1)`` gives a module whose
``state_dict()`` has exactly the keys, shapes and order of the official ``RWKV_UNet`` (the encoders:
``RWKV_UNet_encoder_B``), so official checkpoints load with ``strict=True`` and weights exported
from the JAX models run here. Differences from the official code, none of which changes a weight:
any H, W that are multiples of 16 work (the official code needs square inputs of the size it was
built for); the bidirectional WKV is :func:`rwkvunet_jax.torch_reference.wkv.bi_wkv` (any device,
both variants) instead of the CUDA kernel; a 1-channel input is repeated to 3 channels by every
size (official T takes 3 channels and does not repeat; 3 channels pass through here too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rwkvunet_jax.torch_reference.layers import (
    ChannelMix,
    DropPath,
    InvertedResidualBlock,
    LayerNorm2d,
    UpBlock,
    resize_bilinear,
)

# depths, widths d0..d3, expansion ratios of stages 1-4 (the official encoder sizes).
SIZES: dict[str, dict[str, tuple]] = {
    "t": dict(depths=(2, 2, 4, 2), widths=(32, 48, 96, 160), exp_ratios=(2.0, 2.5, 3.0, 3.5)),
    "s": dict(depths=(3, 3, 6, 3), widths=(32, 64, 128, 192), exp_ratios=(2.0, 2.5, 3.0, 4.0)),
    "b": dict(depths=(3, 3, 6, 3), widths=(48, 72, 144, 240), exp_ratios=(2.0, 2.5, 4.0, 4.0)),
}
MODEL_NAMES = tuple(f"rwkv_unet_{s}" for s in SIZES) + tuple(f"rwkv_unet_encoder_{s}" for s in SIZES)
OVERRIDES = ("depths", "widths", "exp_ratios", "stem_width", "drop_path_rate", "ccm_drop_path", "wkv_variant")

STAGE_NORMS = ("bn", "bn", "ln", "ln")
STAGE_ATTENTION = (False, False, True, True)
DW_KERNEL = 5
IMAGENET_CLASSES = 1000  # the (dead) head inside the official segmentation model's encoder


def _check_input(x: torch.Tensor, in_chans: int) -> None:
    if x.ndim != 4 or x.shape[1] != in_chans or x.shape[2] % 16 or x.shape[3] % 16 or min(x.shape[2:]) == 0:
        raise ValueError(
            f"expected an NCHW input (batch, {in_chans}, height, width) with height and width positive "
            f"multiples of 16, got shape {tuple(x.shape)}"
        )


class RWKVUNetEncoderTorch(nn.Module):
    """Stem (``stage0``), stages ``stage1..4``, final channel LayerNorm ``norm`` and linear ``head``.

    ``forward`` classifies: stages -> ``norm`` -> global average pool -> ``head`` (the official
    encoder's own forward stops at stage 4; :meth:`features` gives the stage outputs).
    """

    def __init__(self, *, num_classes: int = IMAGENET_CLASSES, in_chans: int = 3, depths=SIZES["b"]["depths"],
                 widths=SIZES["b"]["widths"], exp_ratios=SIZES["b"]["exp_ratios"], stem_width: int = 24,
                 drop_path_rate: float = 0.05, wkv_variant: str = "official"):
        super().__init__()
        self.in_chans = in_chans
        stem_in = 3 if in_chans in (1, 3) else in_chans
        self.stage0 = nn.ModuleList([
            InvertedResidualBlock(stem_in, stem_width, exp_ratio=1.0, norm_in=None, dw_kernel=DW_KERNEL,
                                  se_ratio=1.0, wkv_variant=wkv_variant)
        ])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        dim_prev, index = stem_width, 0
        for i, (depth, width, ratio) in enumerate(zip(depths, widths, exp_ratios)):
            blocks = []
            for j in range(depth):
                first = j == 0
                blocks.append(InvertedResidualBlock(
                    dim_prev if first else width, width, exp_ratio=2 * ratio if first else ratio,
                    stride=2 if first else 1, norm_in=STAGE_NORMS[i], attn=STAGE_ATTENTION[i] and not first,
                    dw_kernel=DW_KERNEL, drop_path=rates[index], wkv_variant=wkv_variant,
                ))
                index += 1
            setattr(self, f"stage{i + 1}", nn.ModuleList(blocks))
            dim_prev = width
        self.norm = LayerNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], num_classes)
        self._init_official()

    def _init_official(self) -> None:
        # The official encoder init: trunc-normal(0.02) linears, unit/zero norms, default convs.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_chans)
        return x.repeat(1, 3, 1, 1) if self.in_chans == 1 else x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of stages 1-4 (H/2 .. H/16) of a prepared input."""
        outputs = []
        for i in range(5):
            for block in getattr(self, f"stage{i}"):
                x = block(x)
            if i > 0:
                outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.prepare(x))[-1]
        return self.head(self.norm(x).mean(dim=(2, 3)))


class CCMTorch(nn.Module):
    """Cross-channel mix of the skips ``[enc3, enc2, enc1]`` on the stage-1 grid (official ``CCMix``)."""

    def __init__(self, in_dims: tuple[int, ...], target_dim: int, *, drop_path: float = 0.05):
        super().__init__()
        mixed = target_dim * len(in_dims)
        self.projections = nn.ModuleList([nn.Conv2d(d, target_dim, 1) for d in in_dims])
        self.ln1 = nn.LayerNorm(mixed)
        self.channel = ChannelMix(mixed, 2 * mixed)
        self.drop_path = DropPath(drop_path)
        self.final_projections = nn.ModuleList([nn.Conv2d(target_dim, d, 1) for d in in_dims])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        th, tw = features[-1].shape[-2:]
        z = torch.cat([p(resize_bilinear(f, (th, tw))) for p, f in zip(self.projections, features)], dim=1)
        b, c, h, w = z.shape
        tokens = z.flatten(2).transpose(1, 2)
        tokens = tokens + self.drop_path(self.ln1(self.channel(tokens, (h, w))))
        z = tokens.transpose(1, 2).reshape(b, c, h, w)
        chunks = torch.chunk(z, len(features), dim=1)
        return [resize_bilinear(p(chunk), tuple(f.shape[-2:]))
                for p, chunk, f in zip(self.final_projections, chunks, features)]


class RWKVUNetTorch(nn.Module):
    """The segmentation model: ``encoder``, ``ccm``, ``decoder1..4``, ``final_conv``; NCHW logits."""

    def __init__(self, *, num_classes: int, in_chans: int = 1, depths=SIZES["b"]["depths"],
                 widths=SIZES["b"]["widths"], exp_ratios=SIZES["b"]["exp_ratios"], stem_width: int = 24,
                 drop_path_rate: float = 0.05, ccm_drop_path: float = 0.05, wkv_variant: str = "official"):
        super().__init__()
        d0, d1, d2, d3 = widths
        self.encoder = RWKVUNetEncoderTorch(
            num_classes=IMAGENET_CLASSES, in_chans=in_chans, depths=depths, widths=widths, exp_ratios=exp_ratios,
            stem_width=stem_width, drop_path_rate=drop_path_rate, wkv_variant=wkv_variant)
        self.ccm = CCMTorch((d2, d1, d0), d0, drop_path=ccm_drop_path)
        self.decoder1 = UpBlock(d3, d2)
        self.decoder2 = UpBlock(2 * d2, d1)
        self.decoder3 = UpBlock(2 * d1, d0)
        self.decoder4 = UpBlock(2 * d0, stem_width)
        self.final_conv = nn.Conv2d(stem_width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc1, enc2, enc3, x4 = self.encoder.features(self.encoder.prepare(x))
        enc3, enc2, enc1 = self.ccm([enc3, enc2, enc1])
        x = self.decoder1(x4)
        x = self.decoder2(torch.cat([x, enc3], dim=1))
        x = self.decoder3(torch.cat([x, enc2], dim=1))
        x = self.decoder4(torch.cat([x, enc1], dim=1))
        return self.final_conv(x)


def build_torch_model(name: str, *, num_classes: int, in_chans: int = 3, **overrides: Any) -> nn.Module:
    """A PyTorch RWKV-UNet (``rwkv_unet_t|s|b``) or encoder classifier (``rwkv_unet_encoder_t|s|b``).

    Args:
      name: model name, as for :func:`rwkvunet_jax.create_model`.
      num_classes: segmentation classes, or classifier classes.
      in_chans: 1 (repeated to 3), 3, or any other count (the stem is built for it).
      **overrides: ``depths``, ``widths``, ``exp_ratios``, ``stem_width``, ``drop_path_rate``,
        ``ccm_drop_path`` (segmentation only) and ``wkv_variant`` ("official" | "paper").
    Returns:
      The module in training mode (call ``.eval()`` for inference); input NCHW float.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; allowed: {', '.join(OVERRIDES)}")
    size = name.rsplit("_", 1)[-1]
    kwargs = {**SIZES[size], **overrides}
    if "wkv_variant" in kwargs and kwargs["wkv_variant"] not in ("official", "paper"):
        raise ValueError(f"wkv_variant must be 'official' or 'paper', got {kwargs['wkv_variant']!r}")
    if name.startswith("rwkv_unet_encoder_"):
        kwargs.pop("ccm_drop_path", None)
        return RWKVUNetEncoderTorch(num_classes=num_classes, in_chans=in_chans, **kwargs)
    return RWKVUNetTorch(num_classes=num_classes, in_chans=in_chans, **kwargs)
