"""``rwkvunet pretrain``: ImageNet-1K pretraining of an encoder (sharded, multi-host, preemption-safe).

    rwkvunet pretrain --config configs/pretrain_imagenet.py:b --workdir DIR [--config.x=y ...]
                      [--distributed auto|on|off] [--coordinator_address HOST:PORT --num_processes N --process_id I]

Rerunning the same command resumes from the latest checkpoint in ``DIR``. Exit codes: 0 done,
75 preempted after saving a checkpoint (rerun to continue), 2 bad arguments or too many unreadable
images (data.max_bad_fraction; the last step is checkpointed first).
"""

from __future__ import annotations

import logging
import sys

PREEMPTED_EXIT_CODE = 75  # == rwkvunet_jax.train.pretrain.PREEMPTED_EXIT_CODE (not imported: it pulls in JAX)


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, exported encoders)", flag_values=fv)
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                      "join jax.distributed: auto = when the environment or the flags below describe several "
                      "processes (SLURM, Open MPI, TPU pod, JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)",
                      flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)
    flags.DEFINE_string("cpu_collectives", "gloo", "collectives of CPU-only processes", flag_values=fv)


def main(argv: list[str]) -> int:
    from rwkvunet_jax.train.cli_config import parse_command_argv

    parsed = parse_command_argv(argv, prog="rwkvunet pretrain", doc=__doc__, define_extra=_define_flags,
                                required="workdir", required_hint=" (e.g. --workdir runs/smoke)")
    if isinstance(parsed, int):
        return parsed
    config, fv = parsed
    from rwkvunet_jax.train import sharding

    # Must come before anything touches a JAX device.
    sharding.initialize_distributed(fv.distributed, coordinator_address=fv.coordinator_address,
                                    num_processes=fv.num_processes, process_id=fv.process_id,
                                    cpu_collectives=fv.cpu_collectives)
    import jax

    logging.basicConfig(level=logging.INFO if jax.process_index() == 0 else logging.WARNING,
                        format=f"[p{jax.process_index()}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    # Orbax reports every file it writes at INFO through absl; keep the run's own log readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from rwkvunet_jax.data.bad_examples import BadDataError
    from rwkvunet_jax.train.pretrain import train_and_evaluate

    try:
        result = train_and_evaluate(config, fv.workdir)
    except BadDataError as err:  # the last step is checkpointed; say why in one line
        print(f"rwkvunet pretrain: {err}", file=sys.stderr, flush=True)
        return 2
    if jax.process_index() == 0:
        status = "preempted" if result.preempted else "done"
        print(f"rwkvunet pretrain: {status} at step {result.step}"
              + (f" (resumed from {result.resumed_from})" if result.resumed_from is not None else "")
              + (f"; {result.metrics}" if result.metrics else ""), flush=True)
    return PREEMPTED_EXIT_CODE if result.preempted else 0
