"""Images per second of the pretraining train step and of the ImageNet input pipeline, per model size.

    python benchmarks/pretrain_throughput.py                          # t, s, b at 224, batch 8 per device
    python benchmarks/pretrain_throughput.py --sizes b --batch 256 --dtype bfloat16 --steps 20
    python benchmarks/pretrain_throughput.py --pipeline-only --workers 14 --root /data/imagenet

The step is timed on random uint8 images (after ``--warmup`` untimed steps, which include compilation)
on all local devices (data parallel; ``--fsdp`` shards parameters). The pipeline is timed on
``--root`` (ImageFolder), ``--tfds-dir`` (tfds imagenet2012 ArrayRecord) or, by default, a generated
ImageFolder of ImageNet-sized JPEGs, with the full training augmentation and ``--workers`` processes.
A pipeline rate above the step rate means the devices are kept fed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def time_train_step(size: str, *, batch: int, image_size: int, timed: int, warmup: int, dtype: str,
                    accum: int, fsdp: bool) -> dict:
    import jax
    from flax import nnx

    from rwkvunet_jax.models.registry import create_model
    from rwkvunet_jax.train import sharding as shd
    from rwkvunet_jax.train.optimizer import make_optimizer
    from rwkvunet_jax.train.pretrain import build_classifier_steps
    from rwkvunet_jax.train.schedules import make_schedule

    mesh = shd.make_mesh(data=1, fsdp=-1) if fsdp else shd.make_mesh()
    model = create_model(f"rwkv_unet_encoder_{size}", num_classes=1000, dtype=dtype)
    schedule = make_schedule("timm_cosine", lr=3e-3, total_steps=1000, warmup_steps=10, warmup_init_lr=5e-7,
                             min_lr=5e-7)
    tx = make_optimizer(schedule, nnx.to_pure_dict(nnx.state(model, nnx.Param)), weight_decay=0.05,
                        weight_decay_mask_rule="timm", grad_clip_norm=5.0)
    train = build_classifier_steps(model, tx, mesh=mesh, num_classes=1000, accum_steps=accum, fsdp=fsdp,
                                   schedule=schedule, ema_decay=0.9998)
    rng = np.random.default_rng(0)
    local = batch // jax.process_count()
    host = {"image": rng.integers(0, 256, (local, image_size, image_size, 3), dtype=np.uint8),
            "label": rng.integers(0, 1000, local).astype(np.int32)}
    device_batch = shd.host_local_batch_to_global(host, mesh)
    state = train.state
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        state, metrics = train.train_step(state, device_batch)
    jax.block_until_ready(metrics)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(timed):
        state, metrics = train.train_step(state, device_batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - t0
    return {"size": size, "devices": jax.device_count(), "batch": batch, "image": image_size, "dtype": dtype,
            "warmup_s": warm, "step_s": elapsed / timed, "images_per_s": batch * timed / elapsed}


def time_pipeline(*, batch: int, image_size: int, batches: int, workers: int, root: str | None,
                  tfds_dir: str | None) -> dict:
    from rwkvunet_jax.data import imagenet
    from rwkvunet_jax.data.pipeline import train_iterator

    if tfds_dir:
        source = imagenet.TfdsSource("imagenet2012", split="train", data_dir=tfds_dir)
    else:
        if not root:
            root = str(Path(tempfile.mkdtemp(prefix="fake_imagenet_")))
            imagenet.write_fake_imagefolder(root, num_classes=10, train_per_class=max(8, batch * (batches + 2) // 10),
                                            val_per_class=1, min_size=300, max_size=500)
        source = imagenet.ImageFolderSource(Path(root) / "train")
    it = train_iterator(source, imagenet.TrainTransform(image_size), batch_size=batch, seed=0, worker_count=workers,
                        read_threads=max(2, workers), prefetch_buffer_size=max(2, workers))
    next(it)  # worker start-up
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    return {"source": repr(source), "workers": workers, "batch": batch, "image": image_size,
            "images_per_s": batch * batches / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["t", "s", "b"], choices=["t", "s", "b"])
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: 8 per device)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (include compilation)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation micro-batches")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state over all devices")
    parser.add_argument("--pipeline-only", action="store_true")
    parser.add_argument("--step-only", action="store_true")
    parser.add_argument("--workers", type=int, default=-1, help="grain worker processes (-1: cores - 2)")
    parser.add_argument("--pipeline-batches", type=int, default=10)
    parser.add_argument("--root", default=None, help="ImageFolder root with train/ (default: generated JPEGs)")
    parser.add_argument("--tfds-dir", default=None, help="tfds data_dir holding imagenet2012 as ArrayRecord")
    args = parser.parse_args()

    import jax

    from rwkvunet_jax.data.pipeline import auto_worker_count

    batch = args.batch or 8 * jax.device_count()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    if not args.pipeline_only:
        print(f"\ntrain step (AdamW, EMA, label smoothing; accum {args.accum}, fsdp {args.fsdp})")
        print(f"{'size':>4} {'batch':>6} {'image':>5} {'dtype':>9} {'compile+warmup s':>17} {'step s':>8} "
              f"{'images/s':>9}")
        for size in args.sizes:
            r = time_train_step(size, batch=batch, image_size=args.image_size, timed=max(1, args.steps),
                                warmup=args.warmup, dtype=args.dtype, accum=args.accum, fsdp=args.fsdp)
            print(f"{r['size']:>4} {r['batch']:>6} {r['image']:>5} {r['dtype']:>9} {r['warmup_s']:>17.1f} "
                  f"{r['step_s']:>8.3f} {r['images_per_s']:>9.1f}", flush=True)
    if not args.step_only:
        workers = auto_worker_count(args.workers)
        r = time_pipeline(batch=batch, image_size=args.image_size, batches=args.pipeline_batches, workers=workers,
                          root=args.root, tfds_dir=args.tfds_dir)
        print("\ninput pipeline (decode, random resized crop, flip, RandAugment m9) per host")
        print(f"{'workers':>7} {'batch':>6} {'image':>5} {'images/s':>9}  source")
        print(f"{r['workers']:>7} {r['batch']:>6} {r['image']:>5} {r['images_per_s']:>9.1f}  {r['source']}")


if __name__ == "__main__":
    main()
