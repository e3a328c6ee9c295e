"""What every bidirectional-WKV implementation shares: the official kernel's constants and the input checks.

Installed as ``rwkvunet_jax.kernels.wkv_spec``; it imports only JAX, so ``rwkvunet_jax.wkv`` (the dispatcher),
the Pallas kernels and the model specs all take their constants from here.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

__all__ = ["EPS", "NUM_CHUNKS", "EMPTY_EXPONENT", "VARIANTS", "chunk_length", "check_inputs"]

# The official CUDA kernel adds EPS to its denominator after rescaling by its running maximum exponent o_t,
# i.e. EPS * e^{o_t} in absolute terms (see rwkvunet_jax.wkv for o_t).
EPS = 1e-6
# The official kernel cuts the T tokens into 32 chunks of ceil(T / 32) tokens and restarts its forward
# recurrence at each chunk start: part of the semantics of variant "official", not a tiling choice.
NUM_CHUNKS = 32
# Stands for log(0) in running maxima. Finite (unlike -inf) so that max and subtraction never form inf - inf,
# and exp() of anything near it is exactly 0 in float32 and float64.
EMPTY_EXPONENT = -1e30
VARIANTS = ("official", "paper")


def chunk_length(num_tokens: int) -> int:
    """Tokens per chunk of the official kernel, n = ceil(T / 32) (at least 1)."""
    return max(1, -(-int(num_tokens) // NUM_CHUNKS))


def check_inputs(
    w: Any,
    u: Any,
    k: Any,
    v: Any,
    *,
    variant: str,
    caller: str,
    dtypes: Sequence[Any] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Validate bi-WKV arguments and return them as arrays; errors name ``caller`` and the problem.

    Expects k, v of shape (B, T, C) with T >= 1, w and u of shape (C,), floating dtypes, k and v of one dtype.
    ``dtypes`` restricts the accepted dtypes (e.g. a kernel without float64).
    """
    if variant not in VARIANTS:
        raise ValueError(f"{caller}: unknown variant {variant!r}; expected one of {VARIANTS}")
    w, u, k, v = (x if isinstance(x, jax.Array) else jnp.asarray(x) for x in (w, u, k, v))
    expect = "expected k, v of shape (B, T, C) and w, u of shape (C,)"
    if k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"{caller}: {expect}; got k {k.shape}, v {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"{caller}: k and v must have the same shape (B, T, C); got k {k.shape}, v {v.shape}")
    channels = k.shape[2]
    if w.shape != (channels,) or u.shape != (channels,):
        raise ValueError(f"{caller}: {expect} with C = {channels} from k; got w {w.shape}, u {u.shape}")
    if k.shape[1] == 0:
        raise ValueError(f"{caller}: needs at least one token (T >= 1); got k {k.shape}")
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{caller}: {name} must have a floating dtype; got {x.dtype}")
        if dtypes is not None and not any(x.dtype == jnp.dtype(d) for d in dtypes):
            names = ", ".join(jnp.dtype(d).name for d in dtypes)
            raise ValueError(f"{caller}: {name} has dtype {x.dtype}; supported: {names}")
    if k.dtype != v.dtype:
        raise ValueError(f"{caller}: k and v must have the same dtype; got k {k.dtype}, v {v.dtype}")
    return w, u, k, v
