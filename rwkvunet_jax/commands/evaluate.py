"""``rwkvunet evaluate``: evaluate a segmentation checkpoint on a dataset split.

    rwkvunet evaluate --config configs/<dataset>.py:<size> --checkpoint PATH [--split test] [--tta|--notta]
                      [--outdir DIR] [--config.data.root=...]

PATH is a fine-tuning work directory (its best checkpoint, else the latest), a checkpoint manager directory,
one step directory or a standalone model checkpoint. Synapse/ACDC: slice-wise inference on whole volumes
(cubic resize to the network size, nearest back), Dice and HD95 per class (TransUNet conventions), mean over
cases then classes; ``--tta`` averages the softmax over identity, horizontal and vertical flips (default: the
config's ``eval.tta``). Binary datasets: Dice and IoU per image and their means. Writes metrics.json,
metrics.csv and overlays/ into --outdir (default: <checkpoint work directory>/eval_<split>) and prints a table.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _extra_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "checkpoint or work directory", flag_values=fv)
    flags.DEFINE_string("split", None, "split to evaluate (default: the config's data.test_split)", flag_values=fv)
    flags.DEFINE_boolean("tta", None, "flip test-time augmentation (default: the config's eval.tta)", flag_values=fv)
    flags.DEFINE_string("outdir", None, "where metrics and overlays go", flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show a progress bar", flag_values=fv)


def check_model_matches_config(meta_model: dict, config) -> None:
    """Raise ValueError when the checkpoint's model cannot serve the config's dataset."""
    for field in ("num_classes", "in_chans"):
        if int(meta_model.get(field, -1)) != int(config.model[field]):
            raise ValueError(
                f"the checkpoint's model has {field}={meta_model.get(field)} but the config expects "
                f"{config.model[field]} ({config.dataset}); pass the matching config or checkpoint")


def main(argv: list[str]) -> int:
    from rwkvunet_jax.train.cli_config import parse_command_argv

    parsed = parse_command_argv(argv, prog="rwkvunet evaluate", doc=__doc__, define_extra=_extra_flags,
                                required="checkpoint")
    if isinstance(parsed, int):
        return parsed
    config, fv = parsed
    from rwkvunet_jax import checkpoint as ckpt
    from rwkvunet_jax.eval.evaluate import evaluate_dataset
    from rwkvunet_jax.eval.inference import model_predict_fn

    split = fv.split or config.data.test_split
    tta = config.eval.tta if fv.tta is None else fv.tta
    try:
        step_dir = ckpt.resolve_checkpoint(fv.checkpoint)
        check_model_matches_config(ckpt.read_meta(step_dir).get("model", {}), config)
        model = ckpt.load_model(step_dir)
        outdir = Path(fv.outdir) if fv.outdir else _default_outdir(Path(fv.checkpoint), split)
        print(f"evaluating {step_dir} on {config.dataset}/{split}")
        evaluate_dataset(
            model_predict_fn(model), dataset=config.dataset, root=Path(config.data.root).expanduser(), split=split,
            split_seed=config.data.split_seed, protocol=config.eval.protocol, num_outputs=config.model.num_classes,
            image_size=tuple(config.data.image_size), batch_size=config.eval.batch_size, tta=tta,
            class_names=tuple(config.class_names), outdir=outdir, num_overlays=config.eval.num_overlays,
            paper=dict(config.paper), progress=fv.progress, list_dir=config.data.list_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvunet evaluate: {err}", file=sys.stderr)
        return 2
    return 0


def _default_outdir(checkpoint: Path, split: str) -> Path:
    base = checkpoint if (checkpoint / "checkpoints").is_dir() or (checkpoint / "checkpoints_best").is_dir() else Path.cwd()
    return base / f"eval_{split}"
