"""``rwkvunet finetune``: fine-tune a segmentation model from a config.

    rwkvunet finetune --config configs/<dataset>.py:<t|s|b>[,official] --workdir DIR [--config.x.y=value ...]

Examples::

    rwkvunet finetune --config configs/synapse.py:b --workdir runs/synapse_b \\
        --config.data.root=data/Synapse --config.init.encoder=pretrained/net_B.pth
    rwkvunet finetune --config configs/acdc.py:t,official --workdir runs/acdc_t --config.optim.lr=5e-4

Every config field can be overridden with ``--config.<field>=<value>`` (tuples as "(1,1,2,2)"). Rerunning
the same command after an interruption resumes from the last checkpoint in DIR with the same data order.
DIR receives checkpoints/, checkpoints_best/, metrics.jsonl/.csv, tensorboard/, progress.png, config.json
and eval/ (test metrics and overlays). Exit codes: 0 done, 2 bad arguments or data, 3 NaN loss.
"""

from __future__ import annotations

import sys


def _extra_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, evaluation)", flag_values=fv)
    flags.DEFINE_boolean("progress", True, "show a progress bar", flag_values=fv)


def main(argv: list[str]) -> int:
    from rwkvunet_jax.train.cli_config import parse_command_argv

    parsed = parse_command_argv(argv, prog="rwkvunet finetune", doc=__doc__, define_extra=_extra_flags,
                                required="workdir")
    if isinstance(parsed, int):
        return parsed
    config, fv = parsed
    from rwkvunet_jax.train.finetune import NonFiniteLossError, train_and_evaluate

    try:
        summary = train_and_evaluate(config, fv.workdir, progress=fv.progress)
    except NonFiniteLossError as err:
        print(f"rwkvunet finetune: {err}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as err:
        print(f"rwkvunet finetune: {err}", file=sys.stderr)
        return 2
    print(f"done: {summary['step']} steps in {summary['workdir']}")
    return 0
