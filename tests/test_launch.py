"""launch/local_multiprocess.sh: two processes joined by jax.distributed train, are preempted, resume.

The run is killed the way a cluster does it (SIGTERM to the launcher, forwarded to every process);
JAX's preemption service makes both processes save at the same step and exit with 75. The rerun must
restore that step and feed each process the batch an uninterrupted pipeline would give it next,
which the test recomputes independently from the same data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"


def _command(workdir: Path, total_steps: int) -> list[str]:
    script = Path(sys.executable).with_name("rwkvunet")
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "rwkvunet_jax"]
    config = str(REPO / "configs/pretrain_imagenet.py:smoke")
    return ["bash", str(LAUNCHER), "2", *entry, "pretrain", "--config", config, "--workdir", str(workdir),
            f"--config.total_steps={total_steps}", "--config.checkpoint.every_steps=2",
            "--config.eval.every_steps=0", "--config.eval.every_epochs=0", "--config.progress_bar=False",
            "--config.debug.log_batches=True",
            "--config.data.fake_train_per_class=4", "--config.checkpoint.keep=10"]


def _env(tmp_path: Path) -> dict[str, str]:
    # A compilation cache shared by both runs spares the rerun compiling the train step again.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return env


def _steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _log(workdir: Path, process: int) -> list[dict]:
    path = workdir / "batch_log" / f"process_{process}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow  # two launches of two JAX processes each (minutes); run with -m slow
def test_two_processes_train_get_preempted_and_resume_at_the_same_batch(tmp_path):
    workdir = tmp_path / "run"
    total = 40  # far more than the first run gets to do before it is stopped
    env = _env(tmp_path)
    first = subprocess.Popen(_command(workdir, total), env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 400
    while not _steps(workdir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if first.poll() is None:
        first.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler would
    try:
        out, _ = first.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(first.pid, signal.SIGKILL)
        out, _ = first.communicate()
        pytest.fail("the preempted run did not stop:\n" + out[-4000:])
    assert first.returncode == 75, out[-4000:]
    saved = _steps(workdir)[-1]
    assert 2 <= saved < total
    assert sorted(p.name for p in (workdir / "checkpoints" / str(saved) / "data").glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert "preempted at step" in out

    second = subprocess.run(_command(workdir, saved + 2), env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=400)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    assert f"done at step {saved + 2} (resumed from {saved})" in out2

    # What an uninterrupted pipeline yields at steps 0 .. saved + 1, per process.
    from rwkvunet_jax.commands.parsing import load_config
    from rwkvunet_jax.data import imagenet
    from rwkvunet_jax.data.pipeline import train_iterator
    from rwkvunet_jax.train.loop import batch_fingerprint

    config = load_config(f"{REPO / 'configs/pretrain_imagenet.py'}:smoke")
    source = imagenet.ImageFolderSource(workdir / "fake_imagefolder" / "train")
    aug = config.aug
    transform = imagenet.TrainTransform(config.data.image_size, randaugment=aug.randaugment,
                                        color_jitter=aug.color_jitter, hflip=aug.hflip, scale=tuple(aug.scale),
                                        ratio=tuple(aug.ratio), interpolation=aug.interpolation)
    for process in (0, 1):
        it = train_iterator(source, transform, batch_size=config.batch_size // 2, seed=config.seed,
                            shard_index=process, shard_count=2, read_threads=config.data.prefetch_batches,
                            prefetch_buffer_size=config.data.prefetch_batches)
        expected = [batch_fingerprint(next(it)) for _ in range(saved + 2)]
        entries = _log(workdir, process)
        first_run = [e for e in entries if e["step"] < saved]
        resumed = entries[-2:]
        assert [e["step"] for e in resumed] == [saved, saved + 1]
        assert [e["hash"] for e in first_run[:saved]] == expected[:saved]
        assert [e["hash"] for e in resumed] == expected[saved:]
    assert len(set(expected)) == len(expected)  # the fingerprints do tell batches apart

    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, saved + 3))  # no duplicated or missing steps
    assert all(np.isfinite(m["train/loss"]) for m in metrics)
