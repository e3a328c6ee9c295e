"""The ``rwkvunet`` command line.

Thin by design: it picks the subcommand and hands the remaining arguments to
``rwkvunet_jax.commands.<name>.main(argv)``, which parses them and calls library code. A
:class:`~rwkvunet_jax.commands.parsing.CommandError` from a command is printed as one line and exits 2.
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
    lines = ["usage: rwkvunet <command> [options]  |  rwkvunet --version", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run 'rwkvunet <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rwkvunet`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"rwkvunet-jax {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rwkvunet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from rwkvunet_jax.commands.parsing import CommandError

    module = importlib.import_module(f"rwkvunet_jax.commands.{name}")
    try:
        return int(module.main(rest) or 0)
    except CommandError as err:
        print(f"rwkvunet {name}: {err}", file=sys.stderr)
        return err.exit_code
    except SystemExit as done:  # argparse after printing --help
        if done.code in (None, 0):
            return 0
        raise


def version() -> str:
    """The installed distribution's version (the source tree's when it is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("rwkvunet-jax")
    except PackageNotFoundError:
        from rwkvunet_jax import __version__

        return __version__


if __name__ == "__main__":
    sys.exit(main())
