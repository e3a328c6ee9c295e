"""``rwkvunet demo``: generate a phantom dataset, fine-tune RWKV-UNet-T on the CPU, evaluate, export.

    rwkvunet demo --workdir runs/demo            # the full demo (settings: configs/demo.py)
    rwkvunet demo --workdir /tmp/d --steps 4 --num-train 16 --num-val 4 --num-test 4   # a quick smoke run
    rwkvunet demo --workdir runs/demo_chunked --config.model.wkv_impl=chunked          # any config field

Writes into WORKDIR: data/ (the phantom dataset), checkpoints/ and checkpoints_best/ (Orbax), metrics.json
(mean Dice and HD95 over the foreground classes of the held-out test images, per class and per image),
eval_test/ (metrics.csv, overlays/), progress.png, metrics.jsonl/.csv, tensorboard/, and
export/rwkv_unet_t.pth (the official PyTorch state_dict layout) when torch is installed.
Rerunning the same command resumes an interrupted demo (SIGTERM saves a checkpoint first and exits
with 75); a WORKDIR holding a demo with other settings is refused (use a new WORKDIR to start afresh).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rwkvunet_jax.commands.parsing import CommandError, add_config_argument, command_parser, parse_config_command
from rwkvunet_jax.train import PREEMPTED_EXIT_CODE  # the package's __init__ imports nothing (no JAX)

DEFAULT_CONFIG = "configs/demo.py"  # the project's own when run elsewhere (commands/parsing.py)


def build_parser():
    parser = command_parser("rwkvunet demo", __doc__)
    parser.add_argument("--workdir", help="output folder (required)")
    add_config_argument(parser, DEFAULT_CONFIG, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--num-train", type=int, default=None, help="phantom training images")
    parser.add_argument("--num-val", type=int, default=None, help="phantom validation images")
    parser.add_argument("--num-test", type=int, default=None, help="phantom held-out test images")
    parser.add_argument("--image-size", type=int, default=None, help="phantom and network size (multiple of 16)")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size")
    parser.add_argument("--seed", type=int, default=None, help="data and model seed")
    parser.add_argument("--no-export", action="store_true", help="skip the PyTorch export")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def apply_demo_settings(config, args: argparse.Namespace):
    """The demo config with the command-line settings applied (steps and intervals scale together)."""
    with config.unlocked():
        if args.steps is not None:
            if args.steps < 1:
                raise CommandError(f"--steps must be >= 1, got {args.steps}")
            config.total_steps = args.steps
            config.optim.warmup_steps = min(config.optim.warmup_steps, args.steps // 4)
            config.eval.every_steps = min(config.eval.every_steps, args.steps)
            config.checkpoint.every_steps = min(config.checkpoint.every_steps, args.steps)
            config.log_every_steps = min(config.log_every_steps, args.steps)
        for field, value in (("num_train", args.num_train), ("num_val", args.num_val), ("num_test", args.num_test),
                             ("seed", args.seed)):
            if value is not None:
                config.phantom[field] = value
        if args.image_size is not None:
            config.phantom.image_size = (args.image_size, args.image_size)
        if args.batch_size is not None:
            config.batch_size = args.batch_size
        if args.seed is not None:
            config.seed = args.seed
        config.data.image_size = tuple(config.phantom.image_size)
        config.model.num_classes = config.phantom.num_classes
        config.eval.batch_size = min(config.eval.batch_size, config.phantom.num_test, config.phantom.num_val)
    if config.data.image_size[0] % 16:
        raise CommandError(f"--image-size must be a multiple of 16, got {config.data.image_size[0]}")
    return config


def check_same_run(workdir: Path, config) -> None:
    """Refuse a WORKDIR that holds a demo run made with other settings (resuming it would mix the two)."""
    saved_file = workdir / "config.json"
    if not saved_file.is_file():
        return
    saved = _flatten(json.loads(saved_file.read_text()))
    wanted = _flatten(json.loads(config.to_json()))
    differ = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if differ:
        shown = ", ".join(f"{k} {_show(saved.get(k))} -> {_show(wanted.get(k))}" for k in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise CommandError(
            f"{workdir} holds a demo run made with other settings ({shown}{more}); rerun with the settings it was "
            f"made with to resume it, or pass a new --workdir (or delete {workdir}) to start afresh")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value) -> str:
    return "(none)" if value is None else json.dumps(value)


def prepare_data(root: Path, phantom) -> Path:
    """Write the phantom dataset into ``root`` (kept if the same one is already there, else replaced)."""
    from rwkvunet_jax.data.phantom import write_phantom_dataset

    return write_phantom_dataset(root, num_train=phantom.num_train, num_val=phantom.num_val,
                                 num_test=phantom.num_test, image_size=tuple(phantom.image_size),
                                 num_classes=phantom.num_classes, seed=phantom.seed, overwrite=True)


def export_torch(workdir: Path) -> Path | str:
    """Write the best model as an official-layout PyTorch state_dict; a message if torch is missing."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return "skipped (torch is not installed: pip install torch==2.13.0)"
    from rwkvunet_jax import checkpoint as ckpt
    from rwkvunet_jax import convert

    model = ckpt.load_model(workdir)
    path = workdir / "export" / f"{model.spec.name}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    convert.write_state_dict(convert.export_torch_state_dict(model), path)
    return path


def main(argv: list[str]) -> int:
    config, args = parse_config_command(build_parser(), argv, example=DEFAULT_CONFIG, required=["workdir"])
    start = time.perf_counter()
    workdir = Path(args.workdir).absolute()
    config = apply_demo_settings(config, args)
    with config.unlocked():
        config.data.root = str(workdir / "data")
    check_same_run(workdir, config)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        root = prepare_data(workdir / "data", config.phantom)
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from err
    print(f"phantom dataset: {root} ({config.phantom.num_train} train / {config.phantom.num_val} val / "
          f"{config.phantom.num_test} test images, {config.phantom.image_size[0]}x{config.phantom.image_size[1]}, "
          f"{config.phantom.num_classes - 1} organs)")

    from rwkvunet_jax.eval.evaluate import eval_dir
    from rwkvunet_jax.train.finetune import train_and_evaluate

    summary = train_and_evaluate(config, workdir, progress=not args.no_progress)
    if summary["preempted"]:  # SIGTERM: a checkpoint was saved; the same command resumes
        print(f"preempted: checkpoint at step {summary['step']} in {workdir}; rerun to continue")
        return PREEMPTED_EXIT_CODE
    metrics = summary["metrics"]
    test_dir = eval_dir(workdir, config.data.test_split)
    (workdir / "metrics.json").write_text((test_dir / "metrics.json").read_text())
    export = "skipped (--no-export)" if args.no_export else export_torch(workdir)
    minutes = (time.perf_counter() - start) / 60
    per_class = ", ".join(f"{k} {v['dice']:.3f}" for k, v in metrics["per_class"].items())
    print("\n".join([
        "",
        f"RWKV-UNet-T demo finished in {minutes:.1f} min ({summary['step']} steps)",
        f"held-out mean Dice {metrics['mean_dice']:.4f} ({per_class}); mean HD95 {metrics['mean_hd95']:.2f} px",
        f"  metrics        {workdir / 'metrics.json'}",
        f"  per image      {test_dir / 'metrics.csv'}",
        f"  overlays       {test_dir / 'overlays'} (worst, median and best test images)",
        f"  progress plot  {workdir / 'progress.png'}",
        f"  checkpoints    {workdir / 'checkpoints'} (best: {workdir / 'checkpoints_best'})",
        f"  logs           {workdir / 'metrics.jsonl'}, {workdir / 'tensorboard'}",
        f"  PyTorch export {export}",
        f"  data           {root}",
    ]))
    json.dumps(metrics)  # fail loudly here, not in a reader, if anything is not JSON-able
    return 0
