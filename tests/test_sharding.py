"""Sharding: a step on 8 (fake CPU) devices equals the same step on one device.

The 8-device part runs this file as a script in a subprocess, because the device count must be fixed
(XLA_FLAGS) before JAX starts. SGD is used for the comparison: Adam divides by the root of tiny second
moments and turns summation-order round-off of near-zero gradients into lr-sized differences.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- in-process (1 device)


def test_fsdp_spec_splits_largest_divisible_dim_and_keeps_small_arrays_whole():
    from jax.sharding import PartitionSpec as P

    from rwkvunet_jax.train.sharding import fsdp_spec

    assert fsdp_spec((3, 3, 64, 128), 8, min_size=0) == P(None, None, None, "fsdp")
    assert fsdp_spec((96, 10), 8, min_size=0) == P("fsdp", None)  # 10 not divisible, 96 is
    assert fsdp_spec((7, 5), 8, min_size=0) == P()  # nothing divisible
    assert fsdp_spec((256,), 8, min_size=1000) == P()  # too small
    assert fsdp_spec((256, 256), 1, min_size=0) == P()  # no fsdp axis


def test_make_mesh_rejects_sizes_that_do_not_match_the_devices():
    import jax

    from rwkvunet_jax.train.sharding import make_mesh

    n = jax.device_count()
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": n, "fsdp": 1}
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=n + 1, fsdp=1)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_initialize_distributed_auto_stays_single_process_without_a_cluster():
    from rwkvunet_jax.train.sharding import initialize_distributed

    assert initialize_distributed("auto", environ={}) is False
    with pytest.raises(ValueError, match="mode"):
        initialize_distributed("sometimes", environ={})


def test_host_local_batch_must_split_over_local_devices():
    import jax

    from rwkvunet_jax.train.sharding import host_local_batch_to_global, make_mesh

    mesh = make_mesh()
    ok = host_local_batch_to_global({"x": np.arange(2 * jax.local_device_count())}, mesh)
    np.testing.assert_array_equal(np.asarray(ok["x"]), np.arange(2 * jax.local_device_count()))
    if jax.local_device_count() > 1:
        with pytest.raises(ValueError, match="divisible"):
            host_local_batch_to_global({"x": np.arange(jax.local_device_count() + 1)}, mesh)


# ----------------------------------------------------------------------------- 8 devices (subprocess)


@pytest.fixture(scope="module")
def eight_device_results(tmp_path_factory, cpu_devices_env):
    out = tmp_path_factory.mktemp("sharding") / "results.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], env=cpu_devices_env(8), cwd=REPO,
                          capture_output=True, text=True, timeout=1200)  # minutes on a loaded 2-core machine
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_data_parallel_step_matches_one_device(eight_device_results):
    r = eight_device_results["data_parallel"]
    assert r["devices"] == 8
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=0, atol=2e-6)
    # Round-off only: reductions are summed in another order (parameters moved by ~1e-2).
    assert r["param_change"] > 1e-2
    assert r["max_param_diff"] < 1e-5
    assert r["max_batch_stat_diff"] < 1e-5
    assert r["max_ema_diff"] < 1e-5


def test_fsdp_step_matches_one_device_and_really_shards(eight_device_results):
    r = eight_device_results["fsdp"]
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=0, atol=2e-6)
    assert r["max_param_diff"] < 1e-5
    assert r["max_ema_diff"] < 1e-5
    # Large kernels are split in 4 along the fsdp axis, and so are their SGD momentum buffers.
    assert r["sharded_params"] > 0 and r["sharded_opt_leaves"] >= r["sharded_params"]
    assert r["max_shard_fraction"] == pytest.approx(0.25)
    assert r["rule_replicated_head"] is True


def test_gradient_accumulation_on_8_devices_equals_one_big_step(eight_device_results):
    # A BatchNorm-free model: with BatchNorm, each micro-batch normalises with its own statistics,
    # so k micro-batches of b are *not* one batch of k*b (the same holds for the official code).
    r = eight_device_results["accumulation"]
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-6, atol=1e-6)
    assert r["max_param_diff"] < 1e-6
    assert r["param_change"] > 1e-3


# ----------------------------------------------------------------------------- the worker


def _max_diff(a, b) -> float:
    import jax

    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _run(model_fn, mesh, batches, *, num_classes, fsdp=False, accum=1, rules=()):
    import optax

    from rwkvunet_jax.train import sharding as shd
    from rwkvunet_jax.train.pretrain import build_classifier_steps

    model = model_fn()
    tx = optax.sgd(0.05, momentum=0.9)
    steps = build_classifier_steps(model, tx, mesh=mesh, num_classes=num_classes, label_smoothing=0.1,
                                   ema_decay=0.9, accum_steps=accum, fsdp=fsdp, fsdp_min_size=256,
                                   sharding_rules=rules)
    state, losses = steps.state, []
    initial = shd.to_host(state.params)
    for batch in batches:
        state, metrics = steps.train_step(state, shd.host_local_batch_to_global(batch, mesh))
        losses.append(float(shd.to_host(metrics["loss"])))
    return steps, state, losses, initial


def _worker(out_path: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rwkvunet_jax.models.registry import create_model
    from rwkvunet_jax.train import sharding as shd

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    num_classes = 10
    batches = [{"image": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8),
                "label": rng.integers(0, num_classes, 16).astype(np.int32)} for _ in range(2)]

    def encoder():  # BatchNorm, LayerNorm, IR-RWKV blocks and active drop path
        return create_model("rwkv_unet_encoder_t", num_classes=num_classes, depths=(1, 1, 2, 2),
                            widths=(8, 16, 16, 32), drop_path_rate=0.3, seed=0)

    one = shd.make_mesh(devices=jax.devices()[:1])
    results = {}
    _, ref_state, ref_losses, initial = _run(encoder, one, batches, num_classes=num_classes)
    ref = shd.to_host(ref_state)

    _, dp_state, dp_losses, _ = _run(encoder, shd.make_mesh(), batches, num_classes=num_classes)
    dp = shd.to_host(dp_state)
    results["data_parallel"] = dict(
        devices=jax.device_count(), losses=dp_losses, ref_losses=ref_losses,
        max_param_diff=_max_diff(dp.params, ref.params),
        max_batch_stat_diff=_max_diff(dp.batch_stats, ref.batch_stats),
        max_ema_diff=_max_diff(dp.ema_params, ref.ema_params),
        param_change=_max_diff(ref.params, initial))

    rules = ((r"^params/head/kernel$", "replicate"),)
    steps, fs_state, fs_losses, _ = _run(encoder, shd.make_mesh(data=2, fsdp=4), batches, num_classes=num_classes,
                                         fsdp=True, rules=rules)

    def sharded_leaves(tree):
        return [x for x in jax.tree.leaves(tree) if not x.sharding.is_fully_replicated]

    params_sharded = sharded_leaves(fs_state.params)
    fractions = {x.addressable_shards[0].data.size / x.size for x in params_sharded}
    fs = shd.to_host(fs_state)
    results["fsdp"] = dict(
        losses=fs_losses, ref_losses=ref_losses, max_param_diff=_max_diff(fs.params, ref.params),
        max_ema_diff=_max_diff(fs.ema_params, ref.ema_params), sharded_params=len(params_sharded),
        sharded_opt_leaves=len(sharded_leaves(fs_state.opt_state)), max_shard_fraction=max(fractions),
        rule_replicated_head=bool(fs_state.params["head"]["kernel"].sharding.is_fully_replicated
                                  and fs_state.params["head"]["kernel"].size >= 256))

    class Small(nnx.Module):  # no BatchNorm, no drop path
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, num_classes, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.mean(jax.nn.gelu(self.norm(self.conv(x))), axis=(1, 2)))

    small = lambda: Small(nnx.Rngs(0))  # noqa: E731
    _, big_state, big_losses, initial = _run(small, one, batches, num_classes=num_classes)
    _, acc_state, acc_losses, _ = _run(small, shd.make_mesh(), batches, num_classes=num_classes, accum=2)
    results["accumulation"] = dict(
        losses=acc_losses, ref_losses=big_losses,
        max_param_diff=_max_diff(shd.to_host(acc_state.params), shd.to_host(big_state.params)),
        param_change=_max_diff(shd.to_host(big_state.params), initial))
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _worker(sys.argv[1])
