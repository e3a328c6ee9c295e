"""Training: one train state, step, optimizer, schedule, checkpoint format and loop for every run.

Modules: ``state`` (TrainState, ModelDef), ``step`` (the jitted train step: EMA, accumulation, BatchNorm
groups), ``optimizer`` and ``schedules`` (the ``optim`` config), ``checkpoints`` (train-state checkpoints),
``loop`` (the shared loop, preemption), ``losses``, ``sharding``, ``metric_writer``, ``config_fields``
(the shared config fields, renamed ones), and the two tasks on top: ``pretrain`` (ImageNet classifiers)
and ``finetune`` (segmentation). Nothing is imported here, so ``PREEMPTED_EXIT_CODE`` costs no JAX import.
"""

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL, "try again": a preempted run saved a checkpoint; launchers requeue on it.
