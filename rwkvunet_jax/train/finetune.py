"""Fine-tuning a segmentation model from a config (``rwkvunet finetune``), readable top to bottom.

config -> mesh (data parallel over the local devices) -> data -> model (+ pretrained encoder) ->
optimizer -> restore the latest checkpoint if there is one -> loop (progress bar with loss and lr; metrics to
TensorBoard, CSV and JSON lines; periodic validation; periodic and best checkpoints) -> progress.png ->
final evaluation of the best (or last) weights on the test split.

Work directory::

    WORKDIR/checkpoints/<step>/        model, optimizer, data (grain iterator state), meta  (periodic)
    WORKDIR/checkpoints_best/<step>/   the same, for the best validation mean Dice
    WORKDIR/metrics.{jsonl,csv}, WORKDIR/tensorboard/, WORKDIR/progress.png, WORKDIR/config.json
    WORKDIR/eval_<test split>/metrics.{json,csv}, .../overlays/*.png  (as `rwkvunet evaluate` writes them)

Rerunning the same command after a kill resumes at the last saved step with the same data order: the
grain iterator state is saved with every checkpoint, and drop-path masks depend only on the seed and the
step (see :mod:`rwkvunet_jax.train.state`), so the resumed losses equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rwkvunet_jax import checkpoint as ckpt
from rwkvunet_jax.eval.report import plot_progress
from rwkvunet_jax.data.bad_examples import BadExampleCounter, describe
from rwkvunet_jax.train import failsafe, losses, schedules, sharding
from rwkvunet_jax.train import state as train_state
from rwkvunet_jax.train.metric_writer import MetricWriter, read_metrics
from rwkvunet_jax.train.progress import step_bar

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def train_and_evaluate(config: Any, workdir: str | Path, *, stop_after_step: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Fine-tune (or resume fine-tuning) per ``config`` in ``workdir``, then evaluate on the test split.

    ``stop_after_step`` stops the loop after that many total steps without a final checkpoint or
    evaluation (what a kill at that point leaves behind; for tests). Returns a summary dict with the
    final ``step``, the ``best`` validation record and the test ``metrics`` (if evaluated).
    """
    from rwkvunet_jax import data

    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    validate_config(config)

    # --- devices: a data-parallel mesh over this host's devices ---------------------------------------
    mesh = sharding.local_mesh()
    devices = sharding.batch_divisor(mesh)
    for field in ("batch_size", "eval.batch_size"):
        value = config.batch_size if field == "batch_size" else config.eval.batch_size
        if value % devices:
            raise ValueError(f"{field} {value} is not divisible by the {devices} local devices")

    # --- data --------------------------------------------------------------------------------------------
    root = Path(config.data.root).expanduser()
    train_source = data.get_source(config.dataset, root, config.data.train_split, split_seed=config.data.split_seed,
                                   list_dir=config.data.list_dir)
    steps_per_epoch = len(train_source) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training split of {train_source!r} has {len(train_source)} examples, fewer than "
                         f"one batch of {config.batch_size}")
    total_steps = int(config.total_steps) or int(config.epochs) * steps_per_epoch
    train_iter = data.train_iterator(
        train_source, augment=config.data.augment, image_size=tuple(config.data.image_size),
        batch_size=config.batch_size, seed=config.seed, worker_count=config.data.worker_count)
    eval_every = _eval_interval(config, steps_per_epoch)

    # --- model, optimizer, train state ------------------------------------------------------------------
    model = build_model(config)
    schedule = make_schedule(config, total_steps)
    tx = train_state.make_optimizer(
        schedule, weight_decay=config.optim.weight_decay, b1=config.optim.b1, b2=config.optim.b2,
        eps=config.optim.eps, grad_clip_norm=config.optim.grad_clip_norm)

    # --- restore, or start (from a pretrained encoder if given) -----------------------------------------
    manager = ckpt.open_manager(workdir / ckpt.CHECKPOINTS_DIR, max_to_keep=config.checkpoint.keep)
    best_manager = ckpt.open_manager(workdir / ckpt.BEST_CHECKPOINTS_DIR, max_to_keep=1)
    resume_step = manager.latest_step()
    best = {"step": -1, "val/mean_dice": -math.inf}
    if resume_step is None:
        if config.init.encoder:
            report = load_pretrained_encoder(model, config.init.encoder)
            log.info("pretrained encoder from %s: %s", config.init.encoder, report)
            print(f"pretrained encoder from {config.init.encoder}: {report}")
        graphs, state = train_state.create_train_state(model, tx)
        for step in best_manager.all_steps():  # left by an earlier attempt that never saved a periodic step
            best_manager.delete(step)
    else:
        graphs, state = train_state.create_train_state(model, tx)
        state, meta = restore(manager, resume_step, graphs, state, model, train_iter)
        saved_best = meta.get("best") or {}
        if saved_best.get("val/mean_dice") is not None:
            best = saved_best
        for step in best_manager.all_steps():  # a best saved after the checkpoint we resume from
            if step > resume_step:
                best_manager.delete(step)
        print(f"resuming {workdir} at step {resume_step}/{total_steps}")
    (workdir / "config.json").write_text(config.to_json(indent=2))

    # --- placement and compilation: parameters replicated, batch split over the devices --------------
    replicated = sharding.replicated(mesh)
    state = jax.device_put(state, replicated)
    loss_fn = make_loss_fn(config)
    train_step = jax.jit(train_state.make_train_step(graphs, tx, loss_fn, schedule),
                         in_shardings=(replicated, sharding.data_sharding(mesh)),
                         out_shardings=(replicated, replicated))
    predict = jax.jit(train_state.make_predict_fn(graphs), in_shardings=(replicated, sharding.data_sharding(mesh)),
                      out_shardings=sharding.data_sharding(mesh))

    def predict_fn(images: np.ndarray) -> np.ndarray:
        # Reads `state` when called: validation sees the latest weights, the final test the best ones.
        return np.asarray(predict(state, sharding.host_local_batch_to_global(images, mesh)))

    # --- loop --------------------------------------------------------------------------------------------
    start_step = int(resume_step or 0)
    writer = MetricWriter(workdir, resume_step=resume_step)
    bar = step_bar(progress, total=total_steps, initial=start_step, desc="finetune")
    window: list[tuple[int, dict[str, jax.Array]]] = []
    window_start = time.perf_counter()
    step = start_step
    bad_examples = BadExampleCounter(config.data.max_bad_fraction, min_examples=config.data.bad_fraction_min_examples,
                                     name=lambda i: describe(train_source, i))
    data_state = None  # the iterator after the last completed step: what a checkpoint on failure stores
    try:
        while step < total_steps:
            batch = next(train_iter)
            next_data_state = failsafe.IteratorSnapshot(train_iter)
            bad_examples.update(batch)
            device_batch = sharding.host_local_batch_to_global({"image": batch["image"], "label": batch["label"]}, mesh)
            state, metrics = train_step(state, device_batch)
            step += 1
            data_state = next_data_state
            window.append((step, metrics))
            is_last = step == total_steps
            if step % config.log_every_steps == 0 or is_last or step == stop_after_step:
                record = _flush_window(window, window_start, config.batch_size)
                record["train/epoch"] = step / steps_per_epoch
                record["data/bad_examples"] = bad_examples.bad
                writer.write(step, record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['train/lr']:.2e}")
                window = []
            if bar is not None:
                bar.update(1)
            if eval_every and (step % eval_every == 0 or is_last):
                val = validate(config, predict_fn, root)
                writer.write(step, val)
                plot_progress(read_metrics(workdir), workdir / "progress.png")
                print(f"step {step}: validation mean Dice {val['val/mean_dice']:.4f}")
                if val["val/mean_dice"] > best["val/mean_dice"]:
                    best = {"step": step, **val}
                    save(best_manager, step, graphs, state, model, train_iter, config, best, total_steps)
            if step % config.checkpoint.every_steps == 0 or is_last:
                save(manager, step, graphs, state, model, train_iter, config, best, total_steps)
            if not window:  # throughput excludes validation and checkpoint time
                window_start = time.perf_counter()
            if stop_after_step is not None and step >= stop_after_step:
                break
    except BaseException as err:
        failsafe.checkpoint_before_raising(
            err, step=step, start_step=start_step, latest_saved=manager.latest_step(),
            save=lambda: save(manager, step, graphs, state, model, data_state, config, best, total_steps),
            poisoned=isinstance(err, NonFiniteLossError))
        raise
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        manager.wait_until_finished()
        best_manager.wait_until_finished()
        manager.close()
        best_manager.close()

    plot_progress(read_metrics(workdir), workdir / "progress.png")
    summary: dict[str, Any] = {"step": step, "total_steps": total_steps, "best": best, "workdir": str(workdir)}
    if step < total_steps:
        return summary  # stopped early (stop_after_step): what a killed run leaves

    # --- final evaluation on the test split --------------------------------------------------------------
    if config.data.test_split:
        if best["step"] >= 0:
            state = restore_weights_only(workdir / ckpt.BEST_CHECKPOINTS_DIR, graphs, state, model, replicated)
            print(f"testing the best checkpoint (step {best['step']}, validation mean Dice "
                  f"{best['val/mean_dice']:.4f})")
        from rwkvunet_jax.eval.evaluate import eval_dir, evaluate_dataset

        summary["metrics"] = evaluate_dataset(
            predict_fn, dataset=config.dataset, root=root, split=config.data.test_split,
            split_seed=config.data.split_seed, protocol=config.eval.protocol, num_outputs=config.model.num_classes,
            image_size=tuple(config.data.image_size), batch_size=config.eval.batch_size, tta=config.eval.tta,
            class_names=tuple(config.class_names), outdir=eval_dir(workdir, config.data.test_split),
            num_overlays=config.eval.num_overlays,
            paper=dict(config.paper), progress=progress, list_dir=config.data.list_dir)
    return summary


# ------------------------------------------------------------------------------------------------ pieces


def validate_config(config: Any) -> None:
    """Fail early, with the field's name, on settings that cannot work."""
    h, w = config.data.image_size
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        raise ValueError(f"data.image_size must be positive multiples of 16, got {tuple(config.data.image_size)}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {config.batch_size}")
    if config.total_steps < 0 or (config.total_steps == 0 and config.epochs < 1):
        raise ValueError(f"set epochs >= 1 or total_steps > 0 (epochs={config.epochs}, total_steps={config.total_steps})")
    if config.checkpoint.every_steps < 1 or config.log_every_steps < 1:
        raise ValueError("checkpoint.every_steps and log_every_steps must be >= 1")
    if config.eval.protocol not in ("volume", "image"):
        raise ValueError(f"eval.protocol must be 'volume' or 'image', got {config.eval.protocol!r}")
    if config.optim.schedule not in schedules.SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {schedules.SCHEDULES}, got {config.optim.schedule!r}")
    if not str(config.data.root):
        raise ValueError("data.root is empty: pass --config.data.root=/path/to/the/dataset")


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


def make_schedule(config: Any, total_steps: int):
    """The learning-rate schedule of ``config.optim`` over ``total_steps``."""
    period = int(config.optim.period_steps) or max(1, 3 * int(config.epochs) // 4)
    return schedules.make_schedule(
        config.optim.schedule, base_lr=config.optim.lr, total_steps=total_steps, min_lr=config.optim.min_lr,
        warmup_steps=config.optim.warmup_steps, power=config.optim.poly_power, period_steps=period)


def make_loss_fn(config: Any):
    """``(logits, labels) -> (loss, parts)`` with the config's CE/Dice weights."""
    ignore = int(config.loss.ignore_index)

    def loss_fn(logits, labels):
        return losses.segmentation_loss(logits, labels, ce_weight=config.loss.ce_weight,
                                        dice_weight=config.loss.dice_weight,
                                        ignore_index=ignore if ignore >= 0 else None)

    return loss_fn


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


def save(manager, step: int, graphs, state, model, train_iter, config, best: dict, total_steps: int) -> None:
    """Write one training checkpoint (model, optimizer, data-iterator state, meta) at ``step``."""
    ocp = ckpt._ocp()
    host = jax.device_get(state)
    weights = _model_with_state(graphs, host, model)
    meta = {"step": int(step), "total_steps": int(total_steps), "model": ckpt.model_meta(weights),
            "best": _jsonable(best), "config": json.loads(config.to_json())}
    optimizer = {"step": np.asarray(host.step), "opt_state": train_state.opt_state_to_dict(host.opt_state)}
    manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(ckpt.model_state(weights)),
        optimizer=ocp.args.StandardSave(optimizer),
        data=ocp.args.JsonSave(_iterator_state(train_iter)),
        meta=ocp.args.JsonSave(meta)))


def restore(manager, step: int, graphs, state, model, train_iter):
    """Load checkpoint ``step`` into a fresh train state and the data iterator; returns (state, meta)."""
    ocp = ckpt._ocp()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(), optimizer=ocp.args.StandardRestore(),
            data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as err:  # Orbax raises many types for damaged checkpoints
        raise ckpt.CheckpointError(f"could not restore step {step} from {manager.directory}: {err}") from err
    meta = restored["meta"]
    expected = json.loads(json.dumps(ckpt.model_meta(model)))  # tuples -> lists, as stored
    if meta.get("model") != expected:
        raise ckpt.CheckpointError(
            f"checkpoint {manager.directory}/{step} holds a different model: {meta.get('model')} "
            f"but the config builds {expected}; use another --workdir or the matching config")
    ckpt.apply_model_state(model, restored["model"], strict=True)
    state = train_state.replace_model(graphs, state, model)
    opt_state = train_state.opt_state_from_dict(state.opt_state, restored["optimizer"]["opt_state"])
    state = state.replace(step=jax.numpy.asarray(restored["optimizer"]["step"], jax.numpy.int32), opt_state=opt_state)
    _set_iterator_state(train_iter, restored["data"])
    return state, meta


def restore_weights_only(directory: Path, graphs, state, model, sharding_):
    """``state`` with the model weights of the latest checkpoint in ``directory`` (e.g. the best one)."""
    weights, _ = ckpt.load_model_state(directory)
    ckpt.apply_model_state(model, weights, strict=True)
    return jax.device_put(train_state.replace_model(graphs, jax.device_get(state), model), sharding_)


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


def _model_with_state(graphs, host_state, model):
    """A model object (inference mode) carrying ``host_state``'s weights."""
    return train_state.merge_model(graphs, host_state)


def _flush_window(window, window_start: float, batch_size: int) -> dict[str, float]:
    """Average the metrics of the last steps; stop with the step number if a loss is not finite."""
    host = jax.device_get([m for _, m in window])  # waits for the steps to finish
    seconds = time.perf_counter() - window_start
    for (step, _), metrics in zip(window, host):
        if not np.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"training loss is {float(metrics['loss'])} at step {step}; lower optim.lr, check the data "
                f"(labels within [0, num_classes)), or try float32 compute")
    record = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
    record["train/lr"] = float(host[-1]["lr"])
    record["train/images_per_sec"] = len(window) * batch_size / max(seconds, 1e-9)
    return record


def _iterator_state(train_iter) -> dict[str, Any]:
    state = train_iter.get_state()
    if isinstance(state, bytes):
        return {"encoding": "bytes", "state": state.decode("utf-8")}
    return {"encoding": "json", "state": state}


def _set_iterator_state(train_iter, saved: dict[str, Any]) -> None:
    state = saved["state"]
    train_iter.set_state(state.encode("utf-8") if saved.get("encoding") == "bytes" else state)


def _jsonable(record: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) and math.isfinite(v) else
                (None if isinstance(v, float) else v)) for k, v in record.items()}
