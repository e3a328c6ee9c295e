"""Fixtures shared by several test modules."""

from __future__ import annotations

import jax
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
