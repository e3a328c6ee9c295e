"""What the Pallas GPU bi-WKV kernel compiles to, measured on a machine without a GPU.

Lowers ``bi_wkv_pallas`` (forward, and the gradient through its custom VJP) for CUDA on the CPU, captures the
Triton IR of every ``pallas_call`` as JAX's Pallas-Triton lowering emits it, compiles each module for sm_90 with
the pip ``triton`` wheel (its bundled ptxas and cuobjdump), and prints per kernel: grid, warps, registers,
spills, shared memory, static SASS instructions, MUFU.EX2 (hardware exp2) count, instructions and exps per
token and channel, and Triton's compile time (CPU seconds of the compiler and ptxas, which a busy machine
does not inflate the way it inflates wall-clock time). With ``--model`` it also finds the distinct WKV shapes of
``rwkv_unet_b`` at 224 and 512 and totals their compile time (what a training run waits for).

Setup, once (about 1 GB; never part of CI or the project's install). jax 0.10.2 emits Triton IR that the
triton 3.8 wheel parses::

    python3 -m venv /tmp/triton-venv && /tmp/triton-venv/bin/pip install triton==3.8.0

Run from the project's venv (jax installed; no GPU needed)::

    python benchmarks/kernel_report.py                         # (24, 784, 576) float32, official
    python benchmarks/kernel_report.py --compare cd26de8       # old kernel of that commit side by side
    python benchmarks/kernel_report.py --model                 # + rwkv_unet_b's WKV shapes at 224 and 512
    python benchmarks/kernel_report.py --shapes                # + gpu_check's (24, 3136, 144), (2, 16384, 576)

Normalisation: a kernel's dynamic instruction count per thread is its static SASS count, with the body of
each loop counted as many times as the loop runs (trip counts read from the constant bounds of the Triton
IR's ``scf.for``); "per token" multiplies that by the launched threads (grid x warps x 32) and divides by
the B * T * C elements of the operator, so masked lanes and padding rows count against the kernel. "fwd" is
the forward pass alone; "fwd+bwd" adds the kernels the gradient runs (the gradient's own forward kernels
included once). MUFU.EX2 is the hardware exponential that every exp/exp2 ends in.

"floor" is the fewest registers (to a multiple of 8) with which ptxas compiles the same PTX without spilling,
found by recompiling it under a ``.maxnreg`` cap: "regs" above "floor" is registers that ptxas's own schedule
takes without needing them (Pallas's Triton backend exposes no register cap or launch bounds, so the kernels
cannot ask for the floor; their code can only leave ptxas less room to spread).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRITON_PYTHON = os.environ.get("TRITON_PYTHON", "/tmp/triton-venv/bin/python")

# The kernel before the rework of issue 11 (commit cd26de8), measured with this script at (24, 784, 576)
# float32 official. Compile times: issue 11's wall-clock seconds on two loaded cores (forward 18 / 55 / 163,
# backward 19 / 286 / 125), an upper bound of the CPU seconds this script now reports. Printed when
# --compare is not given.
BASELINE = {
    "ref": "cd26de8",
    # (combine kernels' loops counted with their trip counts: 7 and 13 steps of 8 tiles)
    "fwd": {"instr_per_token": 378.1, "exp_per_token": 14.2, "max_regs": 186, "max_compile_s": 163.0},
    "bwd": {"instr_per_token": 552.6, "exp_per_token": 16.4, "max_regs": 255, "max_compile_s": 286.0},
    "spills": 0,
    # forward 7 (o and D saved: 9), backward ~22 (issue 11's count)
    "traffic_training": 31.0,
}


# ------------------------------------------------------------------------------------------ 1. capture


def _register_kernels_package(tree: Path) -> None:
    """Make ``rwkvunet_jax`` and ``rwkvunet_jax.kernels`` import from ``tree`` (a plain checkout)."""
    import importlib.util

    sys.path.insert(0, str(tree))
    import rwkvunet_jax

    spec = importlib.util.spec_from_file_location(
        "rwkvunet_jax.kernels", tree / "kernels" / "__init__.py", submodule_search_locations=[str(tree / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rwkvunet_jax.kernels = module


class _Capture:
    """Records (name, grid, num_warps, num_stages, Triton IR text) of every pallas_call lowered for GPU."""

    def __init__(self):
        self.kernels: list[dict] = []

    def __enter__(self):
        from jax._src.interpreters import mlir
        from jax._src.pallas.triton import pallas_call_registration as reg

        self._reg, self._mlir = reg, mlir
        self._lower, self._custom_call = reg.lowering.lower_jaxpr_to_triton_module, mlir.custom_call
        pending: list[dict] = []

        def lower(*args, **kwargs):
            result = self._lower(*args, **kwargs)
            text = result.module.operation.get_asm(enable_debug_info=False)
            name = re.search(r"tt\.func public @([\w$]+)", text).group(1)
            pending.append({"name": name, "ttir": text})
            return result

        def custom_call(call_target_name, *args, **kwargs):
            if call_target_name == "__gpu$xla.gpu.triton" and pending:
                from jax._src.lib.mlir import ir

                config = kwargs.get("backend_config") or {}
                entry = pending.pop(0)
                for key in ("grid_x", "grid_y", "grid_z", "num_warps", "num_stages"):
                    entry[key] = int(ir.IntegerAttr(config[key]).value)
                self.kernels.append(entry)
            return self._custom_call(call_target_name, *args, **kwargs)

        reg.lowering.lower_jaxpr_to_triton_module = lower
        mlir.custom_call = custom_call
        return self

    def __exit__(self, *exc):
        self._reg.lowering.lower_jaxpr_to_triton_module = self._lower
        self._mlir.custom_call = self._custom_call


def capture_operator(batch: int, tokens: int, channels: int, variant: str, dtype: str,
                     tile_len: int | None = None) -> dict:
    """Triton modules of the forward and of the gradient of bi_wkv_pallas at one shape."""
    import jax
    import jax.numpy as jnp

    from rwkvunet_jax.kernels.bi_wkv import bi_wkv_pallas

    dt = jnp.dtype(dtype)
    args = (jax.ShapeDtypeStruct((channels,), jnp.float32), jax.ShapeDtypeStruct((channels,), jnp.float32),
            jax.ShapeDtypeStruct((batch, tokens, channels), dt), jax.ShapeDtypeStruct((batch, tokens, channels), dt))
    extra = {"tile_len": tile_len} if tile_len else {}
    fn = functools.partial(bi_wkv_pallas, variant=variant, interpret=False, **extra)
    grad = jax.grad(lambda w, u, k, v: jnp.sum(fn(w, u, k, v).astype(jnp.float32)), argnums=(0, 1, 2, 3))
    out = {}
    for what, f in (("fwd", fn), ("grad", grad)):
        with _Capture() as cap:
            jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
        out[what] = cap.kernels
    plan = getattr(sys.modules["rwkvunet_jax.kernels.bi_wkv"], "plan_summary", None)
    try:
        out["plan"] = plan(tokens, channels, batch=batch, **extra) if plan and variant == "official" else None
    except TypeError:  # older kernels: other arguments
        out["plan"] = None
    traffic = getattr(sys.modules["rwkvunet_jax.kernels.bi_wkv"], "traffic_summary", None)
    if traffic:
        try:
            out["traffic"] = traffic(tokens, channels, batch=batch, **extra)
        except TypeError:  # older kernels: no batch argument
            out["traffic"] = traffic(tokens, channels, **extra)
    else:
        out["traffic"] = None
    return out


def module_key(entry: dict) -> str:
    """A captured Triton module's identity (the same IR compiles to the same kernel)."""
    return hashlib.sha1(entry["ttir"].encode()).hexdigest()


def model_wkv_shapes(size: int) -> list[tuple[int, int]]:
    """Distinct (T, C) of the bi_wkv calls of rwkv_unet_b at size x size (traced abstractly, no compute)."""
    import jax
    import jax.numpy as jnp

    import rwkvunet_jax
    import rwkvunet_jax.wkv as wkv_module

    shapes: set[tuple[int, int]] = set()
    original = wkv_module.bi_wkv

    def record(w, u, k, v, **kwargs):
        shapes.add((int(k.shape[1]), int(k.shape[2])))
        return original(w, u, k, v, **{**kwargs, "impl": "scan"})

    wkv_module.bi_wkv = record
    try:
        model = rwkvunet_jax.create_model("rwkv_unet_b", num_classes=9, in_chans=1)
        model.eval()
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))
    finally:
        wkv_module.bi_wkv = original
    return sorted(shapes)


def capture_main(spec: dict) -> dict:
    if spec.get("tree"):
        _register_kernels_package(Path(spec["tree"]))
    else:
        sys.path.insert(0, str(REPO))
    result = {"operator": capture_operator(*spec["shape"], spec["variant"], spec["dtype"], spec.get("tile_len"))}
    if spec.get("model"):
        sizes = {}
        for size in (224, 512):
            shapes = model_wkv_shapes(size)
            modules = {}
            for tokens, channels in shapes:
                captured = capture_operator(1, tokens, channels, spec["variant"], "float32", spec.get("tile_len"))
                for entry in captured["fwd"] + captured["grad"]:
                    modules.setdefault(module_key(entry), entry)
            sizes[size] = {"shapes": shapes, "modules": list(modules.values())}
        result["model"] = sizes
    return result


def run_capture(tree: Path | None, args) -> dict:
    """Capture in a subprocess (so an old checkout's modules never mix with this tree's)."""
    spec = {"tree": str(tree) if tree else None, "shape": args.shape, "variant": args.variant,
            "dtype": args.dtype, "model": args.model, "tile_len": args.tile_len if tree is None else None}
    proc = subprocess.run([sys.executable, __file__, "--_capture", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode != 0:
        sys.exit(f"kernel_report: capture failed ({tree or REPO}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ 2. compile

_WORKER = r'''
import json, re, resource, subprocess, sys, time, os
import triton
from triton.backends.compiler import GPUTarget
path, warps, stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def cpu():
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime
start, start_cpu = time.perf_counter(), cpu()
kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
seconds, cpu_seconds = time.perf_counter() - start, cpu() - start_cpu
base = path[:-5]
open(base + ".ptx", "w").write(kernel.asm["ptx"])
open(base + ".cubin", "wb").write(kernel.asm["cubin"])
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
arch = re.search(r"\.target\s+(sm_\w+)", kernel.asm["ptx"]).group(1)
ptxas = subprocess.run([os.path.join(bindir, "ptxas"), "-v", "--gpu-name", arch, base + ".ptx", "-o", base + ".v.cubin"],
                       capture_output=True, text=True).stderr
sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", base + ".cubin"], capture_output=True, text=True).stdout
def spills_under(cap):
    # the PTX with a .maxnreg cap: what ptxas needs when told to stay under it
    ptx, n = re.subn(r"^(\.reqntid[^\n]*)$", rf"\1\n.maxnreg {cap}", kernel.asm["ptx"], count=1, flags=re.M)
    if n == 0:
        return None
    open(base + ".cap.ptx", "w").write(ptx)
    out = subprocess.run([os.path.join(bindir, "ptxas"), "-v", "--gpu-name", arch, base + ".cap.ptx", "-o", base + ".cap.cubin"],
                         capture_output=True, text=True).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return int(m.group(1)) + int(m.group(2)) if m else 0
used = int(re.search(r"Used (\d+) registers", ptxas).group(1))
# The fewest registers with no spills: binary search over caps that are multiples of 8 below `used` (which
# spills nothing: ptxas chose it), as long as the PTX takes a cap.
lo, hi = 16, used
while hi is not None:
    caps = [n for n in range(lo + 8, hi, 8)]
    if not caps:
        break
    mid = caps[len(caps) // 2]
    spilled = spills_under(mid)
    if spilled is None:
        hi = None
    elif spilled == 0:
        hi = mid
    else:
        lo = mid
print(json.dumps({"seconds": cpu_seconds, "wall_seconds": seconds, "shared": kernel.metadata.shared, "ptxas": ptxas, "sass": sass,
                  "floor": hi}))
'''


def compile_one(entry: dict, workdir: Path, triton_python: str) -> dict:
    digest = module_key(entry)[:16]
    path = workdir / f"{entry['name']}_{digest}.ttir"
    path.write_text(entry["ttir"])
    worker = workdir / "worker.py"
    if not worker.exists():
        worker.write_text(_WORKER)
    # A fresh cache per module: Triton's on-disk cache (~/.triton/cache) would otherwise turn a repeated
    # measurement into a cache hit of under a second.
    env = {**os.environ, "TRITON_CACHE_DIR": str(workdir / f"cache_{digest}")}
    proc = subprocess.run([triton_python, str(worker), str(path), str(entry["num_warps"]), str(entry["num_stages"])],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**raw, **analyse(raw["ptxas"], raw["sass"], entry["ttir"])}


def analyse(ptxas: str, sass: str, ttir: str) -> dict:
    regs = int(re.search(r"Used (\d+) registers", ptxas).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    stack = re.search(r"(\d+) bytes stack frame", ptxas)
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    instrs = [(int(addr, 16), text.strip()) for addr, text in lines]
    # Static count without the padding after the last instruction (NOPs and the branch-to-self after EXIT).
    body = list(instrs)
    while body and (body[-1][1] == "NOP" or re.fullmatch(rf"BRA\s+{hex(body[-1][0])}", body[-1][1])):
        body.pop()
    is_ex2 = [("MUFU.EX2" in t) for _, t in body]
    # Loops: backward branches; trip counts from the constant-bound scf.for loops of the Triton IR, in order.
    loops = []
    for a, t in body:
        m = re.search(r"\bBRA(?:\.\w+)*\s+(0x[0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            loops.append((int(m.group(1), 16), a))
    trips = _scf_trip_counts(ttir)
    # LLVM fully unrolls scf.for loops of a few constant trips (e.g. the merge over the other segments): they
    # leave no backward branch, and their unrolled bodies are already counted as straight-line code. Drop the
    # smallest trip counts (the ones LLVM unrolls) until the remaining loops pair up with the SASS loops.
    while len(trips) > len(loops) and trips and all(t is not None for t in trips):
        trips.pop(trips.index(min(trips)))
    weights = [1] * len(body)
    exact = True
    if loops:
        loops.sort()
        if len(trips) != len(loops) or any(t is None for t in trips):
            exact = False
        for (lo, hi), trip in zip(loops, trips + [None] * len(loops)):
            for i, (a, _) in enumerate(body):
                if lo <= a <= hi:
                    weights[i] *= trip if trip else 1
    dynamic = sum(weights)
    exps = sum(w for w, e in zip(weights, is_ex2) if e)
    return {"regs": regs, "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else 0,
            "stack": int(stack.group(1)) if stack else 0, "static": len(body),
            "static_ex2": sum(is_ex2), "dynamic": dynamic, "dynamic_ex2": exps, "loops": len(loops),
            "trips": trips, "exact": exact}


def _scf_trip_counts(ttir: str) -> list[int | None]:
    """Trip counts of the scf.for loops, in order, where bounds are constants (or sums of constants)."""
    values = {name: int(v) for name, v in re.findall(r"(%[\w]+) = arith\.constant (-?\d+) : i32", ttir)}
    for name, a, b in re.findall(r"(%[\w]+) = arith\.addi (%[\w]+), (%[\w]+) : i32", ttir):
        if a in values and b in values:
            values[name] = values[a] + values[b]
    out = []
    for lo, hi, step in re.findall(r"scf\.for %\w+ = (%\w+) to (%\w+) step (%\w+)", ttir):
        try:
            out.append(max(0, -(-(values[hi] - values[lo]) // values[step])))
        except KeyError:
            out.append(None)
    return out


def compile_distinct(entries, args) -> dict:
    """{module_key: compiled figures} of the distinct modules among ``entries``."""
    todo = {}
    for entry in entries:
        todo.setdefault(module_key(entry), entry)
    return dict(zip(todo, compile_all(list(todo.values()), args.triton_python, args.jobs)))


def compile_all(entries: list[dict], triton_python: str, jobs: int) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix="kernel_report_"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda e: compile_one(e, workdir, triton_python), entries))


# -------------------------------------------------------------------------------------------- 3. report


def summarise(captured: dict, compiled: dict, shape) -> dict:
    """Per-kernel rows and per-pass totals normalised per token and channel."""
    batch, tokens, channels = shape
    elements = batch * tokens * channels
    rows, totals = [], {}
    for what in ("fwd", "grad"):
        total = {"instr": 0.0, "exp": 0.0, "regs": 0, "compile": 0.0, "spills": 0}
        for entry in captured[what]:
            stats = compiled[module_key(entry)]
            grid = (entry["grid_x"], entry["grid_y"], entry["grid_z"])
            threads = grid[0] * grid[1] * grid[2] * entry["num_warps"] * 32
            if "error" in stats:
                rows.append({"pass": what, "name": entry["name"], "grid": grid, "error": stats["error"]})
                continue
            per_instr = stats["dynamic"] * threads / elements
            per_exp = stats["dynamic_ex2"] * threads / elements
            rows.append({"pass": what, "name": entry["name"], "grid": grid, "warps": entry["num_warps"],
                         "regs": stats["regs"], "floor": stats.get("floor"), "spills": stats["spill_bytes"],
                         "shared": stats["shared"],
                         "static": stats["static"], "ex2": stats["static_ex2"], "instr_tok": per_instr,
                         "exp_tok": per_exp, "compile_s": stats["seconds"], "exact": stats["exact"]})
            total["instr"] += per_instr
            total["exp"] += per_exp
            total["regs"] = max(total["regs"], stats["regs"])
            total["spills"] += stats["spill_bytes"]
            total["compile"] = max(total["compile"], stats["seconds"])
        totals[what] = total
    return {"rows": rows, "totals": totals}


def print_rows(title: str, summary: dict) -> None:
    print(f"\n{title}")
    head = (f"{'pass':<5}{'kernel':<34}{'grid':<16}{'warps':>5}{'regs':>6}{'floor':>6}{'spill':>6}{'smem':>6}"
            f"{'SASS':>7}{'EX2':>5}{'instr/tok':>10}{'exp/tok':>8}{'compile s':>10}")
    print(head)
    print("-" * len(head))
    for r in summary["rows"]:
        if "error" in r:
            print(f"{r['pass']:<5}{r['name']:<34}{str(r['grid']):<16} COMPILE ERROR: {r['error'][-300:]}")
            continue
        mark = "" if r["exact"] else "~"
        floor = "-" if r.get("floor") is None else r["floor"]
        print(f"{r['pass']:<5}{r['name'][:33]:<34}{str(r['grid']):<16}{r['warps']:>5}{r['regs']:>6}{floor:>6}"
              f"{r['spills']:>6}{r['shared']:>6}{r['static']:>7}{r['ex2']:>5}{mark + format(r['instr_tok'], '.1f'):>10}"
              f"{r['exp_tok']:>8.2f}{r['compile_s']:>10.1f}")


def pass_figures(summary: dict) -> dict:
    fwd, grad = summary["totals"]["fwd"], summary["totals"]["grad"]
    return {
        "fwd": {"instr_per_token": fwd["instr"], "exp_per_token": fwd["exp"], "max_regs": fwd["regs"],
                "max_compile_s": fwd["compile"]},
        # The gradient program runs the forward kernels (residuals) and the backward ones.
        "bwd": {"instr_per_token": grad["instr"] - fwd["instr"], "exp_per_token": grad["exp"] - fwd["exp"],
                "max_regs": grad["regs"], "max_compile_s": grad["compile"]},
        "spills": grad["spills"] + fwd["spills"],
    }


def print_targets(new: dict, old: dict, traffic: dict | None, old_traffic: float | None) -> None:
    print("\nTargets of issue 11 (old = the kernel before the rework; fwd+bwd = forward + backward passes)")
    head = f"{'quantity':<44}{'old':>10}{'new':>10}{'target':>14}  met"
    print(head)
    print("-" * len(head))

    def row(name, o, n, target, ok):
        fmt = lambda x: "n/a" if x is None else (f"{x:.1f}" if isinstance(x, float) and x == round(x, 1) or (
            isinstance(x, float) and x > 100) else (f"{x:.2f}" if isinstance(x, float) else str(x)))
        print(f"{name:<44}{fmt(o):>10}{fmt(n):>10}{target:>14}  {'yes' if ok else 'NO'}")

    of, ob, nf, nb = old["fwd"], old["bwd"], new["fwd"], new["bwd"]
    row("exp per token, forward pass", round(of["exp_per_token"], 2), round(nf["exp_per_token"], 2), "<= 4",
        nf["exp_per_token"] <= 4)
    row("exp per token, backward pass", round(ob["exp_per_token"], 2), round(nb["exp_per_token"], 2), "<= 4",
        nb["exp_per_token"] <= 4)
    old_sum = of["instr_per_token"] + ob["instr_per_token"]
    new_sum = nf["instr_per_token"] + nb["instr_per_token"]
    row("SASS instr per token, fwd+bwd", old_sum, new_sum, f"<= {old_sum / 3:.0f}", new_sum <= old_sum / 3)
    regs = max(nf["max_regs"], nb["max_regs"])
    row("max registers per kernel", max(of["max_regs"], ob["max_regs"]), regs, "<= 168", regs <= 168)
    row("spilled bytes (all kernels)", old.get("spills", 0), new["spills"], "0", new["spills"] == 0)
    comp = max(nf["max_compile_s"], nb["max_compile_s"])
    row("max Triton compile s per kernel", max(of["max_compile_s"], ob["max_compile_s"]), comp, "<= 30", comp <= 30)
    if traffic:
        row("training traffic, f32 array-equivalents", old_traffic, traffic["training"], "<= 14",
            traffic["training"] <= 14)
        print(f"  traffic breakdown (new): {traffic}")


def _extra_shapes(values: list[int] | None) -> list[tuple[int, int, int]]:
    if values is None:
        return []
    if not values:
        return [(24, 3136, 144), (2, 16384, 576)]
    if len(values) % 3:
        sys.exit("kernel_report: --shapes takes three ints (B T C) per shape")
    return [tuple(values[i:i + 3]) for i in range(0, len(values), 3)]


def _tiling(plan: dict | None) -> str:
    if not plan:
        return "tiling not reported"
    return (f"tiling: chunk {plan['chunk']}, {plan['rows_per_tile']} rows per tile, {plan['tiles_per_chunk']} "
            f"tile(s) per chunk, {plan['segments']} segments")


def other_shape(shape, args) -> tuple[dict, dict | None]:
    """Per-kernel figures of this tree's kernels at one more (B, T, C), and the tiling they use."""
    spec = argparse.Namespace(**{**vars(args), "shape": list(shape), "model": False})
    captured = run_capture(None, spec)["operator"]
    results = compile_distinct(captured["fwd"] + captured["grad"], args)
    return summarise(captured, results, shape), captured.get("plan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[24, 784, 576], metavar=("B", "T", "C"))
    parser.add_argument("--variant", default="official")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tile-len", type=int, default=None, help="tile_len of the new kernel (default: its own)")
    parser.add_argument("--compare", default=None, help="git ref of an older kernel to report side by side")
    parser.add_argument("--model", action="store_true", help="also rwkv_unet_b's WKV shapes at 224 and 512")
    parser.add_argument("--shapes", type=int, nargs="*", default=None, metavar="B T C",
                        help="also these (B, T, C), three ints each (no values: gpu_check's other shapes "
                             "(24, 3136, 144) and (2, 16384, 576)): registers, spills and compile per kernel")
    parser.add_argument("--triton-python", default=DEFAULT_TRITON_PYTHON)
    parser.add_argument("--jobs", type=int, default=2, help="compiles run in parallel")
    parser.add_argument("--json", default=None, help="write everything measured to this file")
    parser.add_argument("--_capture", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._capture:
        print(json.dumps(capture_main(json.loads(args._capture))))
        return
    if not Path(args.triton_python).exists():
        sys.exit(f"kernel_report: no triton at {args.triton_python}; set up once with:\n"
                 "  python3 -m venv /tmp/triton-venv && /tmp/triton-venv/bin/pip install triton==3.8.0")

    trees = [("new", None)]
    worktree = None
    if args.compare:
        worktree = Path(tempfile.mkdtemp(prefix="kernel_report_old_"))
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.compare],
                       check=True, capture_output=True)
        trees.append((args.compare, worktree))
    report = {}
    try:
        for label, tree in trees:
            start = time.perf_counter()
            captured = run_capture(tree, args)
            print(f"[{label}] captured {len(captured['operator']['fwd'])} forward and "
                  f"{len(captured['operator']['grad'])} gradient kernels in {time.perf_counter() - start:.0f} s",
                  flush=True)
            entries = captured["operator"]["fwd"] + captured["operator"]["grad"]
            for info in captured.get("model", {}).values():
                entries += info["modules"]
            start = time.perf_counter()
            results = compile_distinct(entries, args)
            print(f"[{label}] compiled {len(results)} distinct modules in {time.perf_counter() - start:.0f} s "
                  f"({args.jobs} in parallel)", flush=True)
            summary = summarise(captured["operator"], results, args.shape)
            report[label] = {"summary": summary, "figures": pass_figures(summary),
                             "traffic": captured["operator"].get("traffic")}
            if captured.get("model"):
                model = {}
                for size, info in captured["model"].items():
                    hashes = [module_key(e) for e in info["modules"]]
                    model[size] = {"shapes": info["shapes"], "modules": len(hashes),
                                   "compile_s": sum(results[h].get("seconds", 0.0) for h in hashes)}
                report[label]["model"] = model
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True)

    extra = _extra_shapes(args.shapes)
    others = [(shape, other_shape(shape, args)) for shape in extra]

    b, t, c = args.shape
    for label, rep in report.items():
        print_rows(f"== {label}: bi_wkv_pallas at (B, T, C) = ({b}, {t}, {c}) {args.dtype}, {args.variant}",
                   rep["summary"])
        for size, info in rep.get("model", {}).items():
            print(f"rwkv_unet_b at {size}: {len(info['shapes'])} distinct WKV (T, C) {info['shapes']}: "
                  f"{info['modules']} distinct kernels, {info['compile_s']:.0f} s of Triton compile in total")
    old = report[args.compare]["figures"] if args.compare else BASELINE
    old_traffic = (report[args.compare]["traffic"] or {}).get("training") if args.compare else None
    if old_traffic is None:
        old_traffic = BASELINE["traffic_training"]
    if not args.compare:
        print(f"\n(old figures: recorded from commit {BASELINE['ref']}; pass --compare {BASELINE['ref']} to remeasure)")
    print_targets(report["new"]["figures"], old, report["new"]["traffic"], old_traffic)
    for shape, (summary, plan) in others:
        print_rows(f"== new: bi_wkv_pallas at (B, T, C) = {tuple(shape)} {args.dtype}, {args.variant} "
                   f"({_tiling(plan)})", summary)
        report.setdefault("shapes", {})[str(tuple(shape))] = {"summary": summary, "plan": plan}
    rows = [r for _, (summary, _) in others for r in summary["rows"] if "error" not in r]
    if rows:
        print(f"\nother shapes: max registers {max(r['regs'] for r in rows)}, spilled bytes "
              f"{sum(r['spills'] for r in rows)}, max compile {max(r['compile_s'] for r in rows):.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
