"""``rwkvunet convert``: Orbax model checkpoints <-> official PyTorch state_dict files.

Orbax -> PyTorch (the model is rebuilt from the checkpoint's metadata)::

    rwkvunet convert --from runs/synapse_b --to rwkv_unet_b.pth        # or .safetensors / .npz

PyTorch -> Orbax (a full official checkpoint, or an ImageNet encoder into a segmentation model)::

    rwkvunet convert --from synapse_b.pth --to ckpt/b --model rwkv_unet_b --in-chans 1
    rwkvunet convert --from net_B.pth --to ckpt/b_init --model rwkv_unet_b --num-classes 9 --in-chans 1 --encoder-only

An existing --to is never replaced unless ``--overwrite`` is given (files only: a checkpoint directory
is never deleted). The written file loads into the official classes or ``rwkvunet_jax.torch_reference`` with
``load_state_dict(strict=True)``; the written checkpoint into ``rwkvunet_jax.checkpoint.load_model``
and every command that takes a checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rwkvunet_jax.commands.parsing import CommandError, command_parser

ORBAX_HINT = "an Orbax model checkpoint directory (written by finetune/pretrain/convert)"


def build_parser() -> argparse.ArgumentParser:
    from rwkvunet_jax.models.registry import list_models

    parser = command_parser(
        "rwkvunet convert",
        "Convert between Orbax model checkpoints and official PyTorch state_dict files "
        "(.pth/.pt, .safetensors, .npz). The direction follows from --from: a directory is read as an "
        "Orbax checkpoint and written as a file; a file is read as a state_dict and written as a checkpoint.",
    )
    parser.add_argument("--from", dest="source", required=True, help=f"{ORBAX_HINT}, or a state_dict file")
    parser.add_argument("--to", dest="target", required=True,
                        help="output file (.pth, .pt, .safetensors, .npz) or a new checkpoint directory")
    parser.add_argument("--model", choices=list_models(), help="model to build (state_dict -> checkpoint)")
    parser.add_argument("--num-classes", type=int,
                        help="output classes (default: read from final_conv/head in the file; required with "
                        "--encoder-only)")
    parser.add_argument("--in-chans", type=int,
                        help="input channels: 1 (repeated to 3, official S/B), 3, or other (default: read from the "
                        "stem; a 3-channel stem means 1 for rwkv_unet_s/b, 3 otherwise)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="architecture override as for create_model, e.g. depths=1,1,2,2 or wkv_variant=paper "
                        "(repeatable)")
    parser.add_argument("--encoder-only", action="store_true",
                        help="the file is an encoder (net_{T,S,B}.pth, or any state_dict with the encoder): load its "
                        "stage* tensors into the model's encoder, keep the fresh initialisation elsewhere")
    parser.add_argument("--non-strict", action="store_true",
                        help="load what matches and report missing/unexpected tensors instead of failing")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed of tensors not in the file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --to file (Orbax -> file)")
    parser.add_argument("--verbose", action="store_true", help="list every skipped/missing tensor")
    return parser


def parse_override(text: str) -> tuple[str, Any]:
    """``"depths=1,1,2,2"`` -> ``("depths", (1, 1, 2, 2))``; numbers become int/float, else strings."""
    if "=" not in text:
        raise ValueError(f"--override expects KEY=VALUE, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))

    def scalar(item: str) -> Any:
        for cast in (int, float):
            try:
                return cast(item)
            except ValueError:
                pass
        return item

    parts = [p.strip() for p in raw.strip("()[]").split(",") if p.strip()]
    return key, tuple(scalar(p) for p in parts) if "," in raw else scalar(raw)


def _names(names: list[str], verbose: bool, limit: int = 6) -> str:
    if verbose or len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", ... (+{len(names) - limit}; --verbose lists all)"


def _infer_num_classes(state_dict: dict[str, Any], model: str) -> int | None:
    key = "head.bias" if model.startswith("rwkv_unet_encoder_") else "final_conv.bias"
    value = state_dict.get(key)
    return None if value is None else int(value.shape[0])


def _infer_in_chans(state_dict: dict[str, Any], model: str) -> int:
    stem = state_dict.get("stage0.0.conv.conv.weight", state_dict.get("encoder.stage0.0.conv.conv.weight"))
    channels = 3 if stem is None else int(stem.shape[1])
    if channels != 3:
        return channels
    return 1 if model in ("rwkv_unet_s", "rwkv_unet_b") else 3


def orbax_to_torch(args: argparse.Namespace) -> int:
    import numpy as np

    from rwkvunet_jax.checkpoint import load_model
    from rwkvunet_jax.convert import export_torch_state_dict, official_layout, write_state_dict

    target = Path(args.target)
    if target.is_dir():
        raise CommandError(f"--to {target} is a directory; name the file to write, e.g. {target / 'model.pth'}")
    if target.exists() and not args.overwrite:
        raise CommandError(f"{target} already exists; pass --overwrite to replace it, or choose another --to")
    model = load_model(args.source)
    spec = model.spec
    state_dict = export_torch_state_dict(model)
    path = write_state_dict(state_dict, args.target)
    layout = official_layout(spec)
    dead = [e.name for e in layout if not e.used and e.kind != "count"]
    counts = [e.name for e in layout if e.kind == "count"]
    numel = sum(int(np.prod(v.shape)) for v in state_dict.values())
    print(f"wrote {path}: {len(state_dict)} tensors ({numel:,} values), official layout of {spec.name} "
          f"(num_classes={spec.num_classes}, in_chans={spec.in_chans})")
    print(f"  {len(state_dict) - len(dead) - len(counts)} tensors from checkpoint {args.source}")
    print(f"  filled {len(dead)} tensors the official forward never uses with their official initial values: "
          f"{_names(dead, args.verbose)}")
    print(f"  and {len(counts)} BatchNorm num_batches_tracked counters with 0")
    return 0


def torch_to_orbax(args: argparse.Namespace) -> int:
    from rwkvunet_jax.checkpoint import save_model
    from rwkvunet_jax.convert import load_torch_encoder, load_torch_state_dict, read_state_dict
    from rwkvunet_jax.convert.state_dict import unwrap_state_dict
    from rwkvunet_jax.models.registry import create_model

    if args.model is None:
        raise CommandError("--model is required to convert a state_dict file into a checkpoint")
    target = Path(args.target)
    if target.exists():
        raise CommandError(f"{target} already exists; choose a new checkpoint directory (checkpoints are "
                           "never overwritten)")
    state_dict = unwrap_state_dict(read_state_dict(args.source))
    num_classes = args.num_classes or (None if args.encoder_only else _infer_num_classes(state_dict, args.model))
    if num_classes is None:
        raise CommandError("pass --num-classes (the file does not tell: "
                         f"{'an encoder file' if args.encoder_only else 'no final_conv/head bias'})")
    in_chans = args.in_chans or _infer_in_chans(state_dict, args.model)
    overrides = dict(parse_override(text) for text in args.override)
    model = create_model(args.model, num_classes=num_classes, in_chans=in_chans, seed=args.seed, **overrides)
    if args.encoder_only:
        report = load_torch_encoder(model, state_dict)
    else:
        report = load_torch_state_dict(model, state_dict, strict=not args.non_strict)
    model.eval()
    path = save_model(target, model, extra_meta={"converted_from": str(Path(args.source).absolute())})
    print(f"wrote checkpoint {path}: {args.model} (num_classes={num_classes}, in_chans={in_chans}"
          + "".join(f", {k}={v}" for k, v in overrides.items()) + ")")
    print(f"  loaded {len(report.loaded)} tensors from {args.source}"
          + (" into the encoder; the rest keeps its fresh initialisation" if args.encoder_only else ""))
    print(f"  skipped {len(report.skipped)} tensors the model does not use: {_names(report.skipped, args.verbose)}")
    if report.missing:
        print(f"  missing {len(report.missing)} (kept their initialisation): {_names(report.missing, args.verbose)}")
    if report.unexpected:
        print(f"  unexpected {len(report.unexpected)} (ignored): {_names(report.unexpected, args.verbose)}")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    source = Path(args.source)
    if not source.exists():
        raise CommandError(f"--from path does not exist: {source}")
    try:
        if source.is_dir():
            return orbax_to_torch(args)
        return torch_to_orbax(args)
    except (ValueError, FileNotFoundError) as err:
        raise CommandError(str(err)) from err
