"""ACDC cardiac MRI in the SSL4MIS layout (4 classes: background, RV, myocardium, LV).

Supported layout (``root`` may be the ``ACDC`` folder or its parent)::

    <root>/ACDC_training_slices/patientXXX_frameYY_slice_Z.h5   'image' (H, W) float, 'label' (H, W) 0..3
    <root>/ACDC_training_volumes/patientXXX_frameYY.h5          'image', 'label' of shape (D, H, W)

Splits by patient id, as the official trainer: 1-20 test, 21-30 val, 31-100 train. Train examples are the
2-D slice files; val/test examples are the slices of the volumes (the official protocol evaluates volumes).
Files are matched by their patient id, no list files are needed.
"""

from __future__ import annotations

import re
from pathlib import Path

from rwkvunet_jax.data.base import (H5SliceSource, H5Volumes, SliceSource, VolumeSliceSource, natural_key,
                                    require_dir, require_nonempty)

PATIENTS = {"test": range(1, 21), "val": range(21, 31), "train": range(31, 101)}
SLICES_DIR, VOLUMES_DIR = "ACDC_training_slices", "ACDC_training_volumes"
_PATIENT = re.compile(r"patient(\d+)_")


def _resolve_root(root: str | Path) -> Path:
    root = require_dir(Path(root), "ACDC root")
    if not (root / SLICES_DIR).is_dir() and not (root / VOLUMES_DIR).is_dir() and (root / "ACDC").is_dir():
        return root / "ACDC"
    return root


def _patient_files(folder: Path, split: str) -> list[Path]:
    if split not in PATIENTS:
        raise ValueError(f"acdc has splits {tuple(PATIENTS)}, got {split!r}")
    folder = require_dir(folder, f"ACDC {split} folder")
    wanted = PATIENTS[split]
    files = []
    for path in folder.glob("*.h5"):
        match = _PATIENT.match(path.name)
        if match and int(match.group(1)) in wanted:
            files.append(path)
    files.sort(key=lambda p: natural_key(p.name))
    require_nonempty(files, folder, f"h5 files of patients {wanted.start}-{wanted.stop - 1} ({split} split)")
    return files


def acdc_volumes(root: str | Path, split: str) -> H5Volumes:
    """The (D, H, W) volumes of the split's patients (ED and ES frames)."""
    root = _resolve_root(root)
    return H5Volumes("acdc", _patient_files(root / VOLUMES_DIR, split))


def acdc_source(root: str | Path, split: str) -> SliceSource:
    """Train: the 2-D slice files of patients 31-100; val/test: the slices of the split's volumes."""
    resolved = _resolve_root(root)
    if split == "train":
        return H5SliceSource("acdc", resolved, split, _patient_files(resolved / SLICES_DIR, split))
    return VolumeSliceSource("acdc", resolved, split, acdc_volumes(resolved, split))
