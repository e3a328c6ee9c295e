"""The ``rwkvunet`` command line.

Thin by design: it picks the subcommand and hands the remaining arguments to
``rwkvunet_jax.commands.<name>.main(argv)``, which parses them and calls library code.
Subcommand modules are imported only when used, so ``rwkvunet info`` never imports grain or torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "info": "model sizes: parameters and FLOPs, beside the paper's figures",
    "demo": "generate a phantom dataset, fine-tune rwkv_unet_t on CPU, evaluate, export",
    "finetune": "fine-tune a segmentation model from a config (configs/<dataset>.py:<size>)",
    "evaluate": "evaluate a segmentation checkpoint (per-class Dice and HD95)",
    "predict": "segment images, slices or volumes with a checkpoint",
    "pretrain": "ImageNet-1K pretraining of an encoder (sharded, multi-host)",
    "convert": "convert checkpoints between Orbax and PyTorch (official state_dict)",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: rwkvunet <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run 'rwkvunet <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rwkvunet`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rwkvunet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"rwkvunet_jax.commands.{name}")
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
