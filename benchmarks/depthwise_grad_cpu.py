"""Depth-wise convolution gradients on XLA:CPU: lax.conv (feature_group_count=C) vs a sum of shifted slices.

Why: fine-tuning RWKV-UNet-T on the CPU (the demo) spends most of each step in the backward pass of the
encoder's stride-2 depth-wise 5x5 convolutions (the first block of every stage); XLA:CPU lowers their input
gradient (a grouped, lhs-dilated convolution) to a slow generic loop. Prints seconds per call (mean of 5,
after compilation) for the shapes of RWKV-UNet-T at 64x64, batch 8.

    python benchmarks/depthwise_grad_cpu.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# (input side, channels, kernel, stride): stage-1/2 first blocks, the stem, a decoder 9x9.
SHAPES = [(64, 96, 5, 2), (32, 120, 5, 2), (64, 3, 5, 1), (64, 24, 9, 1)]
BATCH = 8


def _time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def lax_depthwise(x, w, stride):
    k = w.shape[0]
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(k // 2, k // 2)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def shifted_depthwise(x, w, stride):
    k, size = w.shape[0], x.shape[1]
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    out = 0.0
    for i in range(k):
        for j in range(k):
            out = out + padded[:, i:i + size:stride, j:j + size:stride, :] * w[i, j, 0]
    return out


def main() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {BATCH}, seconds per call")
    print(f"{'shape (HxW, C, k, stride)':<28}{'lax fwd':>10}{'lax grad':>10}{'shift fwd':>11}{'shift grad':>12}")
    for size, channels, k, stride in SHAPES:
        x = jnp.ones((BATCH, size, size, channels))
        w = jnp.full((k, k, 1, channels), 0.01)
        row = []
        for impl in (lax_depthwise, shifted_depthwise):
            def loss(x, w, impl=impl):
                return impl(x, w, stride).sum()

            row += [_time(jax.jit(loss), x, w), _time(jax.jit(jax.grad(loss, argnums=(0, 1))), x, w)]
        label = f"{size}x{size}, {channels}, {k}, {stride}"
        print(f"{label:<28}{row[0]:>10.4f}{row[1]:>10.4f}{row[2]:>11.4f}{row[3]:>12.4f}")


if __name__ == "__main__":
    main()
