"""Fixtures shared by several test modules, and the XLA setting the suite runs with."""

from __future__ import annotations

import os

# The suite compiles hundreds of small programs and runs each on tiny inputs, so LLVM's optimisation passes
# dominate its CPU time. Level 0 skips them: measured on 2 cores, test_demo + test_wkv_chunked took 3.3
# instead of 5.3 CPU-minutes. Results are the same functions (no fast-math either way; tolerances and the
# bit-exact resume tests compare runs of one setting). Set before JAX starts its CPU backend; an explicit
# level in the environment wins. Benchmarks and user runs keep XLA's default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent JAX compilation cache for one module, so repeated runs of one program compile once."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for name, value in old.items():
        jax.config.update(name, value)


@pytest.fixture(scope="session")
def cpu_devices_env():
    """``env(n)``: this process's environment for a child JAX process with ``n`` CPU devices (the suite's
    XLA_FLAGS kept, the device count added; it must be fixed before JAX starts, hence a subprocess)."""

    def env(devices: int) -> dict[str, str]:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")

    return env
