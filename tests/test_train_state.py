"""The functional train state and step against flax's own nnx.Optimizer path, on tiny stand-in networks;
EMA, gradient accumulation and BatchNorm groups against their definitions; train-state checkpoints.

train/state.py and train/step.py are model-agnostic; small conv nets keep compilation to a second.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rwkvunet_jax import checkpoint
from rwkvunet_jax.train import losses, schedules
from rwkvunet_jax.train.optimizer import make_optimizer
from rwkvunet_jax.train.state import create_train_state, model_state, split_model_state
from rwkvunet_jax.train.step import make_predict_fn, make_train_step


class TinySegNet(nnx.Module):
    def __init__(self, *, num_classes=3, dropout=0.0, seed=0, batch_norm=True):
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs) if batch_norm else nnx.LayerNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.conv2 = nnx.Conv(8, num_classes, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.conv2(self.drop(nnx.relu(self.norm(self.conv1(x)))))


def _batch(seed=0, n=4, size=16):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n, size, size, 1)).astype(np.float32)
    label = (image[..., 0] > 0).astype(np.int32) + (image[..., 0] > 1)
    return {"image": image, "label": label}


def _loss(logits, labels):
    return losses.segmentation_loss(logits, labels, ce_weight=0.5, dice_weight=0.5)


def _batch_loss(logits, batch):
    return _loss(logits, batch["label"])


LR = 3e-2


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _setup(model, lr=LR, **step_options):
    schedule = schedules.make_schedule("constant", lr=lr, total_steps=100)
    tx = make_optimizer(schedule, _params(model), weight_decay=1e-2)
    model_def, state = create_train_state(model, tx, ema=step_options.get("ema_decay", 0) > 0)
    step = jax.jit(make_train_step(model_def, tx, _batch_loss, schedule=schedule, **step_options))
    return model_def, state, step, tx


@pytest.fixture(scope="module")
def plain():
    """One compiled step of a dropout-free net, shared by the tests (one compilation)."""
    return _setup(TinySegNet())


def _leaves(*trees):
    return [np.asarray(x, np.float64) for tree in trees for x in jax.tree.leaves(tree)]


def test_train_step_matches_nnx_optimizer(plain):
    model_def, state, step, _ = plain
    reference = TinySegNet()
    reference.train()
    optimizer = nnx.Optimizer(reference, optax.adamw(LR, weight_decay=1e-2), wrt=nnx.Param)

    @nnx.jit
    def reference_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: _loss(m(batch["image"]), batch["label"])[0])(model)
        optimizer.update(model, grads)
        return loss

    for i in range(3):
        batch = _batch(i)
        state, metrics = step(state, batch)
        ref_loss = reference_step(reference, optimizer, batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-6)
        assert float(metrics["lr"]) == pytest.approx(LR)
        assert float(metrics["grad_norm"]) > 0
    ours = jax.tree.leaves(state.params) + jax.tree.leaves(state.batch_stats)
    theirs = jax.tree.leaves(nnx.as_pure(nnx.state(reference, nnx.Param))) + jax.tree.leaves(
        nnx.as_pure(nnx.state(reference, nnx.BatchStat)))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert int(state.step) == 3


def test_a_few_steps_lower_the_loss(plain):
    _, state, step, _ = plain
    batch = _batch(0)
    losses_seen = []
    for _ in range(15):
        state, metrics = step(state, batch)
        losses_seen.append(float(metrics["loss"]))
    assert losses_seen[-1] < 0.7 * losses_seen[0], losses_seen


def test_dropout_masks_depend_only_on_the_step():
    _, state, step, _ = _setup(TinySegNet(dropout=0.5))
    batch = _batch(0)
    first, _ = step(state, batch)
    again, _ = step(state, batch)  # same state and step -> same mask -> same update
    for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A different step number gives a different mask (and so different parameters).
    shifted, _ = step(state.replace(step=state.step + 1), batch)
    diffs = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(first.params), jax.tree.leaves(shifted.params))]
    assert max(diffs) > 0


def test_predict_fn_and_merge_model_agree_in_inference_mode(plain):
    model_def, state, step, _ = plain
    state, _ = step(state, _batch(0))
    images = _batch(1)["image"]
    logits = jax.jit(make_predict_fn(model_def))(state.params, state.batch_stats, images)
    model = model_def.merge(state.params, state.batch_stats)
    np.testing.assert_allclose(np.asarray(model(images)), np.asarray(logits), rtol=1e-5, atol=1e-6)
    # inference mode uses the running statistics: one image's logits do not depend on the rest of the batch
    np.testing.assert_allclose(np.asarray(model(images[:1])), np.asarray(logits[:1]), rtol=1e-5, atol=1e-6)


def test_model_state_split_takes_weights_and_checks_structure(plain):
    _, state, _, _ = plain
    other = TinySegNet(seed=5)
    params, _ = split_model_state(checkpoint.model_state(other), state.params, state.batch_stats)
    np.testing.assert_array_equal(np.asarray(params["conv1"]["kernel"]), np.asarray(other.conv1.kernel[...]))
    with pytest.raises(ValueError, match="shape"):
        split_model_state(checkpoint.model_state(TinySegNet(num_classes=4)), state.params, state.batch_stats)


# ----------------------------------------------------------------------------- step options by definition


def test_ema_follows_its_definition_and_is_the_checkpoints_model(tmp_path):
    from rwkvunet_jax.train import sharding
    from rwkvunet_jax.train.checkpoints import TrainCheckpoints

    decay = 0.9
    _, state, step, _ = _setup(TinySegNet(), ema_decay=decay)
    fresh = state
    expected = _leaves(state.params, state.batch_stats)  # the EMA starts at the initial weights
    for i in range(3):
        state, _ = step(state, _batch(i))
        new = _leaves(state.params, state.batch_stats)
        expected = [decay * e + (1 - decay) * n for e, n in zip(expected, new)]
    got = _leaves(state.ema_params, state.ema_batch_stats)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, _leaves(state.params, state.batch_stats))) > 1e-4

    # A checkpoint's model item holds the EMA weights (what evaluate and predict read); a restore gives both.
    with TrainCheckpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(state, iterator=_iterator(), meta={"model": {}})
    weights, _ = checkpoint.load_model_state(tmp_path / "ckpt")
    for a, b in zip(_leaves(split_model_state(weights, state.params, state.batch_stats)), got):
        np.testing.assert_array_equal(a, b)
    shardings = jax.tree.map(lambda _: sharding.replicated(sharding.local_mesh()), fresh)
    with TrainCheckpoints(tmp_path / "ckpt") as checkpoints:
        restored, _ = checkpoints.restore(3, like=fresh, shardings=shardings)
    for a, b in zip(_leaves(restored), _leaves(state)):
        np.testing.assert_array_equal(a, b)


def test_gradient_accumulation_averages_the_micro_batch_gradients():
    # Without BatchNorm: micro-batch i holds rows i, i + k, ... and the update uses the mean of their gradients.
    _, state, step, tx = _setup(TinySegNet(batch_norm=False), accum_steps=2)
    batch = _batch(3)
    new, metrics = step(state, batch)

    reference = TinySegNet(batch_norm=False)
    reference.train()

    def loss_of(params, rows):
        model = nnx.merge(nnx.graphdef(reference), nnx.State(params), nnx.state(reference, nnx.Not(nnx.Param)))
        return _loss(model(jnp.asarray(batch["image"])[rows]), jnp.asarray(batch["label"])[rows])[0]

    params = _params(reference)
    loss_and_grad = jax.jit(jax.value_and_grad(loss_of))
    parts = [loss_and_grad(params, np.array(rows)) for rows in ([0, 2], [1, 3])]
    grads = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    np.testing.assert_allclose(float(metrics["loss"]), (float(parts[0][0]) + float(parts[1][0])) / 2, rtol=1e-6)
    for a, b in zip(_leaves(new.params), _leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_batchnorm_groups_use_their_own_statistics():
    _, state, step, _ = _setup(TinySegNet(), lr=1e-2, bn_group_size=2)
    batch = _batch(4)
    new, metrics = step(state, batch)

    # Reference: each pair of images through its own copy of the model in training mode.
    logits, stats = [], []
    for rows in (slice(0, 2), slice(2, 4)):
        model = TinySegNet()
        model.train()
        logits.append(model(batch["image"][rows]))
        stats.append(_leaves(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
    expected_loss = float(_loss(jnp.concatenate(logits), batch["label"])[0])
    whole = TinySegNet()
    whole.train()
    whole_loss = float(_loss(whole(batch["image"]), batch["label"])[0])
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss, rtol=1e-5)
    assert abs(whole_loss - expected_loss) > 1e-4  # the groups do change the normalisation
    for got, a, b in zip(_leaves(new.batch_stats), *stats):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- checkpoints


def _iterator():
    import grain

    return iter(grain.MapDataset.range(100).batch(2).to_iter_dataset())


def test_train_checkpoint_round_trip_and_mismatch(plain, tmp_path):
    pytest.importorskip("grain")
    from rwkvunet_jax.checkpoint import CheckpointError
    from rwkvunet_jax.train import sharding
    from rwkvunet_jax.train.checkpoints import TrainCheckpoints

    model_def, state, step, tx = plain
    state, _ = step(state, _batch(0))
    iterator = _iterator()
    next(iterator)
    shardings = jax.tree.map(lambda _: sharding.replicated(sharding.local_mesh()), state)
    meta = {"model": {"name": "tiny"}}
    with TrainCheckpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(state, iterator=iterator, meta=meta)
    with TrainCheckpoints(tmp_path / "ckpt") as checkpoints:
        assert checkpoints.latest_step() == 1
        fresh_iterator = _iterator()
        restored, saved_meta = checkpoints.restore(1, like=create_train_state(TinySegNet(seed=9), tx)[1],
                                                   shardings=shardings, iterator=fresh_iterator,
                                                   model_meta={"name": "tiny"})
        assert saved_meta["model"] == {"name": "tiny"} and saved_meta["step"] == 1
        assert _leaves(restored) and len(_leaves(restored)) == len(_leaves(state))
        for a, b in zip(_leaves(restored), _leaves(state)):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(next(fresh_iterator), next(iterator))  # the data position came back
        with pytest.raises(CheckpointError, match="different model"):
            checkpoints.restore(1, like=state, shardings=shardings, model_meta={"name": "other"})
        sgd = optax.sgd(0.1, momentum=0.9)
        other = create_train_state(TinySegNet(), sgd)[1]
        with pytest.raises(CheckpointError, match="another optimizer"):
            checkpoints.restore(1, like=other, shardings=jax.tree.map(lambda _: shardings.step, other))
    # The model item is a model checkpoint every reader takes.
    weights, _ = checkpoint.load_model_state(tmp_path / "ckpt")
    assert sorted(map(str, weights)) == sorted(map(str, model_state(state.params, state.batch_stats)))
    params, batch_stats = split_model_state(weights, state.params, state.batch_stats)
    for a, b in zip(_leaves(params, batch_stats), _leaves(state.params, state.batch_stats)):
        np.testing.assert_array_equal(a, b)
