"""Batched inference on numpy images with optional flip test-time augmentation.

A *predict function* maps a float32 batch (B, H, W, C) at the network size to logits (B, H, W, K)
(numpy or jax). K = 1 means one sigmoid output (binary); otherwise softmax over K classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PredictFn = Callable[[np.ndarray], np.ndarray]


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Sigmoid for one channel, softmax over the last axis otherwise (float32)."""
    logits = np.asarray(logits, np.float32)
    if logits.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def labels_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Integer labels (..., H, W): threshold 0.5 for one channel, argmax otherwise."""
    if probs.shape[-1] == 1:
        return (probs[..., 0] > 0.5).astype(np.int32)
    return np.argmax(probs, axis=-1).astype(np.int32)


def predict_probabilities(predict_fn: PredictFn, images: np.ndarray, *, batch_size: int, tta: bool = False) -> np.ndarray:
    """Class probabilities (N, H, W, K) of ``images`` (N, H, W, C), ``batch_size`` at a time.

    The last batch is zero-padded to ``batch_size`` so the predict function sees one shape (one
    compilation). With ``tta`` the probabilities are averaged over the identity, a horizontal flip and a
    vertical flip (each flipped back before averaging).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
        probs = probabilities(np.asarray(predict_fn(chunk)))
        if tta:
            for axis in (2, 1):  # horizontal (W), then vertical (H) flip
                flipped = probabilities(np.asarray(predict_fn(np.flip(chunk, axis=axis).copy())))
                probs = probs + np.flip(flipped, axis=axis)
            probs = probs / 3.0
        outputs.append(probs[:real])
    return np.concatenate(outputs, axis=0)


def model_predict_fn(model) -> PredictFn:
    """A jit-compiled predict function of an NNX segmentation model in inference mode (one device)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)
    state = nnx.as_pure(state)

    @jax.jit
    def run(state, images):
        return nnx.merge(graphdef, state)(images).astype(jnp.float32)

    return lambda images: np.asarray(run(state, np.asarray(images, np.float32)))
