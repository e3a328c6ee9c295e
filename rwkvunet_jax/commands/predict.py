"""``rwkvunet predict``: segment images, slices and volumes with a checkpoint.

Inputs (any size):
  * PNG / JPEG / BMP / TIFF images: read as RGB or grey (whichever the model takes), scaled to [0, 1]
    (8-bit / 255; 16-bit grey / 65535, never clipped to 8 bits; float images must lie in [0, 1]);
    bilinear resize to the network size. Mask written as ``<name>_mask.png`` (pixel value = class index).
  * ``.npy`` / ``.npz`` 2-D slices (H, W) or (H, W, C), values used as stored (e.g. Synapse slices in [0, 1]);
    ``.npz`` reads the array ``image`` (else the first array). Cubic resize. Mask written as
    ``<name>_mask.npy`` / ``<name>_mask.npz`` (key ``label``).
  * NIfTI volumes (``.nii``, ``.nii.gz``): segmented slice by slice along the LAST axis as stored (axial for
    most CT/MR files), cubic resize; trailing axes of length 1, e.g. (X, Y, Z, 1), are dropped, real 4-D data
    is refused. Mask written as ``<name>_mask.nii.gz`` with the input's shape, affine and header. Raw CT
    needs the training intensity window: ``--window -125 275`` clips and scales to [0, 1] (the Synapse
    preprocessing); the window applies to the stored values of every kind of input.
Every input is resized to the network size and the predicted label map is resized back with nearest
neighbour ("any size" by resizing; no sliding window). An overlay PNG is written beside every mask
(``<name>_overlay.png``; for volumes, the slice with the most foreground). A constant input, or a 16-bit
image using a small part of its range, gets a warning on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from rwkvunet_jax.commands.parsing import command_parser

    parser = command_parser("rwkvunet predict", __doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image, .npy/.npz slice or NIfTI volume files")
    parser.add_argument("--checkpoint", required=True, help="checkpoint or fine-tuning work directory")
    parser.add_argument("--outdir", default="predictions", help="output folder (default: ./predictions)")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="network input size (default: the size the checkpoint was trained at, else 224 224)")
    parser.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="clip the stored values of every input to [LOW, HIGH] and scale to [0, 1]")
    from rwkvunet_jax.eval.inference import TTA_MODES

    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--tta", action="store_true",
                     help="the paper's test-time augmentation: logits averaged over the identity and a horizontal flip")
    tta.add_argument("--tta-mode", choices=TTA_MODES, default=None,
                     help="test-time augmentation mode (hv_probs: probabilities over identity, h and v flips)")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass (default 8)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from rwkvunet_jax import checkpoint as ckpt
    from rwkvunet_jax.eval.inference import model_predict_fn, tta_mode
    from rwkvunet_jax.eval.predictor import Predictor, check_input

    try:
        inputs = [check_input(Path(p)) for p in args.inputs]
        if args.window is not None and not args.window[1] > args.window[0]:
            raise ValueError(f"--window needs LOW < HIGH, got {args.window[0]:g} {args.window[1]:g}")
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
                          batch_size=args.batch_size, tta=tta_mode(args.tta_mode or args.tta), window=args.window,
                          warn=lambda message: print(f"rwkvunet predict: warning: {message}", file=sys.stderr))
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
