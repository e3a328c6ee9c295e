"""The optimizer of every run: the weight-decay mask against the official PyTorch tensor shapes, decoupled
decay per mask, and learning rates scaled with the batch from the ``optim`` config."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from rwkvunet_jax.train.optimizer import make_optimizer, schedule_from_config, weight_decay_mask

SMALL = dict(depths=(1, 1, 2, 2), widths=(8, 16, 16, 32))


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(getattr(k, "key", k) for k in path): leaf for path, leaf in leaves}


def test_timm_mask_decays_exactly_the_tensors_that_are_not_1d_in_the_official_model():
    from rwkvunet_jax.convert.torch_names import official_layout
    from rwkvunet_jax.models.registry import create_model

    # The segmentation model holds the encoder's tensors and the decoder's (CCM token-shift mixes among them);
    # shapes are all the mask needs, so the model is built abstractly.
    model = nnx.eval_shape(lambda: create_model("rwkv_unet_t", num_classes=3, in_chans=1, **SMALL))
    mask = _flat(weight_decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "timm"))
    checked, mixes = 0, 0
    for entry in official_layout(model.spec):
        if entry.used and entry.jax_path in mask:
            assert mask[entry.jax_path] == (len(entry.shape) > 1), (entry.name, entry.shape)
            checked += 1
            mixes += "spatial_mix_" in entry.name
    assert checked == len(mask) and mixes > 0  # every parameter checked, token-shift mixes among them
    assert all(_flat(weight_decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)), "all")).values())
    with pytest.raises(ValueError, match="weight_decay_mask"):
        weight_decay_mask({"w": np.zeros(2)}, "some")


@pytest.mark.parametrize("rule", ["timm", "all"])
def test_adamw_decays_by_the_mask(rule):
    # With zero gradients Adam's step is 0, so the update is the decoupled decay alone: -lr * wd * p.
    params = {"kernel": np.full((2, 2), 2.0, np.float32), "bias": np.full(2, 3.0, np.float32),
              "spatial_mix_k": np.full(2, 4.0, np.float32)}
    tx = make_optimizer(optax.constant_schedule(0.1), params, weight_decay=0.5, weight_decay_mask_rule=rule)
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    decayed = {"kernel": True, "bias": rule == "all", "spatial_mix_k": True}
    for key, value in params.items():
        np.testing.assert_allclose(updates[key], -0.1 * 0.5 * value if decayed[key] else 0 * value, rtol=1e-6)


def test_clipping_scales_the_gradient_to_the_norm():
    params = {"w": np.zeros(4, np.float32)}
    tx = make_optimizer(optax.constant_schedule(1.0), params, name="sgd", grad_clip_norm=1.0)
    grads = {"w": np.array([3.0, 4.0, 0.0, 0.0], np.float32)}  # norm 5
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8, 0, 0], rtol=1e-6)


def _optim(**overrides):
    optim = dict(name="adamw", lr=1.5e-3, reference_batch=512, min_lr=2.5e-7, warmup_init_lr=2.5e-7,
                 schedule="timm_cosine", poly_power=0.9, period_steps=0, warmup_steps=0, warmup_epochs=20.0)
    optim.update(overrides)
    return optim


def test_lr_warmup_start_and_minimum_scale_with_the_batch():
    # The official run: 1.5e-3 per 512 images -> 3e-3 at 1024, warm-up start and minimum 5e-7 at 1024.
    spe, epochs = 10, 300
    schedule = schedule_from_config(_optim(), batch_size=1024, steps_per_epoch=spe, total_steps=epochs * spe)
    assert float(schedule(0)) == pytest.approx(5e-7, rel=1e-6)
    assert float(schedule(20 * spe)) == pytest.approx(5e-7 + 0.5 * (3e-3 - 5e-7) * (1 + np.cos(np.pi * 20 / 300)),
                                                      rel=1e-5)
    assert float(schedule(epochs * spe)) == pytest.approx(5e-7, rel=1e-5)
    half = schedule_from_config(_optim(), batch_size=256, steps_per_epoch=spe, total_steps=epochs * spe)
    assert float(half(0)) == pytest.approx(1.25e-7, rel=1e-6)
    assert float(half(150 * spe)) == pytest.approx(1.25e-7 + 0.5 * (7.5e-4 - 1.25e-7), rel=1e-5)
    unscaled = schedule_from_config(_optim(reference_batch=0, warmup_epochs=0.0, schedule="constant"),
                                    batch_size=1024, steps_per_epoch=spe, total_steps=100)
    assert float(unscaled(7)) == pytest.approx(1.5e-3)
    steps = schedule_from_config(_optim(warmup_steps=5), batch_size=512, steps_per_epoch=spe, total_steps=100)
    # warmup_steps wins over warmup_epochs; timm's cosine clock runs from step 0
    assert float(steps(4)) == pytest.approx(2.5e-7 + (1.5e-3 - 2.5e-7) * 4 / 5, rel=1e-5)
    assert float(steps(5)) == pytest.approx(2.5e-7 + 0.5 * (1.5e-3 - 2.5e-7) * (1 + np.cos(np.pi * 5 / 100)),
                                            rel=1e-5)
