"""Export a JAX RWKV-UNet as an official PyTorch state_dict, and load one into a JAX model.

Conversion is exact both ways: values are copied (float32) and only transposed or reshaped, so
JAX -> PyTorch -> JAX is bit-identical. Exports list every key, shape and the order of the official
code, dead tensors included (filled with their official initial values) and BatchNorm running
statistics with ``num_batches_tracked`` (0), so that the official classes accept them with
``load_state_dict(strict=True)``.

BatchNorm running variance: Flax averages the biased batch variance where PyTorch averages the
unbiased one (a factor n/(n-1), n = batch x height x width). This matters only while training;
conversion copies the running statistics as they are.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from rwkvunet_jax.convert.torch_names import (
    COUNT,
    TorchTensor,
    encoder_file_layout,
    initial_value,
    official_layout,
    to_jax_layout,
    to_torch_layout,
)

log = logging.getLogger(__name__)

# Keys under which training scripts commonly nest the weights ({"state_dict": {...}, "epoch": 3}).
WRAPPER_KEYS = ("state_dict", "model", "module", "net", "params")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile add these


@dataclasses.dataclass
class LoadReport:
    """What a load did: tensors ``loaded``, dead/unneeded ones ``skipped`` by name, and the keys
    that were ``missing`` from the file or ``unexpected`` in it (lists of state_dict keys)."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        text = (f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)} (dead or unused), "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected")
        if self.missing:
            text += f"\n  missing: {', '.join(self.missing)}"
        if self.unexpected:
            text += f"\n  unexpected: {', '.join(self.unexpected)}"
        return text


def _model_spec(model: nnx.Module) -> Any:
    spec = getattr(model, "spec", None)
    if spec is None or not hasattr(spec, "task"):
        raise ValueError(f"{type(model).__name__} has no model spec (.spec); only registry models "
                         "(rwkvunet_jax.create_model) can be converted")
    return spec


def _flat_pure(model: nnx.Module) -> tuple[Any, dict[tuple, Any]]:
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    flat: dict[tuple, Any] = {}

    def walk(node: Any, prefix: tuple) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, prefix + (key,))
        else:
            flat[prefix] = node

    walk(nnx.to_pure_dict(state), ())
    return state, flat


def export_torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The official PyTorch state_dict of ``model`` as an ordered ``{key: numpy array}``.

    Every key, shape and the order of the official ``RWKV_UNet*`` (segmentation) or
    ``RWKV_UNet_encoder_*`` (classifier) state_dict. Dead tensors get their official initial values
    (trunc-normal ones drawn from a fixed seed), ``num_batches_tracked`` an int64 0. Layouts: conv
    OIHW, depth-wise (C, 1, k, k), linear (out, in), ``spatial_mix_*`` (1, 1, C).
    """
    spec = _model_spec(model)
    _, flat = _flat_pure(model)
    remaining = dict(flat)
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for entry in official_layout(spec):
        if not entry.used:
            out[entry.name] = initial_value(entry, rng)
            continue
        if entry.jax_path not in remaining:
            raise ValueError(f"model {spec.name!r} has no variable {'/'.join(map(str, entry.jax_path))} "
                             f"for the official tensor {entry.name!r}")
        value = np.array(remaining.pop(entry.jax_path), dtype=np.float32)  # a writable copy
        value = to_torch_layout(value, entry.kind)
        if value.shape != entry.shape:
            raise ValueError(f"model variable {'/'.join(map(str, entry.jax_path))} has shape {value.shape} in "
                             f"PyTorch layout, but the official tensor {entry.name!r} has shape {entry.shape}")
        out[entry.name] = value
    if remaining:
        names = sorted("/".join(map(str, p)) for p in remaining)
        raise ValueError(f"model {spec.name!r} has {len(names)} variables without an official tensor: {names[:10]}")
    return out


# ----------------------------------------------------------------------------------------------- loading


def to_numpy(value: Any, key: str = "") -> np.ndarray:
    """A torch tensor (any device; bfloat16/float16 become float32) or array-like as a numpy array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu()
        if value.dtype.is_floating_point and str(value.dtype) not in ("torch.float32", "torch.float64"):
            value = value.float()  # numpy has no bfloat16
        return value.numpy()
    try:
        value = np.asarray(value)
    except Exception as err:  # noqa: BLE001 - anything that is not array-like
        raise ValueError(f"state_dict entry {key!r} is not an array (got {type(value).__name__})") from err
    if value.dtype.name in ("bfloat16", "float16"):  # ml_dtypes bfloat16 from safetensors/jax
        value = value.astype(np.float32)
    return value


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """The flat ``{key: tensor}`` inside a checkpoint object.

    Descends into ``state_dict`` / ``model`` / ``module`` / ``net`` / ``params`` wrappers (as
    training scripts save them, possibly nested), drops non-array entries of such wrappers, and
    strips ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) key prefixes.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    seen = 0
    while not any(_is_array(v) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or seen > 8:
            raise ValueError(
                f"no tensors found in the state_dict; top-level keys: {sorted(map(str, obj))[:10]} "
                f"(expected tensors, or a wrapper under one of {WRAPPER_KEYS})")
        obj, seen = inner, seen + 1
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not _is_array(value):
            continue
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if name in out:
            raise ValueError(f"state_dict has key {name!r} twice once prefixes are stripped ({key!r})")
        out[name] = value
    return out


def _load(model: nnx.Module, state_dict: dict[str, Any], layout: list[TorchTensor], *, jax_prefix: tuple,
          strict: bool, context: str, ignore: frozenset[str] = frozenset()) -> LoadReport:
    """Loads the used ``layout`` entries found in ``state_dict`` into ``model`` (all or nothing)."""
    state, flat = _flat_pure(model)
    entries = {e.name: e for e in layout}
    report = LoadReport()
    # Shape errors first: they mean the wrong model or the wrong file, strict or not.
    for key, value in state_dict.items():
        entry = entries.get(key)
        if key in ignore:
            report.skipped.append(key)
            continue
        if entry is None:
            report.unexpected.append(key)
            continue
        shape = tuple(value.shape)
        if shape != entry.shape:
            raise ValueError(f"shape mismatch for tensor {key!r}: the file has {shape}, the model "
                             f"({context}) expects {entry.shape}")
    for entry in layout:
        if not entry.used:
            if entry.name in state_dict:
                report.skipped.append(entry.name)
        elif entry.name not in state_dict:
            report.missing.append(entry.name)
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"state_dict does not match {context}: {len(report.missing)} missing tensors "
            f"{report.missing[:10]}, {len(report.unexpected)} unexpected tensors {report.unexpected[:10]}"
            " (pass strict=False to load what matches)")
    updates: dict[tuple, np.ndarray] = {}
    for entry in layout:
        if not entry.used or entry.kind == COUNT or entry.name not in state_dict:
            continue
        path = jax_prefix + entry.jax_path
        if path not in flat:
            raise ValueError(f"the model has no variable {'/'.join(map(str, path))} for tensor {entry.name!r}")
        value = to_jax_layout(to_numpy(state_dict[entry.name], entry.name), entry.kind)
        current = flat[path]
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"shape mismatch for tensor {entry.name!r}: {value.shape} in Flax layout, model "
                             f"variable {'/'.join(map(str, path))} has {tuple(current.shape)}")
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"tensor {entry.name!r} has dtype {value.dtype}; expected floating point")
        updates[path] = jnp.asarray(np.array(value, dtype=current.dtype))
        report.loaded.append(entry.name)
    pure = nnx.to_pure_dict(state)
    for path, value in updates.items():
        node = pure
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    if report.missing or report.unexpected:
        log.warning("loading into %s: %s", context, report.summary())
    return report


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> LoadReport:
    """Loads an official PyTorch state_dict into ``model`` in place.

    Values may be numpy arrays or torch tensors. Wrappers (``state_dict``, ``model``, ...) and
    ``module.`` prefixes are unwrapped; dead tensors and ``num_batches_tracked`` are skipped by name.
    An encoder file (``stage*`` keys) given to a segmentation model is read as its ``encoder.*``
    part, so ``strict=False`` loads an official ImageNet encoder the way the official code does
    (see also :func:`load_torch_encoder`, which is strict about the encoder tensors).
    A shape mismatch is always a ValueError naming the tensor and both shapes. With ``strict`` any
    missing or unexpected key is a ValueError; otherwise they are logged and returned in the report
    (missing tensors keep their current values). Nothing is changed when an error is raised.
    """
    spec = _model_spec(model)
    flat_sd = unwrap_state_dict(state_dict)
    if spec.task == "segmentation" and _is_encoder_file(flat_sd):
        # An official encoder file (net_{T,S,B}.pth) holds the seg model's encoder without the prefix.
        log.info("state_dict looks like an encoder file (stage* keys); loading it as encoder.*")
        flat_sd = {f"encoder.{k}": v for k, v in flat_sd.items()}
        # Its (dead here) head has as many outputs as the pretraining had classes.
        ignore = frozenset({"encoder.head.weight", "encoder.head.bias"})
    else:
        ignore = frozenset()
    return _load(model, flat_sd, official_layout(spec), jax_prefix=(), strict=strict, ignore=ignore,
                 context=f"{spec.name} (num_classes={spec.num_classes}, in_chans={spec.in_chans})")


def _is_encoder_file(flat_sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("stage0.") for k in flat_sd) and not any(k.startswith("encoder.") for k in flat_sd)


def load_torch_encoder(model: nnx.Module, state_dict: Mapping[str, Any]) -> LoadReport:
    """Loads an official encoder file (``net_{T,S,B}.pth``: ``stage*``, ``norm``, ``head``) into the
    encoder of ``model`` (a segmentation model, or the stages of a classifier), in place.

    Every used ``stage*`` tensor must be present with the right shape; ``norm``/``head`` and dead
    tensors are skipped. A full segmentation state_dict works too: its ``encoder.*`` part is used
    and everything else is skipped. Returns the report (skipped keys listed there).
    """
    spec = _model_spec(model)
    flat_sd = unwrap_state_dict(state_dict)
    outside: list[str] = []
    if not _is_encoder_file(flat_sd) and any(k.startswith("encoder.") for k in flat_sd):
        outside = [k for k in flat_sd if not k.startswith("encoder.")]
        flat_sd = {k[len("encoder."):]: v for k, v in flat_sd.items() if k.startswith("encoder.")}
    prefix = ("encoder",) if spec.task == "segmentation" else ()
    # The classifier head's size depends on the pretraining classes; it is never used here.
    layout = [e for e in encoder_file_layout(spec) if not e.name.startswith("head.")]
    report = _load(model, flat_sd, layout, jax_prefix=prefix, strict=True, ignore=frozenset({"head.weight", "head.bias"}),
                   context=f"the encoder of {spec.name} (in_chans={spec.in_chans})")
    report.skipped += outside
    return report
