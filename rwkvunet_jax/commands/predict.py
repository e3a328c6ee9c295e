"""``rwkvunet predict``: segment images, slices and volumes with a checkpoint.

Inputs (any size):
  * PNG / JPEG / BMP / TIFF images: read as RGB or grey (whichever the model takes), scaled to [0, 1];
    bilinear resize to the network size. Mask written as ``<name>_mask.png`` (pixel value = class index).
  * ``.npy`` / ``.npz`` 2-D slices (H, W) or (H, W, C), values used as stored (e.g. Synapse slices in [0, 1]);
    ``.npz`` reads the array ``image`` (else the first array). Cubic resize. Mask written as
    ``<name>_mask.npy`` / ``<name>_mask.npz`` (key ``label``).
  * NIfTI volumes (``.nii``, ``.nii.gz``): segmented slice by slice along the LAST axis as stored (axial for
    most CT/MR files), cubic resize. Mask written as ``<name>_mask.nii.gz`` with the input's affine and
    header. Raw CT needs the training intensity window: ``--window -125 275`` clips and scales to [0, 1]
    (the Synapse preprocessing).
Every input is resized to the network size and the predicted label map is resized back with nearest
neighbour ("any size" by resizing; no sliding window). An overlay PNG is written beside every mask
(``<name>_overlay.png``; for volumes, the slice with the most foreground).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")


def build_parser() -> argparse.ArgumentParser:
    from rwkvunet_jax.commands.parsing import command_parser

    parser = command_parser("rwkvunet predict", __doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image, .npy/.npz slice or NIfTI volume files")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or fine-tuning work directory")
    parser.add_argument("--outdir", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="network input size (default: the size the checkpoint was trained at, else 224 224)")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="clip intensities of arrays/volumes to [LOW, HIGH] and scale to [0, 1]")
    parser.add_argument("--tta", action="store_true", help="average over identity, horizontal and vertical flips")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default 8)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from rwkvunet_jax import checkpoint as ckpt
    from rwkvunet_jax.eval.inference import model_predict_fn

    try:
        inputs = [_check_input(Path(p)) for p in args.inputs]
        step_dir = ckpt.resolve_checkpoint(args.checkpoint)
        meta = ckpt.read_meta(step_dir)
        image_size = tuple(args.image_size) if args.image_size else trained_image_size(meta)
        if image_size[0] % 16 or image_size[1] % 16:
            raise ValueError(f"--image-size must be multiples of 16, got {image_size}")
        model = ckpt.load_model(step_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvunet predict: {err}", file=sys.stderr)
        return 2
    predictor = Predictor(model_predict_fn(model), in_chans=model.spec.in_chans, image_size=image_size,
                          batch_size=args.batch_size, tta=args.tta, window=args.window)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for path in inputs:
        try:
            written = predictor.predict_file(path, outdir)
        except (OSError, ValueError) as err:
            print(f"rwkvunet predict: {path}: {err}", file=sys.stderr)
            return 2
        print(f"{path} -> {', '.join(str(w) for w in written)}")
    return 0


def trained_image_size(meta: dict) -> tuple[int, int]:
    """The network size recorded in a fine-tuning checkpoint's config, else 224x224."""
    size = ((meta.get("config") or {}).get("data") or {}).get("image_size")
    return (int(size[0]), int(size[1])) if size else (224, 224)


def _check_input(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    if _kind(path) is None:
        raise ValueError(f"unsupported input {path}: expected an image ({', '.join(IMAGE_SUFFIXES)}), "
                         f".npy/.npz or .nii/.nii.gz")
    return path


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return "array"
    return None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class Predictor:
    """Reads an input file, segments it at the network size and writes the mask and an overlay."""

    def __init__(self, predict_fn, *, in_chans: int, image_size, batch_size: int, tta: bool, window=None):
        self.predict_fn = predict_fn
        self.in_chans = in_chans
        self.image_size = tuple(image_size)
        self.batch_size = batch_size
        self.tta = tta
        self.window = window

    def segment(self, slices: np.ndarray, *, order: int) -> np.ndarray:
        """Label maps (N, H, W) of slices (N, H, W, C) at their own size (resize ``order`` in, nearest out)."""
        from rwkvunet_jax.eval.inference import labels_from_probabilities, predict_probabilities
        from rwkvunet_jax.eval.volumes import resize_slices

        slices = self._channels(slices)
        h, w = slices.shape[1:3]
        network_input = resize_slices(slices, self.image_size, order=order).astype(np.float32)
        probs = predict_probabilities(self.predict_fn, network_input, batch_size=self.batch_size, tta=self.tta)
        return resize_slices(labels_from_probabilities(probs), (h, w), order=0).astype(np.int32)

    def predict_file(self, path: Path, outdir: Path) -> list[Path]:
        from rwkvunet_jax.eval.report import save_overlay_png

        kind, stem = _kind(path), _stem(path)
        if kind == "image":
            image = self._read_image(path)
            label = self.segment(image[None], order=1)[0]
            mask_path = outdir / f"{stem}_mask.png"
            _write_png(mask_path, label)
            overlay = save_overlay_png(outdir / f"{stem}_overlay.png", image, label)
            return [mask_path, overlay]
        if kind == "array":
            image = self._apply_window(_read_array(path))
            if image.ndim == 2:
                image = image[..., None]
            if image.ndim != 3:
                raise ValueError(f"expected a 2-D slice (H, W) or (H, W, C), got shape {image.shape}")
            label = self.segment(image[None], order=3)[0]
            if path.suffix.lower() == ".npz":
                mask_path = outdir / f"{stem}_mask.npz"
                np.savez_compressed(mask_path, label=label.astype(np.uint8))
            else:
                mask_path = outdir / f"{stem}_mask.npy"
                np.save(mask_path, label.astype(np.uint8))
            overlay = save_overlay_png(outdir / f"{stem}_overlay.png", image, label)
            return [mask_path, overlay]
        return self._predict_nifti(path, outdir, stem)

    def _predict_nifti(self, path: Path, outdir: Path, stem: str) -> list[Path]:
        import nibabel as nib

        from rwkvunet_jax.eval.report import save_overlay_png

        img = nib.load(str(path))
        volume = np.asarray(img.dataobj, dtype=np.float32)
        if volume.ndim == 2:
            volume = volume[..., None]
        if volume.ndim != 3:
            raise ValueError(f"expected a 3-D NIfTI volume, got shape {volume.shape}")
        volume = self._apply_window(volume)
        slices = np.moveaxis(volume, -1, 0)[..., None]  # (Z, X, Y, 1): slices along the last axis
        labels = self.segment(slices, order=3)
        mask = np.moveaxis(labels, 0, -1).astype(np.uint8)
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        mask_path = outdir / f"{stem}_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask, img.affine, header), str(mask_path))
        z = int(np.argmax((labels > 0).reshape(len(labels), -1).sum(axis=1)))
        overlay = save_overlay_png(outdir / f"{stem}_overlay.png", slices[z], labels[z])
        return [mask_path, overlay]

    def _read_image(self, path: Path) -> np.ndarray:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if self.in_chans == 1 else "RGB")
            image = np.asarray(im, dtype=np.float32) / 255.0
        return image[..., None] if image.ndim == 2 else image

    def _apply_window(self, array: np.ndarray) -> np.ndarray:
        if self.window is None:
            return array.astype(np.float32)
        low, high = self.window
        return ((np.clip(array, low, high) - low) / (high - low)).astype(np.float32)

    def _channels(self, slices: np.ndarray) -> np.ndarray:
        c = slices.shape[-1]
        if c == self.in_chans:
            return slices
        if c == 1 and self.in_chans == 3:
            return np.repeat(slices, 3, axis=-1)
        if c == 3 and self.in_chans == 1:
            return slices.mean(axis=-1, keepdims=True)
        raise ValueError(f"input has {c} channels but the model takes {self.in_chans}")


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float32)
    with np.load(path, allow_pickle=False) as archive:
        if not archive.files:
            raise ValueError(f"{path} holds no arrays")
        key = "image" if "image" in archive.files else archive.files[0]
        return np.asarray(archive[key], dtype=np.float32)


def _write_png(path: Path, label: np.ndarray) -> None:
    from PIL import Image

    if label.max(initial=0) > 255:
        raise ValueError(f"{label.max()} classes do not fit an 8-bit PNG")
    Image.fromarray(label.astype(np.uint8)).save(path)
