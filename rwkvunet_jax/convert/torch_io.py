"""Reading and writing state_dict files: ``.pth``/``.pt``, ``.safetensors`` and ``.npz``.

``.pth`` files are read with ``torch.load(weights_only=True)`` (no pickled code runs) and written
with ``torch.save``; ``.safetensors`` needs the ``safetensors`` package (and torch for bfloat16
files); ``.npz`` needs numpy only. Writes are atomic: a temporary file in the same directory is
renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rwkvunet_jax.convert.state_dict import to_numpy, unwrap_state_dict

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
READ_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".npz")
WRITE_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")
KEY_ORDER_METADATA = "rwkvunet_key_order"


def _suffix(path: Path, allowed: tuple[str, ...], action: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise ValueError(f"cannot {action} {path}: unknown file type {suffix or '(none)'!r}; "
                         f"expected one of {', '.join(allowed)}")
    return suffix


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``.pth``/``.pt``/``.bin``/``.ckpt``, ``.safetensors`` or ``.npz`` file as numpy arrays.

    Wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and ``module.`` prefixes are unwrapped;
    bfloat16/float16 tensors become float32. Raises FileNotFoundError for a missing file and
    ValueError (naming the file) for an unknown type or a file that cannot be read.
    """
    path = Path(path)
    suffix = _suffix(path, READ_SUFFIXES, "read")
    if not path.is_file():
        raise FileNotFoundError(f"state_dict file not found: {path}")
    try:
        if suffix in TORCH_SUFFIXES:
            import torch

            obj: Any = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".safetensors":
            obj = _read_safetensors(path)
        else:
            with np.load(path, allow_pickle=False) as data:
                obj = {key: data[key] for key in data.files}
    except Exception as err:  # noqa: BLE001 - unpickling and format errors come in many types
        if suffix in TORCH_SUFFIXES:
            raise ValueError(_unreadable_torch_file(path, err)) from err
        raise ValueError(f"could not read state_dict file {path}: {type(err).__name__}: {err}") from err
    try:
        flat = unwrap_state_dict(obj)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    return {key: to_numpy(value) for key, value in flat.items()}


# The first bytes of file types people pass by mistake.
_MAGIC = ((b"\x93NUMPY", "a NumPy .npy array"), (b"\x89HDF", "an HDF5 file"), (b"\x89PNG", "a PNG image"),
          (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a zip archive"), (b"\x80", "a Python pickle"))


def _unreadable_torch_file(path: Path, err: Exception) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused ``path``: what the file is, what is expected."""
    expected = "expected what torch.save(model.state_dict(), path) writes (a dict of tensors), or .safetensors/.npz"
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if pickled:
        return (f"{path} holds a pickled {pickled.group(1)} object, not a state_dict of tensors; save "
                f"model.state_dict() instead (files are read with weights_only=True, which runs no pickled code)")
    with open(path, "rb") as f:
        head = f.read(64)
    kind = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if kind is None:
        try:
            head.decode("utf-8")
            kind = "text" if head else "empty"
        except UnicodeDecodeError:
            kind = "binary data of an unknown format"
    if kind in ("a zip archive", "a Python pickle"):  # torch's own formats: say what torch could not take
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        return f"could not read {path} ({kind}) as a state_dict: {type(err).__name__}: {reason}; {expected}"
    return f"{path} is not a PyTorch checkpoint: it holds {kind}; {expected}"


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
    except (TypeError, ValueError) as err:
        # bfloat16 has no numpy dtype; go through torch when it is there.
        if "bf16" not in str(err).lower() and "bfloat16" not in str(err).lower():
            raise
        from safetensors.torch import load_file as load_torch_file

        tensors = load_torch_file(str(path))
    # safetensors stores tensors sorted; files written here record the state_dict order.
    with safe_open(str(path), framework="np") as f:
        order = json.loads((f.metadata() or {}).get(KEY_ORDER_METADATA, "[]"))
    if sorted(order) == sorted(tensors):
        tensors = {key: tensors[key] for key in order}
    return tensors


def write_state_dict(state_dict: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``{key: array}`` to ``.pth``/``.pt`` (torch.save), ``.safetensors`` or ``.npz``, atomically.

    Arrays may be numpy arrays or torch tensors; key order is kept. Returns the path written.
    """
    path = Path(path)
    suffix = _suffix(path, WRITE_SUFFIXES, "write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory for {path} does not exist: {path.parent}")
    # np.array(order="C") rather than np.ascontiguousarray, which turns 0-d counters into shape (1,).
    arrays = {str(k): np.array(to_numpy(v), order="C") for k, v in state_dict.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if suffix in (".pth", ".pt"):
            import torch

            torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, tmp)
        elif suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, str(tmp), metadata={"format": "pt", KEY_ORDER_METADATA: json.dumps(list(arrays))})
        else:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
