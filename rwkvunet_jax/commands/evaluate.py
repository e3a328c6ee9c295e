"""``rwkvunet evaluate``: evaluate a segmentation checkpoint on a dataset split.

    rwkvunet evaluate --config configs/<dataset>.py:<size> --checkpoint PATH [--split test]
                      [--tta|--no-tta|--tta-mode MODE] [--outdir DIR] [--config.data.root=...]

PATH is a fine-tuning work directory (its best checkpoint, else the latest), a checkpoint manager directory,
one step directory or a standalone model checkpoint. Synapse/ACDC: slice-wise inference on whole volumes
(cubic resize to the network size, nearest back), Dice and HD95 per class (TransUNet conventions), mean over
cases then classes. Test-time augmentation (default: the config's ``eval.tta``): ``--tta`` is the paper's
protocol, ``hflip_logits`` (logits averaged over the identity and a horizontal flip, as the official test
script's ttach wrapper), ``--no-tta`` is ``none``, ``--tta-mode hv_probs`` averages the probabilities over
the identity, a horizontal and a vertical flip. Binary datasets: Dice and IoU per image and their means.
Writes metrics.json, metrics.csv and overlays/ (the worst, median and best cases by Dice) into --outdir (default:
<checkpoint work directory>/eval_<split>, where `rwkvunet finetune` writes its own test evaluation) and prints
a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rwkvunet_jax.commands.parsing import CommandError, add_config_argument, command_parser, parse_config_command
from rwkvunet_jax.eval.inference import TTA_MODES, tta_mode

EXAMPLE = "configs/synapse.py:b (the config the model was fine-tuned with)"


def build_parser():
    parser = command_parser("rwkvunet evaluate", __doc__)
    add_config_argument(parser, EXAMPLE)
    parser.add_argument("--checkpoint", help="checkpoint or fine-tuning work directory (required)")
    parser.add_argument("--split", help="split to evaluate (default: the config's data.test_split)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                     help="--tta: the paper's flip TTA (hflip_logits); --no-tta: none (default: the config's eval.tta)")
    tta.add_argument("--tta-mode", choices=TTA_MODES, default=None,
                     help="test-time augmentation mode (default: the config's eval.tta)")
    parser.add_argument("--outdir", help="where metrics and overlays go (default: WORKDIR/eval_<split>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def check_model_matches_config(meta_model: dict, config) -> None:
    """Raise ValueError when the checkpoint's model cannot serve the config's dataset."""
    for field in ("num_classes", "in_chans"):
        if int(meta_model.get(field, -1)) != int(config.model[field]):
            raise ValueError(
                f"the checkpoint's model has {field}={meta_model.get(field)} but the config expects "
                f"{config.model[field]} ({config.dataset}); pass the matching config or checkpoint")


def main(argv: list[str]) -> int:
    config, args = parse_config_command(build_parser(), argv, example=EXAMPLE, required=["checkpoint"])
    from rwkvunet_jax import checkpoint as ckpt
    from rwkvunet_jax.eval.evaluate import eval_dir, evaluate_dataset
    from rwkvunet_jax.eval.inference import model_predict_fn

    split = args.split or config.data.test_split
    try:
        tta = tta_mode(args.tta_mode or (config.eval.tta if args.tta is None else args.tta))
        step_dir = ckpt.resolve_checkpoint(args.checkpoint)
        check_model_matches_config(ckpt.read_meta(step_dir).get("model", {}), config)
        model = ckpt.load_model(step_dir)
        outdir = Path(args.outdir) if args.outdir else eval_dir(_work_directory(Path(args.checkpoint)), split)
        print(f"evaluating {step_dir} on {config.dataset}/{split}")
        evaluate_dataset(
            model_predict_fn(model), dataset=config.dataset, root=Path(config.data.root).expanduser(), split=split,
            split_seed=config.data.split_seed, protocol=config.eval.protocol, num_outputs=config.model.num_classes,
            image_size=tuple(config.data.image_size), batch_size=config.eval.batch_size, tta=tta,
            class_names=tuple(config.class_names), outdir=outdir, num_overlays=config.eval.num_overlays,
            paper=dict(config.paper), progress=not args.no_progress, list_dir=config.data.list_dir)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from err
    return 0


def _work_directory(checkpoint: Path) -> Path:
    """The fine-tuning work directory ``checkpoint`` names, else the current directory."""
    is_workdir = (checkpoint / "checkpoints").is_dir() or (checkpoint / "checkpoints_best").is_dir()
    return checkpoint if is_workdir else Path.cwd()
