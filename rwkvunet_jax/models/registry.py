"""Model names -> specs (paper Table 1) and :func:`create_model`."""

from __future__ import annotations

from typing import Any

from flax import nnx

from rwkvunet_jax.models.encoder import EncoderClassifier
from rwkvunet_jax.models.spec import ModelSpec
from rwkvunet_jax.models.unet import RWKVUNet

# depths, widths d0..d3, expansion ratios of stages 1-4 (official encoder sizes).
SIZES: dict[str, dict[str, tuple]] = {
    "t": dict(depths=(2, 2, 4, 2), widths=(32, 48, 96, 160), exp_ratios=(2.0, 2.5, 3.0, 3.5)),
    "s": dict(depths=(3, 3, 6, 3), widths=(32, 64, 128, 192), exp_ratios=(2.0, 2.5, 3.0, 4.0)),
    "b": dict(depths=(3, 3, 6, 3), widths=(48, 72, 144, 240), exp_ratios=(2.0, 2.5, 4.0, 4.0)),
}

MODELS: dict[str, tuple[str, str]] = {
    **{f"rwkv_unet_{size}": ("segmentation", size) for size in SIZES},
    **{f"rwkv_unet_encoder_{size}": ("classification", size) for size in SIZES},
}

OVERRIDABLE = ("depths", "widths", "exp_ratios", "stem_width", "drop_path_rate", "ccm_drop_path",
               "wkv_variant", "wkv_impl", "dtype")


def list_models() -> list[str]:
    """The registered model names."""
    return list(MODELS)


def _normalise(key: str, value: Any) -> Any:
    if key in ("depths", "widths", "stem_width"):
        return tuple(int(v) for v in value) if key != "stem_width" else int(value)
    if key == "exp_ratios":
        return tuple(float(v) for v in value)
    if key in ("drop_path_rate", "ccm_drop_path"):
        return float(value)
    if key == "dtype":
        import jax.numpy as jnp

        return jnp.dtype(value).name
    return value


def make_spec(name: str, *, num_classes: int, in_chans: int = 3, **overrides: Any) -> ModelSpec:
    """The :class:`ModelSpec` of a registered model with the given overrides."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(MODELS)}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; allowed: {', '.join(OVERRIDABLE)}")
    task, size = MODELS[name]
    overrides = {k: _normalise(k, v) for k, v in overrides.items()}
    fields = {**SIZES[size], **overrides}
    return ModelSpec(
        name=name, task=task, num_classes=int(num_classes), in_chans=int(in_chans),
        overrides=tuple(sorted(overrides.items())), **fields,
    )


def build_model(spec: ModelSpec, *, seed: int = 0) -> nnx.Module:
    """Builds the model of ``spec`` with parameters drawn from ``seed``."""
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    cls = RWKVUNet if spec.task == "segmentation" else EncoderClassifier
    return cls(spec, rngs=rngs)


def create_model(name: str, *, num_classes: int, in_chans: int = 3, seed: int = 0, **overrides: Any) -> nnx.Module:
    """Creates a registered RWKV-UNet model.

    Args:
      name: ``rwkv_unet_t|s|b`` (segmentation, logits (B, H, W, num_classes)) or
        ``rwkv_unet_encoder_t|s|b`` (ImageNet classifier, logits (B, num_classes)).
      num_classes: output classes.
      in_chans: input channels: 1 is repeated to 3 (as official S/B do), 3 passes through, any other
        count builds the stem for that many channels.
      seed: parameter initialisation seed (drop path draws from ``seed + 1``).
      **overrides: any of ``depths``, ``widths``, ``exp_ratios``, ``stem_width``, ``drop_path_rate``,
        ``ccm_drop_path``, ``wkv_variant`` ("official" | "paper"), ``wkv_impl`` ("auto" | "scan" |
        "naive" | "pallas") and ``dtype`` (compute dtype; parameters stay float32).

    Returns:
      An ``nnx.Module`` in training mode; call ``.eval()`` for inference.
    """
    return build_model(make_spec(name, num_classes=num_classes, in_chans=in_chans, **overrides), seed=seed)


def spec_from_dict(data: dict[str, Any]) -> ModelSpec:
    """Rebuilds a spec from :meth:`ModelSpec.to_dict` output (e.g. checkpoint metadata)."""
    return make_spec(data["name"], num_classes=data["num_classes"], in_chans=data["in_chans"],
                     **dict(data.get("overrides", {})))


__all__ = ["MODELS", "SIZES", "create_model", "list_models", "make_spec", "build_model", "spec_from_dict",
           "ModelSpec"]
