r"""ImageNet-1K pretraining of the RWKV-UNet encoders (the official recipe), plus a CPU smoke test.

Run (one host; see launch/README.md for SLURM and TPU pods)::

    rwkvunet pretrain --config configs/pretrain_imagenet.py:b --workdir runs/imagenet_b \
        --config.data.data_dir=/data/tensorflow_datasets

Arguments after the colon: ``t``, ``s``, ``b`` (``rwkv_unet_encoder_{t,s,b}``) or ``smoke`` (a tiny
encoder on a generated 10-class ImageFolder at 32x32; a few steps on a CPU: it checks the installation
and the launch, it does not learn ImageNet).

Recipe (the official pretraining logs, ``logs/pretrain_logs/log_train_{T,S,B}.txt``, EMO2 codebase):
300 epochs at 224x224, global batch 1024 (8 GPUs x 128, 1251 steps per epoch), AdamW (0.9, 0.999,
eps 1e-8), lr 1.5e-3 per 512 images scaled linearly with the batch (3e-3 at 1024), weight decay 0.05
(timm's rule: not on biases, norms and the other tensors that are 1-D in PyTorch; the token-shift mixes
``spatial_mix_k/v/r`` are (1, 1, C) there and are decayed), 20 warm-up epochs from 5e-7, per-step cosine
to 5e-7 (warm-up start and minimum scale with the batch too: 2.5e-7 per 512; the logged lr of the first
iterations, 6e-6, 1.2e-5, 1.8e-5 at iterations 50, 100, 150, pins the start at 5e-7 for 1024), label
smoothing 0.1, gradient clipping 5, EMA 0.9998, drop path 0.05, RandAugment rand-m9-mstd0.5-inc1, random
resized crop with random bilinear/bicubic, flips; colour jitter 0.4 is configured but, as in timm, only
acts when RandAugment is off; Mixup 0.8 / CutMix 1.0 configured with probability 0 (off).
Evaluation: resize 256 bicubic, centre crop 224, top-1/top-5 of the plain and EMA weights.

BatchNorm: the official run had no SyncBN, so each GPU normalised its 128 images with their own
statistics. Here the default is statistics over the whole global batch (``bn_group_size=0``, what
``jax.jit`` over a mesh gives); ``--config.bn_group_size=128`` reproduces the per-GPU groups (the running
averages then take the mean of the groups' statistics; the official run kept GPU 0's).

Official results (top-1, plain / EMA): T 76.54 / 76.54, S 80.57 / 80.77, B 81.27 / 81.73. This port
has not been run for 300 epochs; benchmarks/pretrain_throughput.py measures its speed.

The official run used fp16 AMP; here ``model.dtype="bfloat16"`` computes in bfloat16 with float32
parameters, optimizer state and loss. Set ``--config.model.dtype=float32`` for full precision.
"""

import ml_collections

SIZES = ("t", "s", "b")


def get_config(arg: str = "b") -> ml_collections.ConfigDict:
    arg = (arg or "b").lower()
    if arg not in SIZES + ("smoke",):
        raise ValueError(f"configs/pretrain_imagenet.py takes t, s, b or smoke after the colon, got {arg!r}")
    smoke = arg == "smoke"
    c = ml_collections.ConfigDict()
    c.seed = 0  # model initialisation, drop-path masks and data order (shuffle, augmentation)

    c.model = ml_collections.ConfigDict()
    c.model.name = "rwkv_unet_encoder_t" if smoke else f"rwkv_unet_encoder_{arg}"
    c.model.num_classes = 10 if smoke else 1000
    c.model.drop_path_rate = 0.05
    c.model.dtype = "float32" if smoke else "bfloat16"
    # Registry overrides (depths, widths, exp_ratios, stem_width, wkv_impl, ...); tuples, not lists.
    c.model.overrides = ml_collections.ConfigDict(
        dict(depths=(1, 1, 2, 2), widths=(8, 16, 16, 32)) if smoke else {})

    c.data = ml_collections.ConfigDict()
    c.data.source = "imagefolder" if smoke else "tfds"  # "tfds" (ArrayRecord) or "imagefolder"
    c.data.name = "imagenet2012"  # tfds dataset name
    c.data.data_dir = ""  # tfds data_dir ("" = tfds default, ~/tensorflow_datasets)
    c.data.root = ""  # ImageFolder: folder with <train_split>/ and <val_split>/ class folders
    c.data.train_split = "train"
    c.data.val_split = "val" if smoke else "validation"
    c.data.image_size = 32 if smoke else 224
    c.data.worker_count = 0 if smoke else -1  # grain worker processes per host (-1: CPU cores - 2)
    c.data.prefetch_batches = 2 if smoke else 4
    # A file that cannot be decoded or augmented is logged and replaced (metric data/bad_examples); the run
    # stops when more than this fraction of the drawn examples were bad, counted from
    # bad_fraction_min_examples drawn examples on (all processes together). 1.0 = never.
    c.data.max_bad_fraction = 0.01
    c.data.bad_fraction_min_examples = 1000
    # > 0 writes a generated ImageFolder (to data.root, or WORKDIR/fake_imagefolder) before training.
    c.data.fake_classes = 10 if smoke else 0
    c.data.fake_train_per_class = 16
    c.data.fake_val_per_class = 4

    c.aug = ml_collections.ConfigDict()
    c.aug.randaugment = "rand-m9-mstd0.5-inc1"  # "" to switch off
    c.aug.color_jitter = 0.4
    c.aug.color_jitter_with_randaugment = False
    c.aug.hflip = 0.5
    c.aug.scale = (0.08, 1.0)
    c.aug.ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.aug.interpolation = "random"  # random bilinear/bicubic per image

    c.mixup = ml_collections.ConfigDict()
    c.mixup.prob = 0.0  # the official run: configured but off
    c.mixup.mixup_alpha = 0.8
    c.mixup.cutmix_alpha = 1.0
    c.mixup.switch_prob = 0.5

    c.batch_size = 16 if smoke else 1024  # global, over all processes and devices
    c.epochs = 300
    c.total_steps = 6 if smoke else 0  # 0: epochs x steps per epoch
    c.accum_steps = 1  # micro-batches per step when the global batch does not fit
    c.bn_group_size = 0  # > 0: BatchNorm statistics per group of this many images (official: 128 per GPU)
    c.ema_decay = 0.9998  # 0: no EMA
    c.label_smoothing = 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 2e-3 if smoke else 1.5e-3  # at reference_batch; scaled linearly to batch_size
    c.optim.reference_batch = 16 if smoke else 512  # 0: lr, warmup_init_lr and min_lr used as given
    c.optim.schedule = "timm_cosine"
    c.optim.min_lr = 5e-7 if smoke else 2.5e-7  # at reference_batch
    c.optim.warmup_init_lr = 5e-7 if smoke else 2.5e-7  # at reference_batch
    c.optim.warmup_epochs = 0.0 if smoke else 20.0
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.poly_power = 0.9  # schedule "poly" only
    c.optim.period_steps = 0  # schedule "cosine_restarts" only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9  # sgd only
    c.optim.weight_decay = 0.05
    c.optim.weight_decay_mask = "timm"  # "timm": not on 1-D tensors of the official model; "all"
    c.optim.grad_clip_norm = 5.0  # 0: off

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the pure data-parallel axis (-1: the rest)
    c.mesh.fsdp = 1  # devices that also split parameters and optimizer state
    c.mesh.fsdp_params = False  # shard parameters / optimizer state over the fsdp axis
    c.mesh.fsdp_min_size = 2**14  # arrays smaller than this stay replicated

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 2 if smoke else 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every_epochs = 1.0
    c.eval.every_steps = 0 if not smoke else 6  # > 0 overrides every_epochs; both 0: no evaluation
    c.eval.batch_size = 8 if smoke else 1024  # global
    c.eval.image_size = 0  # 0: data.image_size
    c.eval.crop_pct = 0.875  # resize to image_size / crop_pct (256 for 224), centre crop

    c.log_every_steps = 1 if smoke else 50
    c.progress_bar = True

    c.debug = ml_collections.ConfigDict()
    c.debug.log_batches = False  # WORKDIR/batch_log/process_<i>.jsonl: a fingerprint per step
    c.debug.sigterm_at_step = 0  # > 0: process 0 sends itself SIGTERM after this step (rehearsal)
    return c
