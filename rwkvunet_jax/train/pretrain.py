"""ImageNet-1K pretraining of the RWKV-UNet encoder classifiers (sharded, multi-host, preemption-safe).

Reads top to bottom like the run it performs (``train_and_evaluate``): config -> mesh -> data ->
model -> optimizer and schedule -> train state -> restore -> the shared loop (:mod:`rwkvunet_jax.train.loop`:
train step, logs, evaluations, checkpoints, preemption, bad-example counts, a checkpoint of the last step
before any exception propagates) -> export.

* State and step: :mod:`rwkvunet_jax.train.state` and :mod:`rwkvunet_jax.train.step`, the same as
  fine-tuning uses: ``jax.jit`` with explicit shardings on a ``(data, fsdp)`` mesh over every device of
  every process (:mod:`rwkvunet_jax.train.sharding`; optional FSDP splits parameters, EMA and optimizer
  state), EMA, gradient accumulation and BatchNorm groups as options of the step.
* Inputs stay uint8 on the host; :func:`normalize_images` maps them to the network's float input on the device.
* Checkpoints (:mod:`rwkvunet_jax.train.checkpoints`): asynchronous Orbax saves every N steps and when the
  job is preempted, restored sharded; a killed run resumes at its last checkpoint with the same data order.
* Exports ``WORKDIR/encoder`` and ``WORKDIR/encoder_ema`` (standalone model checkpoints) at every
  evaluation and at the end: what ``finetune`` takes as ``--config.init.encoder``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rwkvunet_jax.train import PREEMPTED_EXIT_CODE, losses
from rwkvunet_jax.train import sharding as shd
from rwkvunet_jax.train.step import TrainSteps, build_steps

log = logging.getLogger(__name__)

Pytree = Any


def normalize_images(batch: Mapping[str, jax.Array], dtype=None) -> jax.Array:
    """``batch["image"]`` uint8 (..., 3) -> float ``(x / 255 - mean) / std`` with the ImageNet mean and std."""
    from rwkvunet_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD

    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    out = (batch["image"].astype(jnp.float32) - mean) / std
    return out if dtype is None else out.astype(dtype)


def build_classifier_steps(model: nnx.Module, tx: optax.GradientTransformation, *, mesh: jax.sharding.Mesh,
                           num_classes: int, label_smoothing: float = 0.1, **options) -> TrainSteps:
    """:func:`~rwkvunet_jax.train.step.build_steps` for a classifier on uint8 images: label-smoothed cross
    entropy (or the batch's Mixup/CutMix ``"target"``). ``options``: those of ``build_steps``."""
    loss_fn = functools.partial(losses.classification_loss, num_classes=num_classes, label_smoothing=label_smoothing)
    return build_steps(model, tx, loss_fn, mesh=mesh, input_fn=normalize_images, **options)


def make_eval_step(steps: TrainSteps, num_classes: int) -> Callable:
    """Jitted ``(state, batch) -> sums``: counts of correct top-1/top-5 and summed loss of the plain (and EMA)
    weights over ``batch["valid"]`` rows."""

    def eval_step(state, batch):
        images = normalize_images(batch)
        labels, valid = batch["label"], batch["valid"].astype(jnp.float32)
        sums = {"count": valid.sum()}
        for prefix in ("", "ema_") if state.has_ema else ("",):
            params, batch_stats = state.weights(ema=bool(prefix))
            logits, _ = steps.model_def.apply(params, batch_stats, images, train=False)
            _, top = jax.lax.top_k(logits, min(5, num_classes))
            hit = top == labels[:, None]
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            sums[prefix + "top1"] = (hit[:, 0] * valid).sum()
            sums[prefix + "top5"] = (hit.any(axis=1) * valid).sum()
            sums[prefix + "loss"] = (nll * valid).sum()
        return sums

    return jax.jit(eval_step, in_shardings=(steps.shardings, shd.data_sharding(steps.mesh)),
                   out_shardings=shd.replicated(steps.mesh))


def export_encoder(directory: Path, model: nnx.Module, *, extra_meta: Mapping[str, Any]) -> None:
    """Replaces the standalone model checkpoint at ``directory`` (all processes call this)."""
    from rwkvunet_jax.checkpoint import save_model

    fresh = directory.with_name(directory.name + ".incoming")
    stale = directory.with_name(directory.name + ".previous")
    if shd.is_primary():
        shutil.rmtree(fresh, ignore_errors=True)
    shd.sync(f"export-start-{directory.name}")
    save_model(fresh, model, extra_meta=dict(extra_meta))
    shd.sync(f"export-written-{directory.name}")
    if shd.is_primary():
        shutil.rmtree(stale, ignore_errors=True)
        if directory.exists():
            directory.rename(stale)
        fresh.rename(directory)
        shutil.rmtree(stale, ignore_errors=True)
    shd.sync(f"export-done-{directory.name}")


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    """What :func:`train_and_evaluate` did."""

    step: int
    preempted: bool
    resumed_from: int | None
    metrics: dict[str, float]


def validate_config(config: Any) -> None:
    """Fail early, with the field's name, on settings that cannot work."""
    from rwkvunet_jax.train.config_fields import check_common_fields

    check_common_fields(config)
    if config.eval.batch_size % jax.process_count():
        raise ValueError(f"eval.batch_size {config.eval.batch_size} is not divisible by the {jax.process_count()} "
                         "processes")


def train_and_evaluate(config, workdir: str | Path) -> RunResult:
    """Runs (or resumes) ImageNet pretraining as configured (see ``configs/pretrain_imagenet.py``)."""
    from rwkvunet_jax.checkpoint import model_meta
    from rwkvunet_jax.data import imagenet
    from rwkvunet_jax.data.bad_examples import describe
    from rwkvunet_jax.data.mixup import MixupCutmix
    from rwkvunet_jax.data.pipeline import train_iterator
    from rwkvunet_jax.models.registry import create_model
    from rwkvunet_jax.train import loop
    from rwkvunet_jax.train.checkpoints import TrainCheckpoints
    from rwkvunet_jax.train.optimizer import optimizer_from_config, schedule_from_config

    validate_config(config)
    workdir = Path(workdir).absolute()
    pid, nproc = jax.process_index(), jax.process_count()
    primary = shd.is_primary()
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)

    # ---- mesh and batch geometry
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp)
    global_batch, accum = int(config.batch_size), int(config.accum_steps)
    if global_batch % nproc or global_batch % (shd.batch_divisor(mesh) * accum):
        raise ValueError(f"batch_size {global_batch} must be divisible by the {nproc} processes and by "
                         f"{shd.batch_divisor(mesh)} devices x {accum} accumulation steps")
    local_batch = global_batch // nproc

    # ---- data
    data = config.data
    root = data.root or None
    if data.source == "imagefolder" and data.get("fake_classes", 0):
        root = Path(root or workdir / "fake_imagefolder")
        if primary:
            imagenet.write_fake_imagefolder(root, num_classes=data.fake_classes,
                                            train_per_class=data.fake_train_per_class,
                                            val_per_class=data.fake_val_per_class, seed=config.seed)
        shd.sync("fake-imagefolder")
    train_source = imagenet.make_source(data.source, split=data.train_split, root=root, data_dir=data.data_dir or None,
                                        name=data.name)
    class_names = getattr(train_source, "class_names", None)
    eval_source = imagenet.make_source(data.source, split=data.val_split, root=root, data_dir=data.data_dir or None,
                                       name=data.name, class_names=class_names)
    num_classes = int(config.model.num_classes)
    if train_source.num_classes != num_classes:
        raise ValueError(f"the data has {train_source.num_classes} classes but model.num_classes={num_classes}")
    steps_per_epoch = len(train_source) // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{train_source!r} has fewer examples than one batch of {global_batch}")
    total_steps = int(config.total_steps) or int(config.epochs * steps_per_epoch)
    mix = config.mixup
    mixing = None
    if mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0):
        mixing = MixupCutmix(num_classes, mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, prob=mix.prob,
                             switch_prob=mix.switch_prob, label_smoothing=config.label_smoothing)
    aug = config.aug
    transform = imagenet.TrainTransform(
        data.image_size, randaugment=aug.randaugment or None, color_jitter=aug.color_jitter,
        color_jitter_with_randaugment=aug.color_jitter_with_randaugment, hflip=aug.hflip, scale=tuple(aug.scale),
        ratio=tuple(aug.ratio), interpolation=aug.interpolation)
    # Each element is a whole batch after batching, so threads beyond the buffer size would sit idle.
    train_iter = train_iterator(train_source, transform, batch_size=local_batch, seed=config.seed, shard_index=pid,
                                shard_count=nproc, batch_transform=mixing, worker_count=int(data.worker_count),
                                read_threads=data.prefetch_batches, prefetch_buffer_size=data.prefetch_batches)

    # ---- model, optimizer, state
    overrides = {k: v for k, v in config.model.overrides.items()}
    model = create_model(config.model.name, num_classes=num_classes, in_chans=3, seed=config.seed,
                         drop_path_rate=config.model.drop_path_rate, dtype=config.model.dtype, **overrides)
    schedule = schedule_from_config(config.optim, batch_size=global_batch, steps_per_epoch=steps_per_epoch,
                                    total_steps=total_steps)
    tx = optimizer_from_config(config.optim, schedule, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    steps = build_classifier_steps(
        model, tx, mesh=mesh, num_classes=num_classes, label_smoothing=config.label_smoothing, schedule=schedule,
        ema_decay=config.ema_decay, accum_steps=accum, bn_group_size=config.bn_group_size,
        fsdp=config.mesh.fsdp_params, fsdp_min_size=config.mesh.fsdp_min_size)
    eval_step = make_eval_step(steps, num_classes)
    log.info("%s: %d steps of %d images (%d per process), %d per epoch; mesh %s; state placed",
             config.model.name, total_steps, global_batch, local_batch, steps_per_epoch, dict(mesh.shape))

    # ---- restore
    checkpoints = TrainCheckpoints(workdir / "checkpoints", keep=config.checkpoint.keep,
                                   async_save=config.checkpoint.async_save)
    description = model_meta(model)
    state, meta, resumed_from = loop.restore_latest(checkpoints, steps, train_iter, model_meta=description)
    last_eval: dict[str, float] = dict((meta or {}).get("metrics", {}))
    if resumed_from is not None:
        log.info("resumed from step %d of %s", resumed_from, workdir)
    writer = None
    if primary:
        from rwkvunet_jax.train.metric_writer import MetricWriter

        writer = MetricWriter(workdir, resume_step=resumed_from)
        (workdir / "config.json").write_text(json.dumps(loop.config_dict(config), indent=2))
    meta_base = {"model": description, "config": loop.config_dict(config), "steps_per_epoch": steps_per_epoch,
                 "total_steps": total_steps, "process_count": nproc}
    eval_every = int(config.eval.every_steps) or int(round(config.eval.every_epochs * steps_per_epoch))

    def evaluate(state) -> dict[str, float]:
        totals: dict[str, float] = {}
        batches = imagenet.eval_batches(eval_source, image_size=config.eval.image_size or data.image_size,
                                        local_batch=config.eval.batch_size // nproc, crop_pct=config.eval.crop_pct,
                                        process_index=pid, process_count=nproc, worker_count=int(data.worker_count))
        for batch in batches:
            sums = shd.to_host(eval_step(state, shd.host_local_batch_to_global(batch, mesh)))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        count = max(totals.pop("count"), 1.0)
        return {f"eval/{k}": 100.0 * v / count if "top" in k else v / count for k, v in totals.items()}

    def export(step: int, state) -> None:
        extra = {"step": step, "metrics": last_eval, "source": "pretrain"}
        for ema in (False, True) if state.has_ema else (False,):
            export_encoder(workdir / ("encoder_ema" if ema else "encoder"), steps.to_model(state, ema=ema),
                           extra_meta=dict(extra, weights="ema" if ema else "plain"))

    exported_at = None

    def after_step(step: int, state) -> None:
        nonlocal last_eval, exported_at
        if eval_every and (step % eval_every == 0 or step == total_steps):
            last_eval = evaluate(state)
            if writer is not None:
                writer.write(step, last_eval)
            log.info("step %d: %s", step, last_eval)
            export(step, state)
            exported_at = step

    def meta_fn(step: int, preempted: bool) -> dict:
        return dict(meta_base, epoch=step / steps_per_epoch, metrics=last_eval, preempted=preempted)

    # ---- loop
    try:
        result = loop.run_loop(config, steps=steps, state=state, iterator=train_iter, checkpoints=checkpoints,
                               total_steps=total_steps, steps_per_epoch=steps_per_epoch, writer=writer,
                               meta_fn=meta_fn, after_step=after_step, progress=config.progress_bar,
                               desc="pretrain", workdir=workdir,
                               name_example=functools.partial(describe, train_source))
        if result.step == total_steps and not result.preempted and exported_at != result.step:
            export(result.step, result.state)
    finally:
        checkpoints.close()
        if writer is not None:
            writer.close()
    return RunResult(step=result.step, preempted=result.preempted, resumed_from=resumed_from, metrics=last_eval)


__all__ = [
    "PREEMPTED_EXIT_CODE", "RunResult", "build_classifier_steps", "export_encoder", "make_eval_step",
    "normalize_images", "train_and_evaluate",
]
