"""Data parallelism: the fine-tuning loop on 2 fake CPU devices gives the losses of a 1-device run (slow)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from rwkvunet_jax.data.phantom import write_phantom_dataset
    from rwkvunet_jax.commands.parsing import load_config
    from rwkvunet_jax.train.finetune import train_and_evaluate
    from rwkvunet_jax.train.metric_writer import read_metrics

    root, workdir, config_file = sys.argv[1:4]
    write_phantom_dataset(root, num_train=8, num_val=4, num_test=4, image_size=(32, 32), num_classes=3, seed=0)
    config = load_config(config_file, [
        f"--config.data.root={root}", "--config.data.image_size=(32,32)",
        "--config.model.depths=(1,1,2,2)", "--config.model.widths=(8,16,16,32)", "--config.model.num_classes=3",
        "--config.class_names=('b','x','y')", "--config.batch_size=4", "--config.eval.batch_size=4",
        "--config.total_steps=3", "--config.optim.warmup_steps=0", "--config.log_every_steps=1",
        "--config.model.drop_path_rate=0.0", "--config.eval.every_steps=3", "--config.data.test_split="])
    train_and_evaluate(config, workdir, progress=False)
    losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
    val = [r["val/mean_dice"] for r in read_metrics(workdir) if "val/mean_dice" in r]
    print("RESULT", json.dumps({"devices": jax.local_device_count(), "losses": losses, "val": val}))
""")


def _run(tmp_path, devices, env):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(tmp_path / f"run{devices}"),
                          str(CONFIGS / "demo.py")], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [line for line in out.stdout.splitlines() if line.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
def test_two_devices_match_one(tmp_path, cpu_devices_env):
    one, two = _run(tmp_path, 1, cpu_devices_env(1)), _run(tmp_path, 2, cpu_devices_env(2))
    assert (one["devices"], two["devices"]) == (1, 2)
    # BatchNorm statistics are global under jit + sharding, so the steps agree up to reduction order.
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(two["val"], one["val"], atol=1e-3)
