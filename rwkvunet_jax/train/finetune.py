"""Fine-tuning a segmentation model from a config (``rwkvunet finetune``), readable top to bottom.

config -> mesh (data parallel over the local devices) -> data -> model (+ pretrained encoder) ->
optimizer and schedule -> train state -> restore the latest checkpoint if there is one -> the shared loop
(:mod:`rwkvunet_jax.train.loop`: progress bar with loss and lr; metrics to TensorBoard, CSV and JSON lines;
periodic validation; periodic and best checkpoints; SIGTERM saves and stops; bad examples counted; a
failing run checkpoints its last step first) -> progress.png -> final
evaluation of the best (or last) weights on the test split. State, step (EMA, gradient accumulation,
BatchNorm groups), optimizer, schedule and checkpoints are the ones pretraining uses.

Work directory::

    WORKDIR/checkpoints/<step>/        model, optimizer, data (grain iterator state), meta  (periodic;
                                       see rwkvunet_jax.train.checkpoints)
    WORKDIR/checkpoints_best/<step>/   the same, for the best validation mean Dice
    WORKDIR/metrics.{jsonl,csv}, WORKDIR/tensorboard/, WORKDIR/progress.png, WORKDIR/config.json
    WORKDIR/eval_<test split>/metrics.{json,csv}, .../overlays/*.png  (as `rwkvunet evaluate` writes them)

Rerunning the same command after a kill resumes at the last saved step with the same data order: the
grain iterator state is saved with every checkpoint, and drop-path masks depend only on the seed and the
step (see :mod:`rwkvunet_jax.train.state`), so the resumed losses equal an uninterrupted run's. With
``ema_decay > 0`` validation, the best checkpoint and the test use the EMA weights (the checkpoints'
``model`` item holds them).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from rwkvunet_jax import checkpoint as ckpt
from rwkvunet_jax.eval.report import plot_progress
from rwkvunet_jax.train import loop, losses, sharding
from rwkvunet_jax.train.loop import NonFiniteLossError
from rwkvunet_jax.train.metric_writer import MetricWriter, read_metrics

__all__ = ["NonFiniteLossError", "build_model", "load_pretrained_encoder", "make_loss_fn", "train_and_evaluate",
           "validate", "validate_config"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


def train_and_evaluate(config: Any, workdir: str | Path, *, stop_after_step: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) per ``config`` in ``workdir``, then evaluate on the test split.

    ``stop_after_step`` stops the loop after that many total steps without a final checkpoint or
    evaluation (what a kill at that point leaves behind; for tests). Returns a summary dict with the
    final ``step``, whether the run was ``preempted``, the ``best`` validation record and the test
    ``metrics`` (if evaluated).
    """
    from rwkvunet_jax import data
    from rwkvunet_jax.data.bad_examples import describe
    from rwkvunet_jax.train.checkpoints import TrainCheckpoints
    from rwkvunet_jax.train.optimizer import optimizer_from_config, schedule_from_config
    from rwkvunet_jax.train.state import split_model_state
    from rwkvunet_jax.train.step import build_steps, make_predict_fn

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    validate_config(config)

    # --- devices: a data-parallel mesh over this host's devices ---------------------------------------
    mesh = sharding.local_mesh()
    devices = sharding.batch_divisor(mesh)
    for field, value, divisor in (("batch_size", config.batch_size, devices * config.accum_steps),
                                  ("eval.batch_size", config.eval.batch_size, devices)):
        if value % divisor:
            raise ValueError(f"{field} {value} is not divisible by the {devices} local devices"
                             + (f" x {config.accum_steps} accumulation steps" if divisor != devices else ""))

    # --- data --------------------------------------------------------------------------------------------
    root = Path(config.data.root).expanduser()
    train_source = data.get_source(config.dataset, root, config.data.train_split, split_seed=config.data.split_seed,
                                   list_dir=config.data.list_dir)
    steps_per_epoch = len(train_source) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training split of {train_source!r} has {len(train_source)} examples, fewer than "
                         f"one batch of {config.batch_size}")
    total_steps = int(config.total_steps) or int(config.epochs) * steps_per_epoch
    train_iter = data.train_iterator(train_source, training_transform(config), batch_size=config.batch_size,
                                     seed=config.seed, worker_count=config.data.worker_count)
    eval_every = _eval_interval(config, steps_per_epoch)

    # --- model (+ pretrained encoder on a fresh start), optimizer, train state ---------------------------
    model = build_model(config)
    checkpoints = TrainCheckpoints(workdir / ckpt.CHECKPOINTS_DIR, keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save)
    best_checkpoints = TrainCheckpoints(workdir / ckpt.BEST_CHECKPOINTS_DIR, keep=1,
                                        async_save=config.checkpoint.async_save)
    if checkpoints.latest_step() is None and config.init.encoder:
        report = load_pretrained_encoder(model, config.init.encoder)
        print(f"pretrained encoder from {config.init.encoder}: {report}")
    schedule = schedule_from_config(config.optim, batch_size=config.batch_size, steps_per_epoch=steps_per_epoch,
                                    total_steps=total_steps)
    tx = optimizer_from_config(config.optim, schedule, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    steps = build_steps(model, tx, make_loss_fn(config), mesh=mesh, schedule=schedule, ema_decay=config.ema_decay,
                        accum_steps=config.accum_steps, bn_group_size=config.bn_group_size)

    # --- restore the latest checkpoint if there is one ---------------------------------------------------
    state, meta, resume_step = loop.restore_latest(checkpoints, steps, train_iter, model_meta=ckpt.model_meta(model))
    best = {"step": -1, "val/mean_dice": -math.inf}
    saved_best = (meta or {}).get("best") or {}
    if saved_best.get("val/mean_dice") is not None:
        best = saved_best
    for step in best_checkpoints.all_steps():  # a best saved after the checkpoint we resume from (or at all)
        if resume_step is None or step > resume_step:
            best_checkpoints.delete(step)
    if resume_step is not None:
        print(f"resuming {workdir} at step {resume_step}/{total_steps}")
    (workdir / "config.json").write_text(config.to_json(indent=2))

    # --- inference on the validation and test images: the batch split over the devices -----------------
    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.data_sharding(mesh)
    predict = jax.jit(make_predict_fn(steps.model_def), in_shardings=(replicated, replicated, batch_sharding),
                      out_shardings=batch_sharding)
    eval_weights = None  # (params, batch_stats) that predict_fn uses: the latest (EMA) weights, at the end the best

    def predict_fn(images: np.ndarray) -> np.ndarray:
        return np.asarray(predict(*eval_weights, sharding.host_local_batch_to_global(images, mesh)))

    def meta_fn(step: int, preempted: bool) -> dict:
        return {"model": ckpt.model_meta(model), "config": loop.config_dict(config), "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch, "epoch": step / steps_per_epoch, "preempted": preempted,
                "best": _jsonable(best)}

    writer = MetricWriter(workdir, resume_step=resume_step)

    def after_step(step: int, state) -> None:
        nonlocal best, eval_weights
        if not (eval_every and (step % eval_every == 0 or step == total_steps)):
            return
        eval_weights = state.weights(ema=state.has_ema)
        val = validate(config, predict_fn, root)
        writer.write(step, val)
        plot_progress(read_metrics(workdir), workdir / "progress.png")
        print(f"step {step}: validation mean Dice {val['val/mean_dice']:.4f}")
        if val["val/mean_dice"] > best["val/mean_dice"]:
            best = {"step": step, **val}
            best_checkpoints.save(state, iterator=train_iter, meta=meta_fn(step, False))

    # --- loop --------------------------------------------------------------------------------------------
    try:
        result = loop.run_loop(config, steps=steps, state=state, iterator=train_iter, checkpoints=checkpoints,
                               total_steps=total_steps, steps_per_epoch=steps_per_epoch, writer=writer,
                               meta_fn=meta_fn, after_step=after_step, progress=progress, desc="finetune",
                               workdir=workdir, name_example=functools.partial(describe, train_source),
                               stop_after_step=stop_after_step)
    finally:
        writer.close()
        checkpoints.close()
        best_checkpoints.close()

    plot_progress(read_metrics(workdir), workdir / "progress.png")
    summary: dict[str, Any] = {"step": result.step, "total_steps": total_steps, "preempted": result.preempted,
                               "best": best, "workdir": str(workdir)}
    if result.step < total_steps:
        return summary  # stopped early (preempted, or stop_after_step): rerun to resume

    # --- final evaluation on the test split --------------------------------------------------------------
    if config.data.test_split:
        eval_weights = result.state.weights(ema=result.state.has_ema)
        if best["step"] >= 0:
            weights, _ = ckpt.load_model_state(workdir / ckpt.BEST_CHECKPOINTS_DIR)
            eval_weights = jax.device_put(split_model_state(weights, result.state.params, result.state.batch_stats),
                                          replicated)
            print(f"testing the best checkpoint (step {best['step']}, validation mean Dice "
                  f"{best['val/mean_dice']:.4f})")
        from rwkvunet_jax.eval.evaluate import eval_dir, evaluate_dataset

        summary["metrics"] = evaluate_dataset(
            predict_fn, dataset=config.dataset, root=root, split=config.data.test_split,
            split_seed=config.data.split_seed, protocol=config.eval.protocol, num_outputs=config.model.num_classes,
            image_size=tuple(config.data.image_size), batch_size=config.eval.batch_size, tta=config.eval.tta,
            class_names=tuple(config.class_names), outdir=eval_dir(workdir, config.data.test_split),
            num_overlays=config.eval.num_overlays, paper=dict(config.paper), progress=progress,
            list_dir=config.data.list_dir)
    return summary


# ------------------------------------------------------------------------------------------------ pieces


def validate_config(config: Any) -> None:
    """Fail early, with the field's name, on settings that cannot work."""
    from rwkvunet_jax.train.config_fields import check_common_fields

    h, w = config.data.image_size
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        raise ValueError(f"data.image_size must be positive multiples of 16, got {tuple(config.data.image_size)}")
    check_common_fields(config)
    if config.eval.protocol not in ("volume", "image"):
        raise ValueError(f"eval.protocol must be 'volume' or 'image', got {config.eval.protocol!r}")
    if not str(config.data.root):
        raise ValueError("data.root is empty: pass --config.data.root=/path/to/the/dataset")
    from rwkvunet_jax.eval.inference import tta_mode

    for field in ("tta", "val_tta"):
        try:
            tta_mode(config.eval[field])
        except ValueError as err:
            raise ValueError(f"eval.{field}: {err}") from None
    try:
        training_transform(config)
    except ValueError as err:
        raise ValueError(f"data.augment / image_order / rotate_degrees: {err}") from None


def training_transform(config: Any):
    """The training augmentation ``config.data`` names: recipe ``augment`` with its ``image_order`` and
    ``rotate_degrees``, ending at ``image_size``."""
    from rwkvunet_jax import data

    return data.RecipeTransform(config.data.augment, config.data.image_size, image_order=config.data.image_order,
                                rotate_degrees=config.data.rotate_degrees)


def build_model(config: Any):
    """The segmentation model of ``config.model`` (fresh weights from ``config.seed``)."""
    from rwkvunet_jax.models.registry import create_model

    overrides = {"drop_path_rate": config.model.drop_path_rate, "dtype": config.model.dtype,
                 "wkv_impl": config.model.wkv_impl, "wkv_variant": config.model.wkv_variant}
    if config.model.depths:
        overrides["depths"] = tuple(config.model.depths)
    if config.model.widths:
        overrides["widths"] = tuple(config.model.widths)
    return create_model(config.model.name, num_classes=config.model.num_classes, in_chans=config.model.in_chans,
                        seed=config.seed, **overrides)


def make_loss_fn(config: Any):
    """``(logits, batch) -> (loss, {"ce", "dice_loss"})`` against ``batch["label"]`` with the config's weights."""
    ignore = int(config.loss.ignore_index)
    segmentation = functools.partial(losses.segmentation_loss, ce_weight=config.loss.ce_weight,
                                     dice_weight=config.loss.dice_weight, ignore_index=ignore if ignore >= 0 else None)
    return lambda logits, batch: segmentation(logits, batch["label"])


def load_pretrained_encoder(model: Any, path: str | Path) -> str:
    """Load a pretrained encoder into ``model.encoder``; returns a one-line report.

    ``path`` is an official PyTorch encoder file (``.pth``, ``.pt``, ``.bin``, ``.safetensors``, ``.npz``)
    or an Orbax checkpoint (a classifier from ``rwkvunet pretrain``, or any segmentation model: only its
    encoder stages are taken).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"pretrained encoder not found: {path}")
    if path.is_file() and path.suffix.lower() in TORCH_SUFFIXES:
        from rwkvunet_jax import convert

        report = convert.load_torch_encoder(model, convert.read_state_dict(path))
        return report.summary()
    state, meta = ckpt.load_model_state(path)
    source = state.get("encoder", state) if isinstance(state, dict) else state
    stages = {k: v for k, v in source.items() if str(k).startswith("stage")}
    if not stages:
        raise ValueError(f"checkpoint {path} has no encoder stages (stage0..stage4); top-level keys: {sorted(state)[:10]}")
    current = ckpt.model_state(model)
    wanted = sorted(k for k in current["encoder"] if str(k).startswith("stage"))
    missing = sorted(set(wanted) - set(map(str, stages)))
    if missing:
        raise ValueError(f"checkpoint {path} lacks encoder stages {missing}")
    merged = dict(current)
    merged["encoder"] = {**current["encoder"], **{k: stages[k] for k in wanted}}
    ckpt.apply_model_state(model, merged, strict=True)
    count = sum(np.size(x) for k in wanted for x in jax.tree.leaves(stages[k]))
    name = (meta.get("model") or {}).get("name", "?")
    return f"loaded encoder stages {', '.join(wanted)} ({count:,} values) from a {name} checkpoint"


def validate(config: Any, predict_fn, root: Path) -> dict[str, float]:
    """Mean Dice (and HD95 / IoU) on the validation split, as ``{"val/...": value}``."""
    from rwkvunet_jax import data
    from rwkvunet_jax.eval.images import evaluate_images
    from rwkvunet_jax.eval.volumes import evaluate_volumes

    kwargs = dict(image_size=tuple(config.data.image_size), batch_size=config.eval.batch_size,
                  tta=config.eval.val_tta, progress=False)
    if config.eval.protocol == "volume":
        volumes = data.get_volumes(config.dataset, root, config.data.val_split, list_dir=config.data.list_dir)
        summary, _ = evaluate_volumes(predict_fn, volumes, num_classes=config.model.num_classes, **kwargs)
    else:
        source = data.get_source(config.dataset, root, config.data.val_split, split_seed=config.data.split_seed,
                                 list_dir=config.data.list_dir)
        summary, _ = evaluate_images(predict_fn, source, num_outputs=config.model.num_classes, **kwargs)
    return {f"val/{k}": float(v) for k, v in summary.items() if k in ("mean_dice", "mean_hd95", "mean_iou")}


# ------------------------------------------------------------------------------------------------ helpers


def _eval_interval(config: Any, steps_per_epoch: int) -> int:
    if not config.data.val_split:
        return 0
    if config.eval.every_steps > 0:
        return int(config.eval.every_steps)
    if config.eval.every_epochs > 0:
        return max(1, int(round(config.eval.every_epochs * steps_per_epoch)))
    return 0


def _jsonable(record: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) and math.isfinite(v) else
                (None if isinstance(v, float) else v)) for k, v in record.items()}
