"""``rwkvunet demo``: generate a phantom dataset, fine-tune RWKV-UNet-T on the CPU, evaluate, export.

    rwkvunet demo --workdir runs/demo            # the full demo (settings: configs/demo.py)
    rwkvunet demo --workdir /tmp/d --steps 4 --num-train 16 --num-val 4 --num-test 4   # a quick smoke run
    rwkvunet demo --workdir runs/demo_chunked --config.model.wkv_impl=chunked          # any config field

Writes into WORKDIR: data/ (the phantom dataset), checkpoints/ and checkpoints_best/ (Orbax), metrics.json
(mean Dice and HD95 over the foreground classes of the held-out test images, per class and per image),
eval/ (metrics.csv, overlays/), progress.png, metrics.jsonl/.csv, tensorboard/, and
export/rwkv_unet_t.pth (the official PyTorch state_dict layout) when torch is installed.
Rerunning the same command resumes an interrupted demo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "demo.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvunet demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="output folder")
    parser.add_argument("--config", default=str(CONFIG_FILE), help="demo config file (default: configs/demo.py)")
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


def load_demo_config(path: str | Path, args: argparse.Namespace, overrides: list[str] | None = None):
    """The demo config with the ``--config.*`` ``overrides`` and then the command-line settings applied (steps
    and intervals scale together)."""
    from rwkvunet_jax.train.cli_config import parse_config_argv

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo config not found: {path} (run from a source checkout or pass --config)")
    config, _ = parse_config_argv([f"--config={path}", *(overrides or [])], prog="rwkvunet demo")
    with config.unlocked():
        if args.steps is not None:
            if args.steps < 1:
                raise ValueError(f"--steps must be >= 1, got {args.steps}")
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
    return config


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
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (config fields: --config.FIELD=VALUE)")
    start = time.perf_counter()
    workdir = Path(args.workdir).absolute()
    try:
        config = load_demo_config(args.config, args, overrides)
        if config.data.image_size[0] % 16:
            raise ValueError(f"--image-size must be a multiple of 16, got {config.data.image_size[0]}")
        workdir.mkdir(parents=True, exist_ok=True)
        root = prepare_data(workdir / "data", config.phantom)
        with config.unlocked():
            config.data.root = str(root)
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvunet demo: {err}", file=sys.stderr)
        return 2
    print(f"phantom dataset: {root} ({config.phantom.num_train} train / {config.phantom.num_val} val / "
          f"{config.phantom.num_test} test images, {config.phantom.image_size[0]}x{config.phantom.image_size[1]}, "
          f"{config.phantom.num_classes - 1} organs)")

    from rwkvunet_jax.train.finetune import train_and_evaluate

    summary = train_and_evaluate(config, workdir, progress=not args.no_progress)
    metrics = summary["metrics"]
    (workdir / "metrics.json").write_text((workdir / "eval" / "metrics.json").read_text())
    export = "skipped (--no-export)" if args.no_export else export_torch(workdir)
    minutes = (time.perf_counter() - start) / 60
    per_class = ", ".join(f"{k} {v['dice']:.3f}" for k, v in metrics["per_class"].items())
    print("\n".join([
        "",
        f"RWKV-UNet-T demo finished in {minutes:.1f} min ({summary['step']} steps)",
        f"held-out mean Dice {metrics['mean_dice']:.4f} ({per_class}); mean HD95 {metrics['mean_hd95']:.2f} px",
        f"  metrics        {workdir / 'metrics.json'}",
        f"  per image      {workdir / 'eval' / 'metrics.csv'}",
        f"  overlays       {workdir / 'eval' / 'overlays'}",
        f"  progress plot  {workdir / 'progress.png'}",
        f"  checkpoints    {workdir / 'checkpoints'} (best: {workdir / 'checkpoints_best'})",
        f"  logs           {workdir / 'metrics.jsonl'}, {workdir / 'tensorboard'}",
        f"  PyTorch export {export}",
        f"  data           {root}",
    ]))
    json.dumps(metrics)  # fail loudly here, not in a reader, if anything is not JSON-able
    return 0
