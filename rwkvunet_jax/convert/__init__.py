"""PyTorch interop: official state_dict export/import for the six models, and state_dict files.

* :func:`export_torch_state_dict` / :func:`load_torch_state_dict`: JAX model <-> official state_dict
  (every key, shape and the order of the official code; exact both ways).
* :func:`load_torch_encoder`: an official ImageNet encoder file into a segmentation model's encoder.
* :func:`read_state_dict` / :func:`write_state_dict`: ``.pth``/``.pt``, ``.safetensors``, ``.npz``.
* :func:`official_layout`: the official key list of a model spec (names, shapes, used or dead).
"""

from rwkvunet_jax.convert.state_dict import (
    LoadReport,
    export_torch_state_dict,
    load_torch_encoder,
    load_torch_state_dict,
    unwrap_state_dict,
)
from rwkvunet_jax.convert.torch_io import read_state_dict, write_state_dict
from rwkvunet_jax.convert.torch_names import TorchTensor, encoder_file_layout, official_layout

__all__ = [
    "LoadReport",
    "TorchTensor",
    "encoder_file_layout",
    "export_torch_state_dict",
    "load_torch_encoder",
    "load_torch_state_dict",
    "official_layout",
    "read_state_dict",
    "unwrap_state_dict",
    "write_state_dict",
]
