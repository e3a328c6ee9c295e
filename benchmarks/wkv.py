"""Time and memory of the bidirectional WKV implementations (naive, scan, chunked, pallas) over sequence length.

    python benchmarks/wkv.py                                  # C=576, B=1, T in 196 784 3136 12544
    python benchmarks/wkv.py --impls scan,pallas --batch 8 --dtype bfloat16
    python benchmarks/wkv.py --impls scan,chunked              # the chunked form against the scan

For each implementation, T, and pass (forward; forward+backward = grads of w, u, k, v through a vector-
Jacobian product), it prints the median wall time of ``--runs`` runs (more, up to 50, while they take under a second in
total) after one warm-up run (compile time
is shown separately) and the memory XLA plans for the compiled program: argument + output + temporary
bytes from ``compiled.memory_analysis()`` (buffer sizes, not a measured process peak), and the longest
sequential loop: the largest trip count of a while loop in the compiled HLO (scan: T; chunked: the tile length
or log2 of the tile count, whichever is larger; "?" if XLA does not know a loop's count). On CPU the Pallas
row runs in Pallas interpret mode and is labelled so; its times say nothing about the compiled kernel.

The naive O(T^2) reference evaluates its dense table in blocks, so its memory stays bounded, but its work
grows as B*T^2*C: a row is skipped when the time extrapolated from the previous T (x (T/T_prev)^2)
exceeds ``--max-seconds``, and the message also gives the size of the unblocked (B, T, T, C) table.
A second table gives the scan's time ratio t(T)/t(196) next to T/196, and its time per token, to show
linear growth. On CPU the per-token cost steps up once the scan's arrays (~12 x T x C floats) outgrow the
last-level cache, then stays flat. With both scan and chunked measured, a third table gives chunked / scan.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rwkvunet_jax.wkv import bi_wkv, resolve_impl

GIB = 1 << 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", default="naive,scan,chunked,pallas",
                        help="comma-separated subset of naive,scan,chunked,pallas")
    parser.add_argument("--tokens", default="196,784,3136,12544", help="comma-separated sequence lengths T")
    parser.add_argument("--channels", type=int, default=576)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--variant", choices=("official", "paper"), default="official")
    parser.add_argument("--runs", type=int, default=5,
                        help="minimum timed runs after the warm-up (median reported; fast cases run up to 50)")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip a naive measurement whose extrapolated run time exceeds this")
    return parser.parse_args(argv)


def make_inputs(batch: int, tokens: int, channels: int, dtype) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(0)
    # The models pass w = spatial_decay / T and u = spatial_first / T with O(1) learned vectors.
    w = jnp.asarray(rng.uniform(-1.0, 3.0, channels) / tokens, jnp.float32)
    u = jnp.asarray(rng.normal(size=channels) / tokens, jnp.float32)
    k, v, g = (jnp.asarray(rng.normal(size=(batch, tokens, channels)), dtype) for _ in range(3))
    return w, u, k, v, g


def build(impl: str, variant: str, backward: bool):
    def forward(w, u, k, v, g):
        return bi_wkv(w, u, k, v, impl=impl, variant=variant)

    def forward_backward(w, u, k, v, g):
        y, vjp = jax.vjp(lambda *a: bi_wkv(*a, impl=impl, variant=variant), w, u, k, v)
        return y, vjp(g)

    return jax.jit(forward_backward if backward else forward)


def while_trip_counts(hlo_text: str) -> list[int | None]:
    """Trip count of every while loop of a compiled HLO module's text (None where XLA does not know it)."""
    counts = []
    for line in hlo_text.splitlines():
        if re.search(r"\swhile\(", line):
            found = re.search(r'known_trip_count[^0-9]*?"n"\s*:\s*"?(\d+)', line)
            counts.append(int(found.group(1)) if found else None)
    return counts


def longest_loop(counts: list[int | None]) -> str:
    if not counts:
        return "none"
    return "?" if None in counts else str(max(counts))


def measure(fn, args, runs: int) -> dict:
    """Compile, warm up, then time ``runs`` calls; memory from the compiled program's buffer plan."""
    start = time.perf_counter()
    compiled = fn.trace(*args).lower().compile()
    loop = longest_loop(while_trip_counts(compiled.as_text()))
    stats = compiled.memory_analysis()
    memory = None
    if stats is not None:
        memory = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        memory -= stats.alias_size_in_bytes
    jax.block_until_ready(compiled(*args))
    compile_s = time.perf_counter() - start
    times = []
    # At least `runs` runs, more (up to 50) while under a second in total: steadier medians for fast cases.
    while len(times) < runs or (sum(times) < 1.0 and len(times) < 50):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return dict(ms=1e3 * statistics.median(times), compile_s=compile_s, memory=memory, loop=loop)


def format_bytes(num: int | None) -> str:
    if num is None:
        return "n/a"
    return f"{num / GIB:.2f} GiB" if num >= GIB else f"{num / (1 << 20):.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = sorted(set(impls) - {"naive", "scan", "chunked", "pallas"})
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from naive, scan, chunked, pallas")
    token_list = [int(t) for t in args.tokens.split(",")]
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()} ({device.device_kind}), "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}; impl='auto' -> {resolve_impl('auto')}")
    print(f"bi_wkv variant={args.variant}, B={args.batch}, C={args.channels}, {args.dtype}; "
          f"median of >= {args.runs} runs after warm-up; memory = XLA buffer plan (arguments + outputs + temporaries)")

    if "pallas" in impls:
        try:
            import rwkvunet_jax.kernels.bi_wkv  # noqa: F401
        except ImportError as err:
            print(f"pallas: not available ({err}); rows dropped")
            impls.remove("pallas")
    label = {"naive": "naive", "scan": "scan", "chunked": "chunked",
             "pallas": "pallas" if jax.default_backend() == "gpu" else "pallas (interpret)"}

    header = f"{'impl':<19}{'T':>7}  {'pass':<9}{'time ms':>11}{'compile s':>11}{'memory':>12}{'loop':>8}"
    print(header)
    print("-" * len(header))
    times_ms: dict[tuple[str, int, str], float] = {}
    for impl in impls:
        previous: dict[str, tuple[int, float]] = {}
        for tokens in token_list:
            inputs = make_inputs(args.batch, tokens, args.channels, dtype)
            for name, backward in (("fwd", False), ("fwd+bwd", True)):
                row = f"{label[impl]:<19}{tokens:>7}  {name:<9}"
                if impl == "naive" and name in previous:
                    prev_tokens, prev_s = previous[name]
                    estimate = prev_s * (tokens / prev_tokens) ** 2 * (args.runs + 2)
                    if estimate > args.max_seconds:
                        dense = args.batch * tokens * tokens * args.channels * 4
                        print(f"{row}skipped: needs ~{estimate / 60:.0f} min (O(T^2) work); the unblocked "
                              f"(B,T,T,C) float32 table alone would need ~{dense / GIB:.0f} GiB")
                        continue
                result = measure(build(impl, args.variant, backward), inputs, args.runs)
                previous[name] = (tokens, result["ms"] / 1e3)
                times_ms[impl, tokens, name] = result["ms"]
                print(f"{row}{result['ms']:>11.1f}{result['compile_s']:>11.1f}{format_bytes(result['memory']):>12}"
                      f"{result['loop']:>8}")
                sys.stdout.flush()

    base = token_list[0]
    if "scan" in impls and len(token_list) > 1:
        print(f"\nscan time relative to T={base} (linear growth: ratio ~ T/{base}; per-token cost flat)")
        print(f"{'T':>7}{'T/' + str(base):>9}{'fwd':>9}{'fwd+bwd':>9}{'fwd us/token':>15}{'fwd+bwd us/token':>19}")
        for tokens in token_list:
            ratios = [times_ms["scan", tokens, p] / times_ms["scan", base, p] for p in ("fwd", "fwd+bwd")]
            per_token = [1e3 * times_ms["scan", tokens, p] / tokens for p in ("fwd", "fwd+bwd")]
            print(f"{tokens:>7}{tokens / base:>9.1f}{ratios[0]:>9.1f}{ratios[1]:>9.1f}"
                  f"{per_token[0]:>15.2f}{per_token[1]:>19.2f}")
    if "scan" in impls and "chunked" in impls:
        print("\nchunked time / scan time (below 1: chunked faster)")
        print(f"{'T':>7}{'fwd':>9}{'fwd+bwd':>9}")
        for tokens in token_list:
            ratios = [times_ms["chunked", tokens, p] / times_ms["scan", tokens, p] for p in ("fwd", "fwd+bwd")]
            print(f"{tokens:>7}{ratios[0]:>9.2f}{ratios[1]:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
