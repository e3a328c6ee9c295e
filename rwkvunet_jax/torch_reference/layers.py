"""PyTorch building blocks of RWKV-UNet with the official module and parameter names (NCHW).

Every module registers its parameters in the order of the official code, so that a model's
``state_dict()`` lists the official keys in the official order, dead tensors included (``ln2`` of
every block, ``att``/``ln1`` of blocks without attention, ``ln1`` of the decoder blocks). Token grids
keep their (H, W) shape instead of the official ``int(sqrt(N))``, so non-square inputs work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwkvunet_jax.torch_reference.wkv import bi_wkv

BN_EPS = 1e-6  # every BatchNorm2d and the channel LayerNorm of the official code
TOKEN_LN_EPS = 1e-5  # nn.LayerNorm's default, used on token tensors (ln1, key_norm)

_ACTIVATIONS = {"relu": F.relu, "silu": F.silu, None: lambda x: x}


def torch_padding(kernel_size: int, stride: int) -> int:
    """The official symmetric padding ``ceil((k - s) / 2)``."""
    return -(-(kernel_size - stride) // 2)


class ConvNormAct(nn.Module):
    """Conv2d without bias (``.conv``), optional BatchNorm (``.norm``, eps 1e-6), optional activation."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 1, *, stride: int = 1, groups: int = 1,
                 norm: bool = True, act: str | None = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim_out, kernel_size, stride, torch_padding(kernel_size, stride),
                              groups=groups, bias=False)
        self.norm = nn.BatchNorm2d(dim_out, eps=BN_EPS) if norm else nn.Identity()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ACTIVATIONS[self.act](self.norm(self.conv(x)))


class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every pixel of an NCHW tensor; the LayerNorm is ``.norm``."""

    def __init__(self, channels: int, eps: float = BN_EPS):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Mean over H, W -> 1x1 conv (bias) -> SiLU -> 1x1 conv (bias) -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(s))))


class DropPath(nn.Module):
    """Stochastic depth per sample, active in training mode only."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def q_shift(tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The official token shift on tokens (B, H*W, C) laid out row-major on the (H, W) grid.

    Channel groups ``[0, C/4)``, ``[C/4, C/2)``, ``[C/2, 3C/4)``, ``[3C/4, C)`` (integer bounds) take
    the left, right, upper and lower neighbour; borders are zero.
    """
    b, n, c = tokens.shape
    h, w = hw
    x = tokens.transpose(1, 2).reshape(b, c, h, w)
    out = torch.zeros_like(x)
    b1, b2, b3 = int(c / 4), int(c / 2), int(c * 3 / 4)
    out[:, :b1, :, 1:] = x[:, :b1, :, :-1]
    out[:, b1:b2, :, :-1] = x[:, b1:b2, :, 1:]
    out[:, b2:b3, 1:, :] = x[:, b2:b3, :-1, :]
    out[:, b3:, :-1, :] = x[:, b3:, 1:, :]
    return out.flatten(2).transpose(1, 2)


class SpatialMix(nn.Module):
    """VRWKV spatial mix: token shift, k/v/r, bidirectional WKV, ``key_norm``, sigmoid(r) gate, output."""

    def __init__(self, channels: int, *, wkv_variant: str = "official"):
        super().__init__()
        self.spatial_decay = nn.Parameter(torch.zeros(channels))
        self.spatial_first = nn.Parameter(torch.zeros(channels))
        self.spatial_mix_k = nn.Parameter(torch.full((1, 1, channels), 0.5))
        self.spatial_mix_v = nn.Parameter(torch.full((1, 1, channels), 0.5))
        self.spatial_mix_r = nn.Parameter(torch.full((1, 1, channels), 0.5))
        self.key = nn.Linear(channels, channels, bias=False)
        self.value = nn.Linear(channels, channels, bias=False)
        self.receptance = nn.Linear(channels, channels, bias=False)
        self.key_norm = nn.LayerNorm(channels, eps=TOKEN_LN_EPS)
        self.output = nn.Linear(channels, channels, bias=False)
        self.wkv_variant = wkv_variant

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        num_tokens = x.shape[1]
        xx = q_shift(x, hw)
        xk = x * self.spatial_mix_k + xx * (1 - self.spatial_mix_k)
        xv = x * self.spatial_mix_v + xx * (1 - self.spatial_mix_v)
        xr = x * self.spatial_mix_r + xx * (1 - self.spatial_mix_r)
        k, v, r = self.key(xk), self.value(xv), self.receptance(xr)
        y = bi_wkv(self.spatial_decay / num_tokens, self.spatial_first / num_tokens, k, v, variant=self.wkv_variant)
        return self.output(torch.sigmoid(r) * self.key_norm(y))


class ChannelMix(nn.Module):
    """The CCM's channel mix: ``sigmoid(receptance(xr)) * value(key_norm(relu(key(xk))^2))``."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.spatial_mix_k = nn.Parameter(torch.full((1, 1, channels), 0.5))
        self.spatial_mix_r = nn.Parameter(torch.full((1, 1, channels), 0.5))
        self.key = nn.Linear(channels, hidden, bias=False)
        self.key_norm = nn.LayerNorm(hidden, eps=TOKEN_LN_EPS)
        self.receptance = nn.Linear(channels, channels, bias=False)
        self.value = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        xx = q_shift(x, hw)
        xk = x * self.spatial_mix_k + xx * (1 - self.spatial_mix_k)
        xr = x * self.spatial_mix_r + xx * (1 - self.spatial_mix_r)
        k = torch.square(F.relu(self.key(xk)))
        return torch.sigmoid(self.receptance(xr)) * self.value(self.key_norm(k))


class InvertedResidualBlock(nn.Module):
    """The official encoder block (IR block; IR-RWKV block when ``attn``), dead tensors included.

    Forward: input norm -> 1x1 expand (BN, ReLU) -> [x + DropPath(ln1(att(x)))] -> depth-wise conv
    (BN, SiLU) [-> SE] with an inner residual when skipping -> 1x1 project -> shortcut + DropPath(x).
    ``att`` and ``ln1`` exist in every block (the official module always builds them) but run only
    when ``attn``; ``ln2`` never runs.
    """

    def __init__(self, dim_in: int, dim_out: int, *, exp_ratio: float, stride: int = 1, norm_in: str | None = None,
                 attn: bool = False, dw_kernel: int = 5, se_ratio: float = 0.0, drop_path: float = 0.0,
                 wkv_variant: str = "official"):
        super().__init__()
        dim_mid = int(dim_in * exp_ratio)
        self.has_skip = dim_in == dim_out and stride == 1
        self.attn = attn
        if norm_in == "bn":
            self.norm = nn.BatchNorm2d(dim_in, eps=BN_EPS)
        elif norm_in == "ln":
            self.norm = LayerNorm2d(dim_in)
        elif norm_in is None:
            self.norm = nn.Identity()
        else:
            raise ValueError(f"norm_in must be 'bn', 'ln' or None, got {norm_in!r}")
        self.ln1 = nn.LayerNorm(dim_mid, eps=TOKEN_LN_EPS)
        self.ln2 = nn.LayerNorm(dim_mid, eps=TOKEN_LN_EPS)
        self.conv = ConvNormAct(dim_in, dim_mid, 1, act="relu")
        self.att = SpatialMix(dim_mid, wkv_variant=wkv_variant)
        self.se = SqueezeExcite(dim_mid, round(dim_mid * se_ratio)) if se_ratio > 0 else nn.Identity()
        self.proj = ConvNormAct(dim_mid, dim_out, 1, norm=False, act=None)
        self.conv_local = ConvNormAct(dim_mid, dim_mid, dw_kernel, stride=stride, groups=dim_mid, act="silu")
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv(self.norm(x))
        if self.attn:
            b, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            tokens = tokens + self.drop_path(self.ln1(self.att(tokens, (h, w))))
            x = tokens.transpose(1, 2).reshape(b, c, h, w)
        y = self.se(self.conv_local(x))
        x = x + y if self.has_skip else y
        x = self.proj(x)
        return shortcut + self.drop_path(x) if self.has_skip else x


class UpBlock(nn.Module):
    """Decoder block: 1x1 (BN, ReLU) -> depth-wise 9x9 (BN, SiLU) -> 1x1 (BN, ReLU) -> bilinear x2.

    ``ln1`` is a dead tensor of the official module, kept for the names.
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim_in, eps=TOKEN_LN_EPS)
        self.conv = ConvNormAct(dim_in, dim_in, 1, act="relu")
        self.proj = ConvNormAct(dim_in, dim_out, 1, act="relu")
        self.conv_local = ConvNormAct(dim_in, dim_in, 9, groups=dim_in, act="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.conv_local(self.conv(x)))
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(bilinear, align_corners=False)`` (no antialiasing), skipped at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
