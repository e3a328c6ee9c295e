"""Throughput of the JAX models (jit) and their PyTorch twins on CPU, with the same weights.

For each size: images/s of the forward pass (eval mode) and of forward+backward (train mode:
BatchNorm batch statistics, drop path; gradients of a cross-entropy loss with respect to all
parameters, no optimizer step), the JAX/PyTorch ratio, and the max |logit difference| in eval mode
as a check that both run the same weights. The PyTorch twin's bidirectional WKV is
``rwkvunet_jax.torch_reference.wkv.bi_wkv`` (float64 recurrences, Python loop over the positions
of a chunk); its share of the PyTorch forward time is printed too. JAX compile time is excluded
from the throughput and printed separately. Times are the best of ``--repeats`` runs.

    python benchmarks/torch_vs_jax.py                       # T, S, B at 224, batch 4
    python benchmarks/torch_vs_jax.py --sizes t --repeats 5 --img-size 256
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import rwkvunet_jax
import rwkvunet_jax.torch_reference.layers as torch_layers
from rwkvunet_jax.convert import export_torch_state_dict
from rwkvunet_jax.torch_reference import build_torch_model

NUM_CLASSES = 9


def _best_seconds(fn, repeats: int) -> float:
    # The minimum, as timeit recommends: on a shared CPU the slower runs measure the neighbours.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_size(size: str, *, batch: int, img: int, repeats: int) -> dict[str, float]:
    name = f"rwkv_unet_{size}"
    in_chans = 3 if size == "t" else 1  # as the official models take them
    model = rwkvunet_jax.create_model(name, num_classes=NUM_CLASSES, in_chans=in_chans, seed=0)
    module = build_torch_model(name, num_classes=NUM_CLASSES, in_chans=in_chans)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in export_torch_state_dict(model).items()}, strict=True)

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, img, img, in_chans)).astype(np.float32)
    labels_np = rng.integers(0, NUM_CLASSES, (batch, img, img))
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np)
    x_t = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous()
    labels_t = torch.from_numpy(labels_np)

    # ---- JAX, jitted over the model's pure state as the trainers run it (nnx.jit would re-walk the module
    # graph in Python on every call).
    model.eval()
    eval_graph, eval_params, eval_rest = nnx.split(model, nnx.Param, ...)
    model.train()
    train_graph, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def forward(params, rest, inputs):
        return nnx.merge(eval_graph, params, rest, copy=True)(inputs)

    def loss_fn(params, rest, inputs, targets):
        logits = nnx.merge(train_graph, params, rest, copy=True)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    grad_step = jax.jit(jax.grad(loss_fn))
    start = time.perf_counter()
    jax_logits = np.asarray(jax.block_until_ready(forward(eval_params, eval_rest, x)))
    compile_fwd = time.perf_counter() - start
    t_jax_fwd = _best_seconds(lambda: jax.block_until_ready(forward(eval_params, eval_rest, x)), repeats)
    start = time.perf_counter()
    jax.block_until_ready(grad_step(params, rest, x, labels))
    compile_bwd = time.perf_counter() - start
    t_jax_bwd = _best_seconds(lambda: jax.block_until_ready(grad_step(params, rest, x, labels)), repeats)

    # ---- PyTorch
    module.eval()
    with torch.no_grad():
        torch_logits = module(x_t).permute(0, 2, 3, 1).numpy()
        wkv_time = [0.0]
        plain_wkv = torch_layers.bi_wkv

        def timed_wkv(*args, **kwargs):
            start = time.perf_counter()
            out = plain_wkv(*args, **kwargs)
            wkv_time[0] += time.perf_counter() - start
            return out

        torch_layers.bi_wkv = timed_wkv
        try:
            t_torch_fwd = _best_seconds(lambda: module(x_t), repeats)
            # WKV share of one more forward pass, timed as a whole.
            wkv_time[0] = 0.0
            start = time.perf_counter()
            module(x_t)
            wkv_share = wkv_time[0] / (time.perf_counter() - start)
        finally:
            torch_layers.bi_wkv = plain_wkv

    module.train()

    def torch_step():
        module.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(x_t), labels_t).backward()

    torch_step()  # warm-up (allocators, oneDNN primitives)
    t_torch_bwd = _best_seconds(torch_step, repeats)

    return {
        "jax_fwd": batch / t_jax_fwd, "torch_fwd": batch / t_torch_fwd,
        "jax_bwd": batch / t_jax_bwd, "torch_bwd": batch / t_torch_bwd,
        "compile_fwd": compile_fwd, "compile_bwd": compile_bwd, "wkv_share": wkv_share,
        "max_diff": float(np.abs(jax_logits - torch_logits).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["t", "s", "b"], choices=["t", "s", "b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"CPU, batch {args.batch}, {args.img_size}x{args.img_size}, fp32, best of {args.repeats}; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    header = ("size", "JAX fwd", "torch fwd", "ratio", "JAX fwd+bwd", "torch fwd+bwd", "ratio",
              "torch WKV share", "JAX compile fwd/bwd", "max |dlogit|")
    rows = []
    for size in args.sizes:
        r = bench_size(size, batch=args.batch, img=args.img_size, repeats=args.repeats)
        rows.append((size.upper(), f"{r['jax_fwd']:.2f}", f"{r['torch_fwd']:.2f}", f"{r['jax_fwd'] / r['torch_fwd']:.2f}x",
                     f"{r['jax_bwd']:.2f}", f"{r['torch_bwd']:.2f}", f"{r['jax_bwd'] / r['torch_bwd']:.2f}x",
                     f"{100 * r['wkv_share']:.0f}%", f"{r['compile_fwd']:.0f} s / {r['compile_bwd']:.0f} s",
                     f"{r['max_diff']:.1e}"))
        print(f"  done {size.upper()}", flush=True)
    print("\nimages/s (higher is better); ratio = JAX / PyTorch\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
