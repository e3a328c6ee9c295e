"""A PyTorch twin of the six RWKV-UNet models (needs the ``[torch]`` extra).

Same tensor names, shapes and order as the official PyTorch code, so official checkpoints and weights
exported from JAX (:func:`rwkvunet_jax.convert.export_torch_state_dict`) load with ``strict=True`` and
run without the official repository; also the independent side of the JAX/PyTorch parity tests.
"""

from rwkvunet_jax.torch_reference.models import (
    MODEL_NAMES,
    CCMTorch,
    RWKVUNetEncoderTorch,
    RWKVUNetTorch,
    build_torch_model,
)
from rwkvunet_jax.torch_reference.wkv import bi_wkv, bi_wkv_dense

__all__ = [
    "MODEL_NAMES",
    "CCMTorch",
    "RWKVUNetEncoderTorch",
    "RWKVUNetTorch",
    "bi_wkv",
    "bi_wkv_dense",
    "build_torch_model",
]
