"""The functional train state against flax's own nnx.Optimizer path, on a tiny stand-in network.

train/state.py is model-agnostic; a small conv + BatchNorm + dropout net keeps compilation to a second.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rwkvunet_jax.train import losses, schedules
from rwkvunet_jax.train import state as train_state


class TinySegNet(nnx.Module):
    def __init__(self, *, num_classes=3, dropout=0.0, seed=0):
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
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


LR = 3e-2


def _setup(model, lr=LR):
    schedule = schedules.make_schedule("constant", base_lr=lr, total_steps=100)
    tx = train_state.make_optimizer(schedule, weight_decay=1e-2)
    graphs, state = train_state.create_train_state(model, tx)
    step = jax.jit(train_state.make_train_step(graphs, tx, _loss, schedule))
    return graphs, state, step, tx


@pytest.fixture(scope="module")
def plain():
    """One compiled step of a dropout-free net, shared by the tests (one compilation)."""
    return _setup(TinySegNet())


def test_train_step_matches_nnx_optimizer(plain):
    graphs, state, step, _ = plain
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
    ours = jax.tree.leaves(state.params) + jax.tree.leaves(state.model_state)
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
    graphs, state, step, _ = _setup(TinySegNet(dropout=0.5))
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
    graphs, state, step, _ = plain
    state, _ = step(state, _batch(0))
    images = _batch(1)["image"]
    logits = jax.jit(train_state.make_predict_fn(graphs))(state, images)
    model = train_state.merge_model(graphs, state)
    np.testing.assert_allclose(np.asarray(model(images)), np.asarray(logits), rtol=1e-5, atol=1e-6)
    # inference mode uses the running statistics: one image's logits do not depend on the rest of the batch
    np.testing.assert_allclose(np.asarray(model(images[:1])), np.asarray(logits[:1]), rtol=1e-5, atol=1e-6)


def test_replace_model_takes_weights_and_checks_structure(plain):
    graphs, state, _, _ = plain
    other = TinySegNet(seed=5)
    replaced = train_state.replace_model(graphs, state, other)
    np.testing.assert_array_equal(np.asarray(replaced.params["conv1"]["kernel"]), np.asarray(other.conv1.kernel[...]))
    with pytest.raises(ValueError, match="shape"):
        train_state.replace_model(graphs, state, TinySegNet(num_classes=4))


def test_optimizer_state_dict_round_trip_and_mismatch(plain):
    _, state, step, tx = plain
    state, _ = step(state, _batch(0))
    flat = train_state.opt_state_to_dict(state.opt_state)
    fresh = tx.init(state.params)
    restored = train_state.opt_state_from_dict(fresh, {k: np.asarray(v) for k, v in flat.items()})
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="different optimizer"):
        train_state.opt_state_from_dict(fresh, dict(list(flat.items())[:-1]))
