"""Depth-wise convolutions on the CPU: lax.conv vs our shifted-slice path vs PyTorch, forward and gradient.

Why: XLA:CPU runs ``lax.conv_general_dilated(feature_group_count=C)`` with one channel per group through
generic code. Before ``rwkvunet_jax.models.depthwise`` the depth-wise convolutions and their gradients took
most of an RWKV-UNet training step on the CPU. Prints milliseconds per call (best of ``--repeats``, after
compilation) for the depth-wise shapes of RWKV-UNet-T at 224 (decoder 9x9, encoder 5x5, stride 1 and 2),
batch 4, and the speed-up of ours over lax and over PyTorch (``torch`` optional: its columns are skipped
when it is not installed). "grad" is the gradient of a scalar loss with respect to input and kernel.

    python benchmarks/depthwise_grad_cpu.py
    python benchmarks/depthwise_grad_cpu.py --batch 8 --repeats 10
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

from rwkvunet_jax.models.depthwise import depthwise_conv2d

# (input side, channels, kernel, stride)
SHAPES = [(224, 24, 9, 1), (112, 64, 9, 1), (56, 96, 9, 1), (112, 64, 5, 1), (112, 64, 5, 2), (56, 120, 5, 1),
          (28, 288, 5, 1), (14, 560, 5, 1)]


def _best_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def _padding(k: int, stride: int) -> int:
    return -(-(k - stride) // 2)  # the official ceil((k - s) / 2)


def lax_depthwise(x, kernel, stride):
    pad = _padding(kernel.shape[0], stride)
    return jax.lax.conv_general_dilated(x, kernel[:, :, None, :], (stride, stride), [(pad, pad)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def ours_depthwise(x, kernel, stride):
    pad = _padding(kernel.shape[0], stride)
    return depthwise_conv2d(x, kernel, stride, ((pad, pad), (pad, pad)))


def _jax_times(impl, x, kernel, stride, probe, repeats):
    forward = jax.jit(lambda x, w: impl(x, w, stride))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(impl(x, w, stride) * probe), argnums=(0, 1)))
    return _best_ms(forward, x, kernel, repeats=repeats), _best_ms(grad, x, kernel, repeats=repeats)


def _torch_times(x, kernel, stride, probe, repeats):
    import torch

    x_t = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    w_t = torch.from_numpy(np.array(kernel)).permute(2, 0, 1)[:, None].contiguous().requires_grad_(True)
    probe_t = torch.from_numpy(np.array(probe)).permute(0, 3, 1, 2).contiguous()
    pad = _padding(kernel.shape[0], stride)

    def forward():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x_t, w_t, stride=stride, padding=pad, groups=x_t.shape[1])

    def grad():
        y = torch.nn.functional.conv2d(x_t, w_t, stride=stride, padding=pad, groups=x_t.shape[1])
        return torch.autograd.grad((y * probe_t).sum(), (x_t, w_t))

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * min(times)

    return best(forward), best(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    have_torch = importlib.util.find_spec("torch") is not None
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}, ms per call (best of "
          f"{args.repeats}); speed-up = other / ours")
    header = f"{'HxW, C, k, stride':<22}{'lax fwd':>9}{'ours fwd':>9}{'lax grad':>9}{'ours grad':>10}{'vs lax':>13}"
    if have_torch:
        header += f"{'torch fwd':>10}{'torch grad':>11}{'vs torch':>13}"
    print(header)
    rng = np.random.default_rng(0)
    for size, channels, k, stride in SHAPES:
        x = jnp.asarray(rng.standard_normal((args.batch, size, size, channels), np.float32))
        kernel = jnp.asarray(rng.standard_normal((k, k, channels), np.float32) / k)
        out_size = (size + 2 * _padding(k, stride) - k) // stride + 1
        probe = jnp.asarray(rng.standard_normal((args.batch, out_size, out_size, channels), np.float32))
        lax_f, lax_g = _jax_times(lax_depthwise, x, kernel, stride, probe, args.repeats)
        our_f, our_g = _jax_times(ours_depthwise, x, kernel, stride, probe, args.repeats)
        line = (f"{f'{size}x{size}, {channels}, {k}, {stride}':<22}{lax_f:>9.1f}{our_f:>9.1f}{lax_g:>9.1f}{our_g:>10.1f}"
                f"{f'{lax_f / our_f:.1f}x/{lax_g / our_g:.1f}x':>13}")
        if have_torch:
            t_f, t_g = _torch_times(x, kernel, stride, probe, args.repeats)
            line += f"{t_f:>10.1f}{t_g:>11.1f}{f'{t_f / our_f:.2f}x/{t_g / our_g:.2f}x':>13}"
        print(line)


if __name__ == "__main__":
    main()
