"""The description of a model variant: sizes, classes, input channels and options."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from rwkvunet_jax.wkv import IMPLS as WKV_IMPLS
from rwkvunet_jax.wkv import VARIANTS as WKV_VARIANTS


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; ``overrides`` lists what differs from the registry.

    Attributes:
      name: registry name, e.g. ``rwkv_unet_b`` or ``rwkv_unet_encoder_t``.
      task: ``"segmentation"`` or ``"classification"``.
      num_classes: output channels (segmentation) or classes (classification).
      in_chans: input channels. 1 is repeated to 3 (what official S/B do), 3 passes, any other count
        builds a stem for that many channels.
      depths, widths, exp_ratios: blocks, output channels and expansion ratio of stages 1-4.
      stem_width: stem output channels (24 in every official size).
      drop_path_rate: the last block's stochastic-depth rate (linearly increasing from 0).
      ccm_drop_path: the CCM's drop-path rate (always active in training, as officially).
      wkv_variant: ``"official"`` (what the shipped CUDA kernel computes) or ``"paper"``.
      wkv_impl: ``"auto"``, ``"scan"``, ``"chunked"``, ``"naive"`` or ``"pallas"``.
      dtype: compute dtype name (``"float32"``, ``"bfloat16"``); parameters are always float32.
    """

    name: str
    task: str
    num_classes: int
    in_chans: int
    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    exp_ratios: tuple[float, float, float, float]
    stem_width: int = 24
    drop_path_rate: float = 0.05
    ccm_drop_path: float = 0.05
    wkv_variant: str = "official"
    wkv_impl: str = "auto"
    dtype: str = "float32"
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.task not in ("segmentation", "classification"):
            raise ValueError(f"task must be 'segmentation' or 'classification', got {self.task!r}")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if int(self.in_chans) < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        for field in ("depths", "widths", "exp_ratios"):
            value = getattr(self, field)
            if len(value) != 4:
                raise ValueError(f"{field} needs 4 entries (one per stage), got {value!r}")
        if any(int(d) < 1 for d in self.depths):
            raise ValueError(f"every stage needs at least one block, got depths={self.depths!r}")
        if self.wkv_variant not in WKV_VARIANTS:
            raise ValueError(f"wkv_variant must be one of {WKV_VARIANTS}, got {self.wkv_variant!r}")
        if self.wkv_impl not in WKV_IMPLS:
            raise ValueError(f"wkv_impl must be one of {WKV_IMPLS}, got {self.wkv_impl!r}")
        jnp.dtype(self.dtype)  # raises TypeError for an unknown dtype name

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def stem_in_chans(self) -> int:
        return 3 if self.in_chans in (1, 3) else self.in_chans

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["overrides"] = dict(self.overrides)
        return out
