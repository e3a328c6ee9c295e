""".npy / .npz reading that is safe in many reader threads at once.

``np.load`` parses every .npy header with ``ast.literal_eval``, which is not thread-safe on some CPython
releases (3.11.7 among them, python/cpython gh-106905): grain's reader threads loading slices together
fail now and then with ``SystemError: AST constructor recursion depth mismatch``. Here the header
numpy writes (``{'descr': '<f4', 'fortran_order': False, 'shape': (512, 512), }``) is parsed with a
regular expression; any other header (structured dtypes, other writers) goes through ``ast`` under a
lock. Only the header parse is serialised; the array bytes are read and decompressed concurrently.
Object (pickled) arrays are refused, as ``np.load(allow_pickle=False)`` does.
"""

from __future__ import annotations

import ast
import math
import re
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

_SIMPLE_HEADER = re.compile(
    r"\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(((?:\d+, ?)*\d*)\), \}[ \n]*")
_AST_LOCK = threading.Lock()


def _parse_header(header: str, where: str) -> tuple[np.dtype, bool, tuple[int, ...]]:
    match = _SIMPLE_HEADER.fullmatch(header)
    if match:
        shape = tuple(int(s) for s in match[3].replace(" ", "").split(",") if s)
        return np.dtype(match[1]), match[2] == "True", shape
    with _AST_LOCK:  # ast.literal_eval is not thread-safe on every CPython (gh-106905)
        try:
            fields = ast.literal_eval(header)
        except (SyntaxError, ValueError) as err:
            raise ValueError(f"{where}: unreadable .npy header {header[:80]!r}") from err
    if not isinstance(fields, dict) or set(fields) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"{where}: unexpected .npy header {header[:80]!r}")
    return np.lib.format.descr_to_dtype(fields["descr"]), bool(fields["fortran_order"]), tuple(fields["shape"])


def read_npy_stream(fp: IO[bytes], where: str = "array") -> np.ndarray:
    """The array of an open .npy stream (a file or an .npz member); ``where`` names it in errors."""
    magic = fp.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY":
        raise ValueError(f"{where}: not a .npy array (no NUMPY magic)")
    major = magic[6]
    if major not in (1, 2, 3):
        raise ValueError(f"{where}: .npy format version {major}.{magic[7]} is not supported")
    size_bytes = fp.read(2 if major == 1 else 4)
    header_bytes = fp.read(int.from_bytes(size_bytes, "little"))
    header = header_bytes.decode("utf8" if major == 3 else "latin1")
    dtype, fortran, shape = _parse_header(header, where)
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects (pickled data), which are not read")
    count = math.prod(shape)
    data = fp.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"{where}: truncated: {len(data)} of {count * dtype.itemsize} data bytes")
    array = np.frombuffer(data, dtype=dtype, count=count)
    return array.reshape(shape, order="F" if fortran else "C").copy()  # own, writable memory


def read_npy(path: str | Path) -> np.ndarray:
    """The array of a .npy file."""
    with open(path, "rb") as fp:
        return read_npy_stream(fp, str(path))


def read_npz(path: str | Path, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Arrays of an .npz archive by name: ``keys`` (ValueError naming those present when one is missing),
    or all of them."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not an .npz archive ({err})") from err
    with archive:
        members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
        wanted = list(members) if keys is None else list(keys)
        missing = [k for k in wanted if k not in members]
        if missing:
            raise ValueError(f"{path}: expected arrays {wanted}, found {sorted(members)}")
        out = {}
        for key in wanted:
            with archive.open(members[key]) as fp:
                out[key] = read_npy_stream(fp, f"{path}[{key}]")
        return out
