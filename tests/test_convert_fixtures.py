"""Helpers for the conversion tests (no tests here): fast random models on both sides.

Building a model with ``create_model`` compiles one initializer per parameter shape (tens of
seconds on a CI machine). The parity tests overwrite every value anyway, so they take the model's
structure from ``nnx.eval_shape`` and fill it with non-trivial random values directly: BatchNorm
statistics away from 0/1, non-zero WKV decay/bonus (the all-zero initial values hide WKV
differences), mixing vectors away from 0.5.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rwkvunet_jax

GAIN = 2.0 # He-style kernel variance (ReLU halves it), so activations keep their scale
TINY = dict(depths=(1, 1, 2, 2), widths=(8, 16, 16, 24))  # attention in stages 3-4 (depth 2)

# The official state_dict listings (shared/reference/official-*state-dict-*.txt, made by building
# the official classes): (name, num_classes, in_chans, file, entries, sha256 of the file's lines).
# The digests let CI check the layout where the shared folder is absent; where it is present, the
# test compares line by line and checks the digest of the file itself.
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
REAL = [
    ("rwkv_unet_t", 1, 3, "official-state-dict-T.txt", 451,
     "60b4064d44894914724e8220f63817bea8872b51c78d5e83959ae2b1f04d5ec2"),
    ("rwkv_unet_s", 9, 1, "official-state-dict-S.txt", 607,
     "c54f583d6b9e0dcaf4998a59c12c26fe27d37b8f55381ea351fc05e2d4cac459"),
    ("rwkv_unet_b", 9, 1, "official-state-dict-B.txt", 607,
     "30b5d36ce18bab45b4a39c8dcf7ab4fa6ee79f5f9f76dd7649b21deb36eaa356"),
    ("rwkv_unet_encoder_t", 1000, 3, "official-encoder-state-dict-T.txt", 348,
     "2d76153b338d4845ab1a0e15f4ea955962829343326334c48ff92a136f8b22c0"),
    ("rwkv_unet_encoder_s", 1000, 3, "official-encoder-state-dict-S.txt", 504,
     "e347ac2d8392afcecc2c50c955bc23548fa23c4c0929e4e52257bc5fd800aff3"),
    ("rwkv_unet_encoder_b", 1000, 3, "official-encoder-state-dict-B.txt", 504,
     "516b74dbebf2c6ead2a069db42a51dd0f2c114b9218bd4b52ee63eb170d12717"),
]


def layout_lines(state_dict) -> list[str]:
    """``key<TAB>shape<TAB>dtype`` lines in the reference files' format."""
    return [f"{k}\t{tuple(v.shape)}\t{str(v.dtype).replace('torch.', '')}" for k, v in state_dict.items()]


def check_against_reference(lines: list[str], filename: str, entries: int, digest: str) -> None:
    """Asserts ``lines`` equal the official listing ``filename`` (its digest where the file is absent)."""
    path = REFERENCE_DIR / filename
    if path.is_file():
        reference = [line for line in path.read_text().splitlines() if not line.startswith("#")]
        assert hashlib.sha256("\n".join(reference).encode()).hexdigest() == digest, f"{path} changed"
        assert lines == reference
    assert len(lines) == entries
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == digest


def params_and_stats(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """Every parameter and BatchNorm statistic of ``model`` by its path, as numpy arrays."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, prefix + (k,))
        else:
            out[prefix] = np.asarray(node)

    walk(nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))), ())
    return out


def _random_value(path: tuple, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    leaf = str(path[-1])
    if leaf == "mean":
        x = rng.normal(0.0, 0.3, shape)
    elif leaf == "var":
        x = rng.uniform(0.5, 2.0, shape)
    elif leaf == "scale":
        x = rng.uniform(0.6, 1.4, shape)
    elif leaf == "bias":
        x = rng.normal(0.0, 0.2, shape)
    elif leaf in ("spatial_decay", "spatial_first"):
        x = rng.normal(0.0, 3.0, shape)
    elif leaf.startswith("spatial_mix"):
        x = rng.uniform(0.0, 1.0, shape)
    elif leaf == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        x = rng.normal(0.0, np.sqrt(GAIN / fan_in), shape)
    else:
        raise AssertionError(f"no random rule for {path}")
    return x.astype(np.float32)


def random_jax_model(name: str, *, num_classes: int, in_chans: int, seed: int = 0, **overrides: Any) -> nnx.Module:
    """A registry model with random non-trivial values, in eval mode, built without initializers."""
    model = nnx.eval_shape(
        lambda: rwkvunet_jax.create_model(name, num_classes=num_classes, in_chans=in_chans, **overrides))
    rng = np.random.default_rng(seed)
    state = nnx.state(model)

    def fill(node: Any, path: tuple) -> Any:
        if isinstance(node, Mapping):
            return {k: fill(v, path + (k,)) for k, v in node.items()}
        if jax.dtypes.issubdtype(node.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if node.dtype == jnp.uint32:
            return jnp.zeros(node.shape, jnp.uint32)
        return jnp.asarray(_random_value(path, tuple(node.shape), rng))

    nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(state), ()))
    nnx.update(model, state)
    model.eval()
    return model


def randomize_torch_model(module, seed: int = 0):
    """Gives every parameter and BatchNorm statistic of a torch module non-trivial random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "num_batches_tracked":
                tensor.fill_(7)
                continue
            shape = tensor.shape
            if leaf == "running_mean":
                new = 0.3 * torch.randn(shape, generator=gen)
            elif leaf == "running_var":
                new = 0.5 + 1.5 * torch.rand(shape, generator=gen)
            elif leaf in ("spatial_decay", "spatial_first"):
                new = 3.0 * torch.randn(shape, generator=gen)
            elif leaf.startswith("spatial_mix"):
                new = torch.rand(shape, generator=gen)
            elif leaf == "bias":
                new = 0.2 * torch.randn(shape, generator=gen)
            elif tensor.ndim == 1:  # norm weights
                new = 0.6 + 0.8 * torch.rand(shape, generator=gen)
            else:
                fan_in = int(np.prod(shape[1:]))
                new = torch.randn(shape, generator=gen) * np.sqrt(GAIN / fan_in)
            tensor.copy_(new)
    return module.eval()
