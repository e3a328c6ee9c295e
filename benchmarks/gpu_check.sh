#!/usr/bin/env bash
# GPU check of the Pallas bi-WKV kernel (kernels/bi_wkv.py), meant for a one-GPU machine; a few minutes.
#
#   bash benchmarks/gpu_check.sh                  # from a copy of the repository (no install needed)
#   bash benchmarks/gpu_check.sh --peak-tbps 3.35 # device peak memory bandwidth if not an H100/H200
#   bash benchmarks/gpu_check.sh --smoke          # tiny shapes (CPU: interpret mode), checks the script itself
#
# 1. runs the kernel tests compiled (`pytest -m gpu tests/test_kernel.py`; skipped with a note when pytest
#    is missing), plus a direct comparison of every implementation with the scan at the benchmark shapes;
# 2. prints forward and forward+backward times of every implementation of rwkvunet_jax.wkv.IMPLS but
#    auto/naive (scan, pallas, chunked where present) for (B, T, C) = (24, 784, 576), (24, 3136, 144) and
#    (2, 16384, 576) in float32, with the achieved bandwidth of the nominal bytes (forward: k, v in + y out;
#    forward+backward adds k, v, g in + dk, dv out) as a fraction of the device's peak;
# 3. prints rwkv_unet_b train-step images/s at 224 (batch 24, AdamW, cross-entropy) with each implementation.
#
# Budget: well under 10 minutes on one H100/H200, Triton and XLA compiles included.
#
# Needs jax (0.10.x or 0.11.x) with a GPU, flax and optax; not grain, ml-collections or tfds. The repository
# is used as a plain working tree: the Python below puts it on sys.path and registers the top-level
# kernels/ folder as the package rwkvunet_jax.kernels (what pyproject's package-dir mapping does for an
# installed copy), so nothing is installed and no top-level `kernels` package is ever imported.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
exec "${PYTHON:-python3}" - "$repo" "$@" <<'PY'
import argparse
import importlib.util
import statistics
import sys
import time

repo = sys.argv[1]
parser = argparse.ArgumentParser(prog="gpu_check.sh")
parser.add_argument("--peak-tbps", type=float, default=None, help="device peak memory bandwidth in TB/s")
parser.add_argument("--smoke", action="store_true", help="tiny shapes and model (to test the script on CPU)")
parser.add_argument("--skip-tests", action="store_true")
parser.add_argument("--skip-train", action="store_true")
args = parser.parse_args(sys.argv[2:])

sys.path.insert(0, repo)
import rwkvunet_jax  # noqa: E402

if importlib.util.find_spec("rwkvunet_jax.kernels") is None:
    spec = importlib.util.spec_from_file_location(
        "rwkvunet_jax.kernels", f"{repo}/kernels/__init__.py", submodule_search_locations=[f"{repo}/kernels"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rwkvunet_jax.kernels = module

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rwkvunet_jax.kernels.bi_wkv import plan_summary  # noqa: E402
from rwkvunet_jax.wkv import IMPLS, bi_wkv, resolve_impl  # noqa: E402

device = jax.devices()[0]
kind = device.device_kind
PEAKS = [("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100-SXM4-80GB", 2.04),
         ("A100 80GB", 2.04), ("A100", 1.555)]
peak = args.peak_tbps
if peak is None:
    peak = next((tbps for name, tbps in PEAKS if name.lower() in kind.lower()), None)
print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {kind!r}, Python {sys.version.split()[0]}; "
      f"impl='auto' -> {resolve_impl('auto')}; peak bandwidth "
      + (f"{peak} TB/s" if peak else "unknown (pass --peak-tbps)"), flush=True)
on_gpu = jax.default_backend() == "gpu"
if not on_gpu and not args.smoke:
    sys.exit("gpu_check: no GPU backend (use --smoke to test the script on CPU)")


def section(title):
    print(f"\n== {title}", flush=True)


# --------------------------------------------------------------------------------------------- 1. tests
section("kernel tests, compiled")
if args.skip_tests:
    print("skipped (--skip-tests)")
elif importlib.util.find_spec("pytest") is None:
    print("pytest is not installed here: skipped; the comparison with the scan below still runs")
else:
    import pytest

    code = pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", f"{repo}/tests/test_kernel.py"])
    print(f"pytest -m gpu tests/test_kernel.py: exit code {int(code)}", flush=True)

SHAPES = [(24, 784, 576), (24, 3136, 144), (2, 16384, 576)]
if args.smoke:
    SHAPES = [(2, 50, 40), (1, 70, 24)]
DTYPES = [jnp.float32]
# Every linear-time implementation this checkout has (the first is the reference of the comparison).
TIMED = [impl for impl in IMPLS if impl not in ("auto", "naive")]


def inputs(shape, dtype, seed=0):
    batch, tokens, channels = shape
    rng = np.random.default_rng(seed)
    # The models pass w = spatial_decay / T and u = spatial_first / T with O(1) learned vectors.
    w = jnp.asarray(rng.uniform(-1.0, 3.0, channels) / tokens, jnp.float32)
    u = jnp.asarray(rng.normal(size=channels) / tokens, jnp.float32)
    k, v, g = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    return w, u, k, v, g


def functions(impl):
    def forward(w, u, k, v, g):
        return bi_wkv(w, u, k, v, impl=impl)

    def forward_backward(w, u, k, v, g):
        y, vjp = jax.vjp(lambda *a: bi_wkv(*a, impl=impl), w, u, k, v)
        return y, vjp(g)

    return jax.jit(forward), jax.jit(forward_backward)


section(f"{', '.join(TIMED[1:])} vs {TIMED[0]} at the benchmark shapes (max |difference| / max |{TIMED[0]}|)")
for shape in SHAPES:
    for dtype in DTYPES:
        data = inputs(shape, dtype, seed=1)
        y_s, g_s = functions(TIMED[0])[1](*data)
        for impl in TIMED[1:]:
            y_p, g_p = functions(impl)[1](*data)
            rel = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                         / max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))), 1e-30))
                   for a, b in zip((y_p, *g_p), (y_s, *g_s))]
            print(f"{str(shape):<18}{jnp.dtype(dtype).name:<9}{impl:<9} y {rel[0]:.1e}  dw {rel[1]:.1e}  "
                  f"du {rel[2]:.1e}  dk {rel[3]:.1e}  dv {rel[4]:.1e}", flush=True)


# ------------------------------------------------------------------------------------------- 2. timings
def timed(fn, data, min_seconds=0.3):
    """Median seconds per call over 5 repeats of back-to-back calls (after compile and warm-up)."""
    jax.block_until_ready(fn(*data))
    start = time.perf_counter()
    jax.block_until_ready(fn(*data))
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, min(200, int(min_seconds / once)))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*data)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


section("bi_wkv times (official variant); bandwidth = nominal bytes / time, fraction of peak")
print(f"{'(B, T, C)':<18}{'dtype':<9}{'pass':<9}{'impl':<9}{'ms':>9}{'vs ' + TIMED[0]:>9}{'TB/s':>8}{'of peak':>9}",
      flush=True)
for shape in SHAPES:
    for dtype in DTYPES:
        data = inputs(shape, dtype)
        fns = {impl: functions(impl) for impl in TIMED}
        elements = shape[0] * shape[1] * shape[2] * jnp.dtype(dtype).itemsize
        for name, index, nominal in (("fwd", 0, 3 * elements), ("fwd+bwd", 1, 8 * elements)):
            times = {impl: timed(fns[impl][index], data) for impl in TIMED}
            for impl, seconds in times.items():
                tbps = nominal / seconds / 1e12
                frac = f"{tbps / peak:>8.0%}" if peak else f"{'n/a':>8}"
                print(f"{str(shape):<18}{jnp.dtype(dtype).name:<9}{name:<9}{impl:<9}{1e3 * seconds:>9.3f}"
                      f"{times[TIMED[0]] / seconds:>8.2f}x{tbps:>8.2f} {frac}", flush=True)
for tokens, channels in ((784, 576), (3136, 144), (16384, 576)):
    print(f"kernel plan at (T, C) = ({tokens}, {channels}):", plan_summary(tokens, channels))


# ---------------------------------------------------------------------------------------- 3. train step
section("rwkv_unet_b train step (batch 24, 224x224x1, 9 classes, AdamW, cross-entropy, float32)")
if args.skip_train:
    print("skipped (--skip-train)")
else:
    import optax
    from flax import nnx

    batch, size, name, extra = 24, 224, "rwkv_unet_b", {}
    if args.smoke:
        batch, size, extra = 2, 32, dict(depths=(1, 1, 2, 2), widths=(8, 16, 16, 32))

    def train_step_rate(impl):
        model = rwkvunet_jax.create_model(name, num_classes=9, in_chans=1, wkv_impl=impl, **extra)
        graphdef, state = nnx.split(model)
        tx = optax.adamw(1e-3, weight_decay=1e-3)
        opt_state = tx.init(nnx.state(model, nnx.Param))

        @jax.jit
        def step(state, opt_state, x, y):
            model = nnx.merge(graphdef, state)

            def loss_fn(model):
                logits = model(x)
                return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)  # w.r.t. nnx.Param; BatchNorm stats update
            params = nnx.state(model, nnx.Param)
            updates, opt_state = tx.update(grads, opt_state, params)
            nnx.update(model, optax.apply_updates(params, updates))
            return nnx.state(model), opt_state, loss

        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.uniform(size=(batch, size, size, 1)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 9, size=(batch, size, size)), jnp.int32)
        start = time.perf_counter()
        state = (state, opt_state)
        for _ in range(2):  # compile + warm-up
            *state, loss = step(*state, x, y)
        jax.block_until_ready(loss)
        compile_s = time.perf_counter() - start
        steps = 3 if args.smoke else 10
        start = time.perf_counter()
        for _ in range(steps):
            *state, loss = step(*state, x, y)
        jax.block_until_ready(loss)
        seconds = time.perf_counter() - start
        return batch * steps / seconds, 1e3 * seconds / steps, compile_s, float(loss)

    print(f"{'wkv_impl':<10}{'images/s':>10}{'ms/step':>10}{'compile+warm-up s':>19}{'loss':>9}", flush=True)
    for impl in TIMED:
        rate, ms, compile_s, loss = train_step_rate(impl)
        print(f"{impl:<10}{rate:>10.1f}{ms:>10.1f}{compile_s:>19.1f}{loss:>9.4f}", flush=True)
print("\ngpu_check: done", flush=True)
PY
