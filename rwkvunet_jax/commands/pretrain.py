"""``rwkvunet pretrain``: ImageNet-1K pretraining of an encoder (sharded, multi-host, preemption-safe).

    rwkvunet pretrain --config configs/pretrain_imagenet.py:b --workdir DIR [--config.x=y ...]
                      [--distributed auto|on|off] [--coordinator-address HOST:PORT --num-processes N --process-id I]

Presets after the colon: t, s, b (rwkv_unet_encoder_{t,s,b}, the official recipe) or smoke (a tiny encoder
on generated images, a few CPU steps). Rerunning the same command resumes from the latest checkpoint in
``DIR``. Exit codes: 0 done, 75 preempted after saving a checkpoint (rerun to continue), 2 bad arguments or
too many unreadable images (data.max_bad_fraction; the last step is checkpointed first).
"""

from __future__ import annotations

import logging

from rwkvunet_jax.train import PREEMPTED_EXIT_CODE  # the package's __init__ imports nothing (no JAX)

EXAMPLE = "configs/pretrain_imagenet.py:b (or :smoke for a CPU check)"


def build_parser():
    from rwkvunet_jax.commands.parsing import add_config_argument, command_parser

    parser = command_parser("rwkvunet pretrain", __doc__)
    add_config_argument(parser, EXAMPLE)
    parser.add_argument("--workdir", help="run directory: checkpoints, metrics, exported encoders (required)")
    parser.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                        help="join jax.distributed: auto = when the environment or the flags below describe several "
                        "processes (SLURM, Open MPI, TPU pod, JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    parser.add_argument("--coordinator-address", metavar="HOST:PORT", help="address of process 0")
    parser.add_argument("--num-processes", type=int, help="number of processes")
    parser.add_argument("--process-id", type=int, help="this process's index")
    parser.add_argument("--cpu-collectives", default="gloo", help="collectives of CPU-only processes (default gloo)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (same as "
                        "--config.progress_bar=False)")
    return parser


def main(argv: list[str]) -> int:
    from rwkvunet_jax.commands.parsing import CommandError, parse_config_command

    config, args = parse_config_command(build_parser(), argv, example=EXAMPLE, required=["workdir"])
    if args.no_progress:
        with config.unlocked():
            config.progress_bar = False
    from rwkvunet_jax.train import sharding

    # Must come before anything touches a JAX device.
    sharding.initialize_distributed(args.distributed, coordinator_address=args.coordinator_address,
                                    num_processes=args.num_processes, process_id=args.process_id,
                                    cpu_collectives=args.cpu_collectives)
    import jax

    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                        format=f"[p{jax.process_index()}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax reports every file it writes at INFO through absl; keep the run's own log readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from rwkvunet_jax.train.pretrain import train_and_evaluate

    try:
        result = train_and_evaluate(config, args.workdir)
    except (FileNotFoundError, ValueError) as err:  # bad data paths or settings, too many bad images (the
        raise CommandError(str(err)) from err        # last step is checkpointed first): one line, no traceback
    if jax.process_index() == 0:
        status = "preempted" if result.preempted else "done"
        print(f"rwkvunet pretrain: {status} at step {result.step}"
              + (f" (resumed from {result.resumed_from})" if result.resumed_from is not None else "")
              + (f"; {result.metrics}" if result.metrics else ""), flush=True)
    return PREEMPTED_EXIT_CODE if result.preempted else 0
