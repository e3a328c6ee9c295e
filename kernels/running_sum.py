"""Log-domain running sums that decay at a fixed rate per step: the carries of the row-by-row WKV forms.

A partial sum sum_j c_j e^{x_j} (c = v for the numerator, 1 for the denominator) whose terms all decay by
e^{rate} per step is held as (top, age, a, b): numerator a * e^{ref}, denominator b * e^{ref}, with the
reference exponent ref = top + rate * age. ``top`` is the largest exponent at the time it was absorbed and
``age`` counts the steps since, so ref is the running maximum, every term is at most e^{ref} and
0 <= b <= #terms, |a| <= #terms * max|v|: nothing overflows for any x or rate. Recomputing ref from (top, age)
instead of adding the rate once per step keeps float rounding (at the exponent's magnitude) from piling up over
the steps. Any reference gives the same sum, so ``top`` is held under stop_gradient and the rate's gradient flows
through rate * age.

Used by ``rwkvunet_jax.wkv``'s scan form (one step per token) and by the chunked form's exact row-by-row
fallback (``wkv_chunked.tile_output_exact``). Imports only JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .wkv_spec import EMPTY_EXPONENT as _EMPTY

__all__ = ["absorb", "decay", "emit", "empty", "select", "start"]


def empty(like: jax.Array) -> tuple[jax.Array, ...]:
    """The sum of no terms, shaped like ``like``."""
    return jnp.full_like(like, _EMPTY), jnp.zeros_like(like), jnp.zeros_like(like), jnp.zeros_like(like)


def start(ref: jax.Array, a: jax.Array, b: jax.Array) -> tuple[jax.Array, ...]:
    """The running sum of a sum (a, b) e^{ref} (``ref`` its largest exponent, constant for differentiation)."""
    return ref, jnp.zeros_like(a), a, b


def _ref(acc, rate):
    top, age, _, _ = acc
    return top + rate * age


def absorb(acc, rate, x, v, present=None):
    """Add the term e^{x} (numerator v e^{x}); ``present`` (bool) masks the term out where False."""
    top, age, a, b = acc
    if present is not None:
        x = jnp.where(present, x, _EMPTY)
    ref = _ref(acc, rate)
    renew = lax.stop_gradient(x > ref)
    new_ref = jnp.where(renew, lax.stop_gradient(x), ref)
    old, new = jnp.exp(ref - new_ref), jnp.exp(x - new_ref)
    if present is not None:
        new = jnp.where(present, new, 0.0)
    top = jnp.where(renew, lax.stop_gradient(x), top)
    age = jnp.where(renew, 0.0, age)
    return top, age, a * old + v * new, b * old + new


def decay(acc):
    """Multiply the sum by e^{rate} (one step later)."""
    top, age, a, b = acc
    return top, age + 1.0, a, b


def select(flag, acc_true, acc_false):
    """``acc_true`` where ``flag``, else ``acc_false``."""
    return tuple(jnp.where(flag, x, y) for x, y in zip(acc_true, acc_false))


def emit(acc, rate):
    """The sum as (ref, a, b), one array fewer than the carry."""
    _, _, a, b = acc
    return _ref(acc, rate), a, b
