"""Batched inference on numpy images with optional flip test-time augmentation (TTA).

A *predict function* maps a float32 batch (B, H, W, C) at the network size to logits (B, H, W, K)
(numpy or jax). K = 1 means one sigmoid output (binary); otherwise softmax over K classes.

TTA modes (``TTA_MODES``; the configs' ``eval.tta``):

* ``"none"``: one forward pass.
* ``"hflip_logits"``: the paper's protocol. The official test script of Jan-Feb 2025 wrapped the model in
  ``ttach.SegmentationTTAWrapper`` with ``HorizontalFlip`` only and the default merge, the mean of the raw
  outputs: logits averaged over the identity and the horizontal flip (flipped back), then softmax.
* ``"hv_probs"``: probabilities averaged over the identity, a horizontal and a vertical flip (each flipped
  back). Horizontal flips swap left and right organs (the kidneys of Synapse), so the modes differ most there.
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


TTA_MODES = ("none", "hflip_logits", "hv_probs")
PAPER_TTA = "hflip_logits"


def tta_mode(value: str | bool) -> str:
    """``value`` as a mode of ``TTA_MODES``; a bool means the paper's mode (True) or "none" (False)."""
    if isinstance(value, (bool, np.bool_)):
        return PAPER_TTA if value else "none"
    if value not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {value!r}; expected one of {', '.join(TTA_MODES)}")
    return str(value)


def predict_probabilities(predict_fn: PredictFn, images: np.ndarray, *, batch_size: int,
                          tta: str | bool = "none") -> np.ndarray:
    """Class probabilities (N, H, W, K) of ``images`` (N, H, W, C), ``batch_size`` at a time.

    The last batch is zero-padded to ``batch_size`` so the predict function sees one shape (one
    compilation). ``tta`` is a mode of ``TTA_MODES`` (see the module docstring) or a bool (:func:`tta_mode`).
    """
    mode = tta_mode(tta)
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
        outputs.append(_merged_probabilities(predict_fn, chunk, mode)[:real])
    return np.concatenate(outputs, axis=0)


def _merged_probabilities(predict_fn: PredictFn, chunk: np.ndarray, mode: str) -> np.ndarray:
    """Probabilities of one batch under TTA ``mode``."""

    def flipped_back(axis: int) -> np.ndarray:  # the output for the flipped input, flipped back
        return np.flip(np.asarray(predict_fn(np.flip(chunk, axis=axis).copy()), np.float32), axis=axis)

    logits = np.asarray(predict_fn(chunk), np.float32)
    if mode == "hflip_logits":
        return probabilities((logits + flipped_back(2)) / 2.0)  # axis 2 = W: a horizontal flip
    if mode == "hv_probs":
        return (probabilities(logits) + probabilities(flipped_back(2)) + probabilities(flipped_back(1))) / 3.0
    return probabilities(logits)


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
