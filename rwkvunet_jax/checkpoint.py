"""Orbax checkpoints of models: one format for fine-tuning, pretraining, evaluation and conversion.

A *model checkpoint* is an Orbax composite directory with two items: ``model`` (the pure dict of the
model's ``nnx.Param`` and ``nnx.BatchStat`` arrays, keyed by the official-like attribute names) and
``meta`` (JSON; the model description under ``"model"``). Training runs write the same two items
plus ``optimizer`` and ``data`` into the step directories of an ``ocp.CheckpointManager`` under
``WORKDIR/checkpoints`` (and the best one by validation metric under ``WORKDIR/checkpoints_best``; see
:mod:`rwkvunet_jax.train.checkpoints`), so :func:`load_model` reads a standalone checkpoint, one training
step, a manager directory or a whole work directory alike. Orbax writes into a temporary directory and
renames it when complete, so a half-written checkpoint is never picked up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from rwkvunet_jax.models.registry import build_model, spec_from_dict

MODEL_ITEM = "model"
META_ITEM = "meta"
CHECKPOINTS_DIR = "checkpoints"
BEST_CHECKPOINTS_DIR = "checkpoints_best"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


# ----------------------------------------------------------------------------- model state


def model_state(model: nnx.Module) -> dict[str, Any]:
    """The nested pure dict of the model's parameters and BatchNorm statistics (no RNG state)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))


def _flatten(tree: dict[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
    flat: dict[tuple, Any] = {}
    for key, value in tree.items():
        path = prefix + (str(key),)
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def apply_model_state(model: nnx.Module, state: dict[str, Any], *, strict: bool = True) -> dict[str, list[str]]:
    """Loads a :func:`model_state` dict into ``model`` in place.

    Shapes must match exactly (a mismatch is always an error naming the entry and both shapes). With
    ``strict`` any missing or unexpected entry is an error; otherwise they are returned as
    ``{"missing": [...], "unexpected": [...]}`` and the missing entries keep their current values.
    """
    current = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    target = _flatten(nnx.to_pure_dict(current))
    given = _flatten(state)
    missing = sorted("/".join(p) for p in target.keys() - given.keys())
    unexpected = sorted("/".join(p) for p in given.keys() - target.keys())
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"checkpoint does not match the model: {len(missing)} missing entries {missing[:8]}, "
            f"{len(unexpected)} unexpected entries {unexpected[:8]}"
        )
    merged = {}
    for path, old in target.items():
        if path not in given:
            merged[path] = old
            continue
        new = np.asarray(given[path]) if not isinstance(given[path], jax.Array) else given[path]
        if tuple(new.shape) != tuple(old.shape):
            raise CheckpointError(
                f"shape mismatch for {'/'.join(path)}: checkpoint {tuple(new.shape)} vs model {tuple(old.shape)}"
            )
        if not np.all(np.isfinite(np.asarray(new, dtype=np.float64))):
            raise CheckpointError(f"non-finite values (NaN or inf) in checkpoint entry {'/'.join(path)}")
        merged[path] = jax.numpy.asarray(new, dtype=old.dtype)
    nested: dict[str, Any] = {}
    for path, value in merged.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    # nnx pure dicts use int keys for list items; rebuild with the model's own key types.
    template = nnx.to_pure_dict(current)
    nnx.replace_by_pure_dict(current, _retype(template, nested))
    nnx.update(model, current)
    return {"missing": missing, "unexpected": unexpected}


def _retype(template: dict[Any, Any], nested: dict[str, Any]) -> dict[Any, Any]:
    out = {}
    for key, value in template.items():
        sub = nested[str(key)]
        out[key] = _retype(value, sub) if isinstance(value, dict) else sub
    return out


# ----------------------------------------------------------------------------- metadata


def model_meta(model: nnx.Module) -> dict[str, Any]:
    """JSON-able description of a registered model (name, classes, channels, overrides)."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise CheckpointError(f"{type(model).__name__} has no .spec; only registry models can be saved")
    return spec.to_dict()


def create_model_from_meta(meta: dict[str, Any], *, seed: int = 0) -> nnx.Module:
    """Builds the (freshly initialised) model a checkpoint's ``meta["model"]`` describes."""
    return build_model(spec_from_dict(meta), seed=seed)


# ----------------------------------------------------------------------------- standalone files


def save_model(directory: str | Path, model: nnx.Module, *, extra_meta: dict[str, Any] | None = None) -> Path:
    """Writes a standalone model checkpoint (items ``model`` and ``meta``) to ``directory``, atomically."""
    ocp = _ocp()
    directory = Path(directory).absolute()
    if directory.exists():
        raise FileExistsError(f"refusing to overwrite existing checkpoint directory {directory}")
    meta = {"model": model_meta(model), **(extra_meta or {})}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(directory, args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_state(model)), meta=ocp.args.JsonSave(meta)))
    return directory


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory that holds items ``model`` and ``meta`` for ``path``.

    ``path`` may be such a directory itself, an Orbax manager directory (its latest step), or a work
    directory (the best checkpoint if one was kept, else the latest periodic one).
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if (path / MODEL_ITEM).is_dir() and (path / META_ITEM).is_dir():
        return path
    for sub in (BEST_CHECKPOINTS_DIR, CHECKPOINTS_DIR):
        if (path / sub).is_dir() and _steps(path / sub):
            return resolve_checkpoint(path / sub)
    steps = _steps(path)
    if steps:
        return path / str(max(steps))
    raise CheckpointError(
        f"no model checkpoint at {path}: expected a directory with '{MODEL_ITEM}/' and '{META_ITEM}/' items, "
        f"an Orbax manager directory with step subdirectories, or a work directory with '{CHECKPOINTS_DIR}/'"
    )


def _steps(directory: Path) -> list[int]:
    # Only finished steps: Orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames when done.
    return [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()
            and (p / MODEL_ITEM).is_dir()]


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` JSON of a checkpoint."""
    ocp = _ocp()
    step_dir = resolve_checkpoint(path)
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            meta = ckptr.restore(step_dir / META_ITEM)
    except Exception as err:  # Orbax raises many types for damaged files
        raise CheckpointError(f"could not read the '{META_ITEM}' item of checkpoint {step_dir}: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt '{META_ITEM}' item in checkpoint {step_dir}: expected a JSON object")
    return meta


def load_model_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_state, meta)`` of a checkpoint, as numpy arrays, without building a model."""
    ocp = _ocp()
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            state = ckptr.restore(step_dir / MODEL_ITEM)
    except Exception as err:  # Orbax raises many types for damaged files
        raise CheckpointError(f"could not read the model item of checkpoint {step_dir}: {err}") from err
    state = jax.tree.map(np.asarray, state)
    return state, meta


def load_model(path: str | Path) -> nnx.Module:
    """Rebuilds the model described by a checkpoint and loads its weights (eval mode)."""
    state, meta = load_model_state(path)
    if "model" not in meta:
        raise CheckpointError(f"checkpoint {resolve_checkpoint(path)} has no model description in its meta")
    model = create_model_from_meta(meta["model"])
    apply_model_state(model, state, strict=True)
    model.eval()
    return model
