"""The official PyTorch state_dict layout of every RWKV-UNet variant, and how each entry maps to JAX.

:func:`official_layout` lists, for a model spec, every tensor of the official ``state_dict`` in the
official order: its key, its PyTorch shape, what kind of tensor it is (which fixes the layout rule
and the name of the Flax variable) and whether the official forward ever reads it. Dead tensors
(``ln2`` of every block, ``att.*``/``ln1`` of blocks without attention, the encoder's ``norm``/``head``
inside a segmentation model, ``ln1`` of the decoder blocks) and ``num_batches_tracked`` have no JAX
counterpart; exports fill them with the official initial values.

Layout rules (PyTorch -> Flax): conv weight (O, I/g, kh, kw) -> kernel (kh, kw, I/g, O); linear
weight (out, in) -> kernel (in, out); norm weight -> scale; BatchNorm running_mean/var -> mean/var;
``spatial_mix_*`` (1, 1, C) -> (C,); biases, ``spatial_decay`` and ``spatial_first`` as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Kinds of tensors: how they are laid out in each framework and what the Flax leaf is called.
CONV, LINEAR, SCALE, BIAS, MEAN, VAR, COUNT, VECTOR, MIX = (
    "conv", "linear", "scale", "bias", "mean", "var", "count", "vector", "mix")
_JAX_LEAF = {CONV: "kernel", LINEAR: "kernel", SCALE: "scale", BIAS: "bias", MEAN: "mean", VAR: "var"}

STAGE_NORMS = ("bn", "bn", "ln", "ln")
STAGE_ATTENTION = (False, False, True, True)
ENCODER_DW_KERNEL = 5
DECODER_DW_KERNEL = 9
IMAGENET_CLASSES = 1000  # the dead head inside the official segmentation model's encoder


@dataclasses.dataclass(frozen=True)
class TorchTensor:
    """One entry of an official state_dict.

    Attributes:
      name: the state_dict key, e.g. ``encoder.stage3.1.att.key.weight``.
      shape: its PyTorch shape.
      kind: one of conv, linear, scale, bias, mean, var, count, vector, mix.
      used: whether the official forward reads it (only used tensors exist in the JAX model).
      init: the official initial value of a dead tensor: ``ones``, ``zeros``, ``half`` or
        ``normal`` (trunc-normal std 0.02); ``count`` tensors are int64 zeros.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    used: bool
    init: str = "zeros"

    @property
    def jax_path(self) -> tuple[str | int, ...]:
        """The path of the matching variable in ``nnx.state(model)`` (list indices as ints)."""
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in self.name.split(".")]
        if self.kind in _JAX_LEAF:
            parts[-1] = _JAX_LEAF[self.kind]
        return tuple(parts)


def to_jax_layout(value: np.ndarray, kind: str) -> np.ndarray:
    """A PyTorch-layout array of the given kind in Flax layout (a view where possible)."""
    if kind == CONV:
        return value.transpose(2, 3, 1, 0)
    if kind == LINEAR:
        return value.T
    if kind == MIX:
        return value.reshape(value.shape[-1])
    return value


def to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    """A Flax-layout array of the given kind in PyTorch layout, C-contiguous."""
    if kind == CONV:
        value = value.transpose(3, 2, 0, 1)
    elif kind == LINEAR:
        value = value.T
    elif kind == MIX:
        value = value.reshape(1, 1, -1)
    return np.array(value, order="C")


class _Builder:
    """Collects entries in registration order (the order ``state_dict()`` lists them)."""

    def __init__(self) -> None:
        self.entries: list[TorchTensor] = []

    def add(self, name: str, shape: tuple[int, ...], kind: str, used: bool, init: str = "zeros") -> None:
        self.entries.append(TorchTensor(name, tuple(int(s) for s in shape), kind, used, init))

    def layer_norm(self, prefix: str, c: int, used: bool) -> None:
        self.add(f"{prefix}.weight", (c,), SCALE, used, "ones")
        self.add(f"{prefix}.bias", (c,), BIAS, used, "zeros")

    def batch_norm(self, prefix: str, c: int, used: bool = True) -> None:
        self.add(f"{prefix}.weight", (c,), SCALE, used, "ones")
        self.add(f"{prefix}.bias", (c,), BIAS, used, "zeros")
        self.add(f"{prefix}.running_mean", (c,), MEAN, used, "zeros")
        self.add(f"{prefix}.running_var", (c,), VAR, used, "ones")
        self.add(f"{prefix}.num_batches_tracked", (), COUNT, False, "count")

    def conv(self, prefix: str, c_in: int, c_out: int, k: int = 1, groups: int = 1, bias: bool = False) -> None:
        self.add(f"{prefix}.weight", (c_out, c_in // groups, k, k), CONV, True)
        if bias:
            self.add(f"{prefix}.bias", (c_out,), BIAS, True)

    def conv_norm(self, prefix: str, c_in: int, c_out: int, k: int = 1, groups: int = 1, norm: bool = True) -> None:
        self.conv(f"{prefix}.conv", c_in, c_out, k, groups)
        if norm:
            self.batch_norm(f"{prefix}.norm", c_out)

    def linear(self, prefix: str, c_in: int, c_out: int, used: bool, bias: bool = False) -> None:
        self.add(f"{prefix}.weight", (c_out, c_in), LINEAR, used, "normal")
        if bias:
            self.add(f"{prefix}.bias", (c_out,), BIAS, used, "zeros")

    def spatial_mix(self, prefix: str, c: int, used: bool) -> None:
        self.add(f"{prefix}.spatial_decay", (c,), VECTOR, used, "zeros")
        self.add(f"{prefix}.spatial_first", (c,), VECTOR, used, "zeros")
        for name in ("k", "v", "r"):
            self.add(f"{prefix}.spatial_mix_{name}", (1, 1, c), MIX, used, "half")
        for name in ("key", "value", "receptance"):
            self.linear(f"{prefix}.{name}", c, c, used)
        self.layer_norm(f"{prefix}.key_norm", c, used)
        self.linear(f"{prefix}.output", c, c, used)

    def block(self, prefix: str, dim_in: int, dim_out: int, *, exp_ratio: float, stride: int, norm_in: str | None,
              attn: bool, se_ratio: float = 0.0) -> None:
        dim_mid = int(dim_in * exp_ratio)
        if norm_in == "bn":
            self.batch_norm(f"{prefix}.norm", dim_in)
        elif norm_in == "ln":
            self.layer_norm(f"{prefix}.norm.norm", dim_in, True)
        self.layer_norm(f"{prefix}.ln1", dim_mid, attn)
        self.layer_norm(f"{prefix}.ln2", dim_mid, False)
        self.conv_norm(f"{prefix}.conv", dim_in, dim_mid)
        self.spatial_mix(f"{prefix}.att", dim_mid, attn)
        if se_ratio > 0:
            reduced = round(dim_mid * se_ratio)
            self.conv(f"{prefix}.se.conv_reduce", dim_mid, reduced, bias=True)
            self.conv(f"{prefix}.se.conv_expand", reduced, dim_mid, bias=True)
        self.conv_norm(f"{prefix}.proj", dim_mid, dim_out, norm=False)
        self.conv_norm(f"{prefix}.conv_local", dim_mid, dim_mid, ENCODER_DW_KERNEL, groups=dim_mid)
        del stride  # the stride changes no shape

    def encoder(self, prefix: str, spec: Any, *, head_classes: int, head_used: bool) -> None:
        stem_in = 3 if spec.in_chans in (1, 3) else spec.in_chans
        self.block(f"{prefix}stage0.0", stem_in, spec.stem_width, exp_ratio=1.0, stride=1, norm_in=None,
                   attn=False, se_ratio=1.0)
        dim_prev = spec.stem_width
        for i, (depth, width, ratio) in enumerate(zip(spec.depths, spec.widths, spec.exp_ratios)):
            for j in range(depth):
                first = j == 0
                self.block(f"{prefix}stage{i + 1}.{j}", dim_prev if first else width, width,
                           exp_ratio=2 * ratio if first else ratio, stride=2 if first else 1,
                           norm_in=STAGE_NORMS[i], attn=STAGE_ATTENTION[i] and not first)
            dim_prev = width
        self.layer_norm(f"{prefix}norm.norm", spec.widths[-1], head_used)
        self.linear(f"{prefix}head", spec.widths[-1], head_classes, head_used, bias=True)

    def up_block(self, prefix: str, dim_in: int, dim_out: int) -> None:
        self.layer_norm(f"{prefix}.ln1", dim_in, False)
        self.conv_norm(f"{prefix}.conv", dim_in, dim_in)
        self.conv_norm(f"{prefix}.proj", dim_in, dim_out)
        self.conv_norm(f"{prefix}.conv_local", dim_in, dim_in, DECODER_DW_KERNEL, groups=dim_in)

    def ccm(self, prefix: str, in_dims: tuple[int, ...], target: int) -> None:
        mixed = target * len(in_dims)
        for i, d in enumerate(in_dims):
            self.conv(f"{prefix}.projections.{i}", d, target, bias=True)
        self.layer_norm(f"{prefix}.ln1", mixed, True)
        self.add(f"{prefix}.channel.spatial_mix_k", (1, 1, mixed), MIX, True)
        self.add(f"{prefix}.channel.spatial_mix_r", (1, 1, mixed), MIX, True)
        self.linear(f"{prefix}.channel.key", mixed, 2 * mixed, True)
        self.layer_norm(f"{prefix}.channel.key_norm", 2 * mixed, True)
        self.linear(f"{prefix}.channel.receptance", mixed, mixed, True)
        self.linear(f"{prefix}.channel.value", 2 * mixed, mixed, True)
        for i, d in enumerate(in_dims):
            self.conv(f"{prefix}.final_projections.{i}", target, d, bias=True)


def official_layout(spec: Any) -> list[TorchTensor]:
    """Every tensor of the official state_dict of the model ``spec`` describes, in official order.

    ``spec`` is a :class:`rwkvunet_jax.models.spec.ModelSpec` (or anything with its fields ``task``,
    ``num_classes``, ``in_chans``, ``depths``, ``widths``, ``exp_ratios``, ``stem_width``).
    Segmentation models follow ``RWKV_UNet*`` (keys ``encoder.*``, ``ccm.*``, ``decoder1..4.*``,
    ``final_conv.*``); classifiers follow the encoder files ``net_{T,S,B}.pth`` (``stage0..4.*``,
    ``norm.norm.*``, ``head.*``).
    """
    b = _Builder()
    if spec.task == "classification":
        b.encoder("", spec, head_classes=spec.num_classes, head_used=True)
        return b.entries
    if spec.task != "segmentation":
        raise ValueError(f"unknown task {spec.task!r}; expected 'segmentation' or 'classification'")
    d0, d1, d2, d3 = spec.widths
    b.encoder("encoder.", spec, head_classes=IMAGENET_CLASSES, head_used=False)
    b.ccm("ccm", (d2, d1, d0), d0)
    b.up_block("decoder1", d3, d2)
    b.up_block("decoder2", 2 * d2, d1)
    b.up_block("decoder3", 2 * d1, d0)
    b.up_block("decoder4", 2 * d0, spec.stem_width)
    b.conv("final_conv", spec.stem_width, spec.num_classes, bias=True)
    return b.entries


def encoder_file_layout(spec: Any) -> list[TorchTensor]:
    """The layout of an official encoder file (``net_{T,S,B}.pth``) matching the encoder of ``spec``.

    Only the ``stage*`` entries matter when such a file initialises a segmentation model; ``norm``
    and ``head`` are listed (as dead) so that loaders can recognise and skip them.
    """
    fields = {f: getattr(spec, f) for f in ("in_chans", "depths", "widths", "exp_ratios", "stem_width")}
    b = _Builder()
    b.encoder("", dataclasses.make_dataclass("EncoderSpec", fields)(**fields), head_classes=IMAGENET_CLASSES,
              head_used=False)
    return b.entries


def initial_value(entry: TorchTensor, rng: np.random.Generator) -> np.ndarray:
    """The official initial value of a (dead) tensor, in PyTorch layout."""
    if entry.init == "count":
        return np.zeros(entry.shape, np.int64)
    if entry.init == "ones":
        return np.ones(entry.shape, np.float32)
    if entry.init == "half":
        return np.full(entry.shape, 0.5, np.float32)
    if entry.init == "normal":
        # timm's trunc_normal_(std=0.02) cuts at +-2 absolute (100 std): a plain normal in practice.
        return (0.02 * rng.standard_normal(entry.shape)).astype(np.float32)
    return np.zeros(entry.shape, np.float32)
