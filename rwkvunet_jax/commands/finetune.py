"""``rwkvunet finetune``: fine-tune a segmentation model from a config.

    rwkvunet finetune --config configs/<dataset>.py:<t|s|b>[,official] --workdir DIR [--config.x.y=value ...]

Examples::

    rwkvunet finetune --config configs/synapse.py:b --workdir runs/synapse_b \\
        --config.data.root=data/Synapse --config.init.encoder=pretrained/net_B.pth
    rwkvunet finetune --config configs/acdc.py:t,official --workdir runs/acdc_t --config.optim.lr=5e-4

Datasets: synapse, acdc, busi, cvc_clinicdb, cvc_colondb, kvasir_seg, isic2017, glas, demo. Rerunning the
same command after an interruption resumes from the last checkpoint in DIR with the same data order.
DIR receives checkpoints/, checkpoints_best/, metrics.jsonl/.csv, tensorboard/, progress.png, config.json
and eval_<test split>/ (test metrics and overlays, as `rwkvunet evaluate` writes them).
SIGTERM (a preemption notice) saves a checkpoint and stops. Exit codes: 0 done, 2 bad arguments or data
(too many unreadable examples: data.max_bad_fraction; the last step is checkpointed first), 3 NaN loss,
75 preempted after saving a checkpoint (rerun to continue).
"""

from __future__ import annotations

from rwkvunet_jax.commands.parsing import CommandError, add_config_argument, command_parser, parse_config_command
from rwkvunet_jax.train import PREEMPTED_EXIT_CODE  # the package's __init__ imports nothing (no JAX)

EXAMPLE = "configs/synapse.py:b (configs/<dataset>.py:<t|s|b>)"


def build_parser():
    parser = command_parser("rwkvunet finetune", __doc__)
    add_config_argument(parser, EXAMPLE)
    parser.add_argument("--workdir", help="run directory: checkpoints, logs, evaluation (required)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str]) -> int:
    config, args = parse_config_command(build_parser(), argv, example=EXAMPLE, required=["workdir"])
    from rwkvunet_jax.train.finetune import NonFiniteLossError, train_and_evaluate

    try:
        summary = train_and_evaluate(config, args.workdir, progress=not args.no_progress)
    except NonFiniteLossError as err:
        raise CommandError(str(err), exit_code=3) from err
    except (FileNotFoundError, ValueError) as err:
        raise CommandError(str(err)) from err
    if summary["preempted"]:
        print(f"preempted: checkpoint at step {summary['step']} in {summary['workdir']}; rerun to continue")
        return PREEMPTED_EXIT_CODE
    print(f"done: {summary['step']} steps in {summary['workdir']}")
    return 0
