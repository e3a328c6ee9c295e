"""ImageNet-1K pretraining of the RWKV-UNet encoder classifiers (sharded, multi-host, preemption-safe).

Reads top to bottom like the run it performs (``train_and_evaluate``): config -> mesh -> data ->
model -> state -> restore -> loop (train step, logs, evals, checkpoints) -> export.

* State: a dict of pure pytrees ``{"step", "params", "batch_stats", "opt_state", "ema_params",
  "ema_batch_stats"}`` split from an ``nnx`` model; the step functions merge it back into the model
  inside ``jax.jit``. Drop-path keys are derived from the step, so a restored run draws the same masks.
* Sharding: ``jax.jit`` with explicit shardings on a ``(data, fsdp)`` mesh over every device of every
  process (:mod:`rwkvunet_jax.train.sharding`); optional FSDP splits parameters, EMA and optimizer state.
* Gradient accumulation: ``accum_steps`` micro-batches in a ``lax.scan``; BatchNorm statistics are then
  those of each micro-batch (as with a smaller per-step batch), everything else equals one big step.
* Checkpoints: asynchronous Orbax (``rwkvunet_jax.checkpoint.open_manager``) every N steps and when the
  job is preempted (SIGTERM; with several processes JAX's preemption service makes every process save
  at the same step), items ``model`` (plain weights, what ``load_model`` reads), ``optimizer`` (optax
  state, EMA weights, step), ``data`` (each process's grain iterator state) and ``meta``. Orbax renames
  a step directory only once complete, so a half-written checkpoint is never the latest.
* Exports ``WORKDIR/encoder`` and ``WORKDIR/encoder_ema`` (standalone model checkpoints) at every
  evaluation and at the end: what ``finetune`` takes as ``--config.init.encoder``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rwkvunet_jax.data.bad_examples import BAD_INDEX, BadExampleCounter, BadFractionError, describe
from rwkvunet_jax.train import failsafe
from rwkvunet_jax.train import sharding as shd
from rwkvunet_jax.train.progress import step_bar

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; launchers requeue on it.
STATE_KEYS = ("step", "params", "batch_stats", "opt_state", "ema_params", "ema_batch_stats")

Pytree = Any


# ----------------------------------------------------------------------------- schedule and optimizer


def warmup_cosine_schedule(*, peak_lr: float, total_steps: int, warmup_steps: int, warmup_init_lr: float = 5e-7,
                           min_lr: float = 5e-7) -> Callable[[Any], jax.Array]:
    """The official per-iteration schedule (timm ``CosineLRScheduler``, no warm-up prefix).

    Linear from ``warmup_init_lr`` to ``peak_lr`` over ``warmup_steps``; after that
    ``min_lr + (peak_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2``. The cosine clock starts
    at step 0, not at the end of the warm-up, as in the official run.
    """
    if total_steps <= 0 or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = warmup_init_lr + (peak_lr - warmup_init_lr) * step / max(warmup_steps, 1)
        t = jnp.minimum(step, total_steps)
        cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / total_steps))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def weight_decay_mask(params: Pytree) -> Pytree:
    """Decay matrices and kernels only: biases, norm scales and the per-channel WKV vectors (ndim <= 1)
    are exempt, as timm's optimizer factory does by default."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(optim: Mapping[str, Any], schedule: Callable, params: Pytree) -> optax.GradientTransformation:
    """``optim.name``: ``"adamw"`` (the recipe) or ``"sgd"`` (momentum; used by sharding tests because
    Adam magnifies round-off in near-zero gradients). Gradients are clipped to ``optim.clip_norm``."""
    name = optim.get("name", "adamw")
    if name == "adamw":
        core = optax.adamw(schedule, b1=optim.get("b1", 0.9), b2=optim.get("b2", 0.999), eps=optim.get("eps", 1e-8),
                           weight_decay=optim.get("weight_decay", 0.05), mask=weight_decay_mask(params))
    elif name == "sgd":
        core = optax.sgd(schedule, momentum=optim.get("momentum", 0.0) or None)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose 'adamw' or 'sgd'")
    clip = optim.get("clip_norm", 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), core) if clip and clip > 0 else core


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing (``1 - eps + eps/K`` on the label, ``eps/K`` elsewhere)."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def _norm(tree: Pytree) -> jax.Array:
    norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.6; global_norm is deprecated
    return norm(tree) if norm is not None else optax.global_norm(tree)


# ----------------------------------------------------------------------------- model <-> state


def _deep_merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if key in out and isinstance(value, Mapping) else value
    return out


def _select_like(tree: Mapping, template: Mapping) -> dict:
    """The entries of ``tree`` at the paths of ``template`` (keys matched as strings, template's key types)."""
    by_str = {str(k): v for k, v in tree.items()}
    out = {}
    for key, sub in template.items():
        value = by_str[str(key)] if str(key) in by_str else tree[key]
        out[key] = _select_like(value, sub) if isinstance(sub, Mapping) else value
    return out


class _RngTemplate:
    """The model's non-parameter state as host constants; PRNG keys get re-derived per step."""

    def __init__(self, rest_pure: Pytree):
        leaves, self.treedef = jax.tree.flatten(rest_pure)
        self.entries = []
        for leaf in leaves:
            is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            data = np.asarray(jax.random.key_data(leaf)) if is_key else np.asarray(leaf)
            impl = jax.random.key_impl(leaf) if is_key else None
            self.entries.append((is_key, data, impl))

    def build(self, step: jax.Array, micro: int | jax.Array = 0) -> Pytree:
        leaves = []
        for is_key, data, impl in self.entries:
            if is_key:
                key = jax.random.wrap_key_data(jnp.asarray(data), impl=impl)
                leaves.append(jax.random.fold_in(jax.random.fold_in(key, step), micro))
            else:
                leaves.append(jnp.asarray(data))
        return jax.tree.unflatten(self.treedef, leaves)


@dataclasses.dataclass
class PretrainSteps:
    """Jitted train / eval steps for a classifier, plus the placed initial state and its shardings.

    Build with :func:`build_steps`. ``train_step(state, batch) -> (state, metrics)`` takes a global batch
    ``{"image": uint8 (B, H, W, 3), "label": int32 (B,)[, "target": f32 (B, K)]}``;
    ``eval_step(state, batch) -> sums`` also needs ``"valid"`` and returns correct-prediction counts of
    the plain and EMA weights.
    """

    model: nnx.Module
    mesh: jax.sharding.Mesh
    state: dict[str, Pytree]
    state_shardings: dict[str, Pytree]
    train_step: Callable
    eval_step: Callable
    params_template: Pytree
    batch_stats_template: Pytree

    def model_state(self, state: Mapping[str, Pytree], *, ema: bool = False) -> dict:
        """A ``checkpoint.model_state``-format dict (parameters + BatchNorm statistics) of ``state``."""
        prefix = "ema_" if ema else ""
        return _deep_merge(state[prefix + "params"], state[prefix + "batch_stats"])

    def split_model_state(self, merged: Mapping) -> tuple[dict, dict]:
        """Inverse of :meth:`model_state`."""
        return _select_like(merged, self.params_template), _select_like(merged, self.batch_stats_template)

    def to_model(self, state: Mapping[str, Pytree], *, ema: bool = False) -> nnx.Module:
        """The model (eval mode) holding the plain or EMA weights of ``state`` (arrays not copied)."""
        prefix = "ema_" if ema else ""
        model = nnx.clone(self.model)
        current = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
        nnx.replace_by_pure_dict(current, _deep_merge(state[prefix + "params"], state[prefix + "batch_stats"]))
        nnx.update(model, current)
        model.eval()
        return model


def build_steps(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    mesh: jax.sharding.Mesh,
    num_classes: int,
    label_smoothing: float = 0.1,
    ema_decay: float = 0.9998,
    accum_steps: int = 1,
    fsdp: bool = False,
    fsdp_min_size: int = shd.DEFAULT_FSDP_MIN_SIZE,
    sharding_rules=(),
    schedule: Callable | None = None,
) -> PretrainSteps:
    """Splits ``model`` into a training state placed on ``mesh`` and jits the train and eval steps."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    model.train()
    graph_train, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    graph_eval = nnx.graphdef(model)
    model.train()
    params = nnx.to_pure_dict(params)
    batch_stats = nnx.to_pure_dict(batch_stats)
    rngs = _RngTemplate(nnx.to_pure_dict(rest))
    batch_axes = shd.data_sharding(mesh).spec[0]

    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "ema_params": params,
        "ema_batch_stats": batch_stats,
    }
    shardings = shd.state_shardings(state, mesh, fsdp=fsdp, min_size=fsdp_min_size, rules=sharding_rules)
    state = shd.place(state, shardings)

    def forward(graphdef, params, batch_stats, images, step, micro):
        module = nnx.merge(graphdef, nnx.State(params), nnx.State(batch_stats), nnx.State(rngs.build(step, micro)))
        logits = module(images).astype(jnp.float32)
        return logits, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    def loss_and_grads(params, batch_stats, images, targets, step, micro):
        def loss_fn(params, batch_stats):
            logits, new_stats = forward(graph_train, params, batch_stats, images, step, micro)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        return loss, grads, new_stats

    def train_step(state, batch):
        from rwkvunet_jax.data.imagenet import normalize_on_device

        step = state["step"]
        images = normalize_on_device(batch["image"])
        targets = batch["target"] if "target" in batch else soft_targets(batch["label"], num_classes, label_smoothing)
        if accum_steps == 1:
            loss, grads, new_stats = loss_and_grads(state["params"], state["batch_stats"], images, targets, step, 0)
        else:
            # Micro-batch i takes rows i, i + k, ...: every device keeps 1/k of its rows in each micro-batch.
            def split(x):
                x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
                x = jnp.moveaxis(x, 1, 0)
                spec = jax.sharding.PartitionSpec(None, batch_axes)
                return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

            def body(carry, xs):
                grad_sum, loss_sum, stats = carry
                micro_images, micro_targets, micro = xs
                loss, grads, stats = loss_and_grads(state["params"], stats, micro_images, micro_targets, step, micro)
                return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, stats), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            (grad_sum, loss_sum, new_stats), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), state["batch_stats"]),
                (split(images), split(targets), jnp.arange(accum_steps)))
            grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
            loss = loss_sum / accum_steps
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = lambda e, p: e * ema_decay + p.astype(e.dtype) * (1.0 - ema_decay)  # noqa: E731
        new_state = {
            "step": step + 1,
            "params": params,
            "batch_stats": new_stats,
            "opt_state": opt_state,
            "ema_params": jax.tree.map(ema, state["ema_params"], params),
            "ema_batch_stats": jax.tree.map(ema, state["ema_batch_stats"], new_stats),
        }
        metrics = {"loss": loss, "grad_norm": _norm(grads), "param_norm": _norm(params)}
        if schedule is not None:
            metrics["lr"] = schedule(step)
        return new_state, metrics

    def eval_step(state, batch):
        from rwkvunet_jax.data.imagenet import normalize_on_device

        images = normalize_on_device(batch["image"])
        labels, valid = batch["label"], batch["valid"].astype(jnp.float32)
        sums = {"count": valid.sum()}
        for prefix in ("", "ema_"):
            logits, _ = forward(graph_eval, state[prefix + "params"], state[prefix + "batch_stats"], images,
                                jnp.zeros((), jnp.int32), 0)
            _, top = jax.lax.top_k(logits, min(5, num_classes))
            hit = top == labels[:, None]
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            sums[prefix + "top1"] = (hit[:, 0] * valid).sum()
            sums[prefix + "top5"] = (hit.any(axis=1) * valid).sum()
            sums[prefix + "loss"] = (nll * valid).sum()
        return sums

    batch_sharding = shd.data_sharding(mesh)
    repl = shd.replicated(mesh)
    jit_train = jax.jit(train_step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, repl),
                        donate_argnums=(0,))
    jit_eval = jax.jit(eval_step, in_shardings=(shardings, batch_sharding), out_shardings=repl)
    return PretrainSteps(model=model, mesh=mesh, state=state, state_shardings=shardings, train_step=jit_train,
                         eval_step=jit_eval, params_template=params, batch_stats_template=batch_stats)


# ----------------------------------------------------------------------------- checkpoints


class _IteratorState:
    """Hands a captured grain iterator state to grain's Orbax handler (which calls get/set_state).

    Capturing it at save time decouples the file from the live iterator, which keeps moving while
    Orbax writes in the background.
    """

    def __init__(self, state: Mapping | None = None):
        self.state = None if state is None else dict(state)

    def get_state(self) -> bytes:
        return json.dumps(self.state, sort_keys=True).encode()

    def set_state(self, state: bytes | str) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # grain's handler calls it after set_state
        pass


def save_checkpoint(manager, steps: PretrainSteps, state: Mapping, data_state: Mapping, meta: Mapping,
                    *, force: bool = False) -> bool:
    """Starts an asynchronous save of ``state`` at its step (all processes call this)."""
    import grain
    import orbax.checkpoint as ocp

    step = int(shd.to_host(state["step"]))
    optimizer = {"opt_state": state["opt_state"], "ema": steps.model_state(state, ema=True), "step": state["step"]}
    return manager.save(step, force=force, args=ocp.args.Composite(
        model=ocp.args.StandardSave(steps.model_state(state)),
        optimizer=ocp.args.StandardSave(optimizer),
        data=grain.checkpoint.CheckpointSave(_IteratorState(data_state)),
        meta=ocp.args.JsonSave(dict(meta, step=step)),
    ))


def restore_checkpoint(manager, steps: PretrainSteps, step: int) -> tuple[dict, dict, dict]:
    """``(state, data_state, meta)`` of checkpoint ``step``, placed with the run's shardings."""
    import grain
    import orbax.checkpoint as ocp

    current = steps.state
    abstract = lambda tree, shard: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shard)
    sh = steps.state_shardings
    model_target = abstract(steps.model_state(current), steps.model_state(sh))
    optimizer_target = {"opt_state": abstract(current["opt_state"], sh["opt_state"]),
                        "ema": abstract(steps.model_state(current, ema=True), steps.model_state(sh, ema=True)),
                        "step": abstract(current["step"], sh["step"])}
    holder = _IteratorState()
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(model_target),
        optimizer=ocp.args.StandardRestore(optimizer_target),
        data=grain.checkpoint.CheckpointRestore(holder),
        meta=ocp.args.JsonRestore(),
    ))
    params, batch_stats = steps.split_model_state(restored["model"])
    ema_params, ema_batch_stats = steps.split_model_state(restored["optimizer"]["ema"])
    state = {"step": restored["optimizer"]["step"], "params": params, "batch_stats": batch_stats,
             "opt_state": restored["optimizer"]["opt_state"], "ema_params": ema_params,
             "ema_batch_stats": ema_batch_stats}
    # Restored leaves already carry the target shardings; place() is a no-op check for them.
    state = shd.place(state, steps.state_shardings)
    return state, holder.state, restored["meta"]


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


# ----------------------------------------------------------------------------- preemption


class PreemptionWatcher:
    """Tells the loop when to save and stop: SIGTERM on any process -> the same step everywhere.

    With several processes this uses JAX's preemption service (started by ``jax.distributed``, which
    catches SIGTERM itself and agrees on a step across processes); on one process a Python handler
    sets a flag.
    """

    def __init__(self):
        self.multiprocess = jax.process_count() > 1
        self._flag = False
        self._previous = None
        if not self.multiprocess:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self._flag = True

    def reached(self, step: int) -> bool:
        if self.multiprocess:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service disabled
                return False
        return self._flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# ----------------------------------------------------------------------------- the run


def _batch_fingerprint(batch: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha1()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:16]


def _config_dict(config) -> dict:
    to_dict = getattr(config, "to_dict", None)
    return json.loads(json.dumps(to_dict() if to_dict else dict(config), default=str))


@dataclasses.dataclass
class RunResult:
    """What :func:`train_and_evaluate` did."""

    step: int
    preempted: bool
    resumed_from: int | None
    metrics: dict[str, float]


def train_and_evaluate(config, workdir: str | Path) -> RunResult:
    """Runs (or resumes) ImageNet pretraining as configured (see ``configs/pretrain_imagenet.py``)."""
    from rwkvunet_jax.checkpoint import model_meta, open_manager
    from rwkvunet_jax.data import imagenet
    from rwkvunet_jax.data.mixup import MixupCutmix
    from rwkvunet_jax.models.registry import create_model

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
                                            val_per_class=data.fake_val_per_class, seed=data.seed)
        shd.sync("fake-imagefolder")
    train_source = imagenet.make_source(data.source, split=data.train_split, root=root, data_dir=data.data_dir or None,
                                        name=data.name)
    class_names = getattr(train_source, "class_names", None)
    eval_source = imagenet.make_source(data.source, split=data.eval_split, root=root, data_dir=data.data_dir or None,
                                       name=data.name, class_names=class_names)
    num_classes = int(config.model.num_classes)
    if train_source.num_classes != num_classes:
        raise ValueError(f"the data has {train_source.num_classes} classes but model.num_classes={num_classes}")
    steps_per_epoch = len(train_source) // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"{train_source!r} has fewer examples than one batch of {global_batch}")
    total_steps = int(config.total_steps) if config.total_steps > 0 else int(config.num_epochs * steps_per_epoch)
    mix = config.mixup
    mixing = None
    if mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0):
        mixing = MixupCutmix(num_classes, mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, prob=mix.prob,
                             switch_prob=mix.switch_prob, label_smoothing=config.label_smoothing)
    workers = imagenet.auto_worker_count(int(data.num_workers))
    aug = config.aug
    transform = dict(randaugment=aug.randaugment or None, color_jitter=aug.color_jitter,
                     color_jitter_with_randaugment=aug.color_jitter_with_randaugment, hflip=aug.hflip,
                     scale=tuple(aug.scale), ratio=tuple(aug.ratio), interpolation=aug.interpolation)

    def new_train_iterator():
        return imagenet.train_iterator(train_source, image_size=data.image_size, local_batch=local_batch,
                                       seed=data.seed, process_index=pid, process_count=nproc, transform=transform,
                                       mixing=mixing, worker_count=workers, prefetch_batches=data.prefetch_batches)

    # ---- model, optimizer, state
    overrides = {k: v for k, v in config.model.overrides.items()}
    model = create_model(config.model.name, num_classes=num_classes, in_chans=3, seed=config.seed,
                         drop_path_rate=config.model.drop_path_rate, dtype=config.model.dtype, **overrides)
    peak_lr = config.optim.base_lr * global_batch / config.optim.base_batch
    warmup_steps = min(int(round(config.optim.warmup_epochs * steps_per_epoch)), total_steps - 1)
    schedule = warmup_cosine_schedule(peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                                      warmup_init_lr=config.optim.warmup_init_lr, min_lr=config.optim.min_lr)
    params_for_mask = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = make_optimizer(config.optim, schedule, params_for_mask)
    steps = build_steps(model, tx, mesh=mesh, num_classes=num_classes, label_smoothing=config.label_smoothing,
                        ema_decay=config.ema_decay, accum_steps=accum, fsdp=config.mesh.fsdp_params,
                        fsdp_min_size=config.mesh.fsdp_min_size, schedule=schedule)
    state = steps.state
    log.info("%s: %d steps of %d images (%d per process), %d per epoch; mesh %s; state placed",
             config.model.name, total_steps, global_batch, local_batch, steps_per_epoch, dict(mesh.shape))

    # ---- restore
    manager = open_manager(workdir / "checkpoints", max_to_keep=config.checkpoint.keep,
                           async_save=config.checkpoint.async_save)
    train_iter = new_train_iterator()
    resumed_from = manager.latest_step()
    meta_base = {"model": model_meta(model), "config": _config_dict(config), "steps_per_epoch": steps_per_epoch,
                 "total_steps": total_steps, "process_count": nproc}
    last_eval: dict[str, float] = {}
    if resumed_from is not None:
        state, data_state, meta = restore_checkpoint(manager, steps, resumed_from)
        if data_state is not None:
            train_iter.set_state(data_state)
        last_eval = dict(meta.get("metrics", {}))
        log.info("resumed from step %d of %s", resumed_from, workdir)
    step = int(shd.to_host(state["step"]))

    # ---- logging
    writer = None
    if primary:
        from rwkvunet_jax.train.metric_writer import MetricWriter

        writer = MetricWriter(workdir, resume_step=resumed_from)
        (workdir / "config.json").write_text(json.dumps(meta_base["config"], indent=2))
    batch_log = None
    if config.debug.log_batches:
        (workdir / "batch_log").mkdir(parents=True, exist_ok=True)
        batch_log = (workdir / "batch_log" / f"process_{pid}.jsonl").open("a")
    watcher = PreemptionWatcher()
    eval_every = int(config.eval.every_steps) or int(round(config.eval.every_epochs * steps_per_epoch))
    ckpt_every = int(config.checkpoint.every_steps)
    progress = step_bar(primary and config.progress_bar, total=total_steps, initial=step, desc="pretrain")

    def evaluate(state) -> dict[str, float]:
        totals: dict[str, float] = {}
        batches = imagenet.eval_batches(eval_source, image_size=config.eval.image_size or data.image_size,
                                        local_batch=config.eval.batch_size // nproc, crop_pct=config.eval.crop_pct,
                                        process_index=pid, process_count=nproc, worker_count=workers)
        for batch in batches:
            sums = shd.to_host(steps.eval_step(state, shd.host_local_batch_to_global(batch, mesh)))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        count = max(totals.pop("count"), 1.0)
        return {f"eval/{k}": 100.0 * v / count if "top" in k else v / count for k, v in totals.items()}

    def export(state, metrics):
        extra = {"step": step, "metrics": metrics, "source": "pretrain"}
        for ema in (False, True):
            export_encoder(workdir / ("encoder_ema" if ema else "encoder"), steps.to_model(state, ema=ema),
                           extra_meta=dict(extra, weights="ema" if ema else "plain"))

    # ---- loop
    preempted = False
    t_last, step_last, first_step = time.perf_counter(), step, step
    metrics_dev = None
    bad_examples = BadExampleCounter(data.max_bad_fraction, min_examples=data.bad_fraction_min_examples,
                                     name=lambda i: describe(train_source, i))
    data_state = None  # the iterator after the last completed step
    try:
        while step < total_steps:
            host_batch = next(train_iter)
            next_data_state = train_iter.get_state()
            if batch_log is not None:
                batch_log.write(json.dumps({"step": step, "hash": _batch_fingerprint(host_batch)}) + "\n")
                batch_log.flush()
            bad_examples.update(host_batch, check=False)  # checked at log steps, over all processes
            host_batch = {k: v for k, v in host_batch.items() if k != BAD_INDEX}
            state, metrics_dev = steps.train_step(state, shd.host_local_batch_to_global(host_batch, mesh))
            step += 1
            data_state = next_data_state
            if step == first_step + 1:  # keep compilation out of the throughput figures
                jax.block_until_ready(metrics_dev)
                log.info("first step compiled and ran in %.1f s", time.perf_counter() - t_last)
                t_last, step_last = time.perf_counter(), step
            if progress is not None:
                progress.update(1)
            if config.debug.sigterm_at_step and step == config.debug.sigterm_at_step and pid == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # rehearses a preemption notice
            if step % config.log_every_steps == 0 or step == total_steps:
                metrics = {k: float(v) for k, v in shd.to_host(metrics_dev).items()}
                now = time.perf_counter()
                if step > step_last:
                    metrics["images_per_second"] = (step - step_last) * global_batch / max(now - t_last, 1e-9)
                metrics["epoch"] = step / steps_per_epoch
                t_last, step_last = now, step
                seen, bad = bad_examples.seen, bad_examples.bad
                if nproc > 1:  # a collective at the same step everywhere: every process decides alike
                    from jax.experimental import multihost_utils

                    seen, bad = (int(v) for v in multihost_utils.process_allgather(np.array([seen, bad])).sum(0))
                metrics["data/bad_examples"] = bad
                if writer is not None:
                    writer.write(step, metrics)
                if progress is not None:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics.get('lr', 0):.2e}")
                bad_examples.check(seen, bad)
            do_eval = bool(config.eval.enabled and eval_every and (step % eval_every == 0 or step == total_steps))
            if do_eval:
                last_eval = evaluate(state)
                if writer is not None:
                    writer.write(step, last_eval)
                log.info("step %d: %s", step, last_eval)
            preempted = watcher.reached(step)
            if preempted or step % ckpt_every == 0 or step == total_steps:
                meta = dict(meta_base, epoch=step / steps_per_epoch, metrics=last_eval, preempted=preempted)
                save_checkpoint(manager, steps, state, data_state, meta, force=True)
            if do_eval or (step == total_steps and not preempted):
                export(state, last_eval)
            if preempted:
                log.warning("preempted: checkpoint at step %d written; exiting with code %d", step,
                            PREEMPTED_EXIT_CODE)
                break
    except BaseException as err:
        failsafe.checkpoint_before_raising(
            err, step=step, start_step=first_step, latest_saved=manager.latest_step(), process_count=nproc,
            collective=isinstance(err, BadFractionError),
            save=lambda: save_checkpoint(manager, steps, state, data_state, dict(
                meta_base, epoch=step / steps_per_epoch, metrics=last_eval, preempted=False,
                stopped_by=type(err).__name__), force=True))
        raise
    finally:
        manager.wait_until_finished()
        manager.close()
        watcher.close()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        if batch_log is not None:
            batch_log.close()
    return RunResult(step=step, preempted=preempted, resumed_from=resumed_from, metrics=last_eval)


__all__ = [
    "PREEMPTED_EXIT_CODE", "PretrainSteps", "RunResult", "build_steps", "make_optimizer", "soft_targets",
    "train_and_evaluate", "warmup_cosine_schedule", "weight_decay_mask", "save_checkpoint", "restore_checkpoint",
    "PreemptionWatcher", "export_encoder",
]
