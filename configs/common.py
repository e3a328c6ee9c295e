"""Shared pieces of the fine-tuning configs (loaded by the dataset configs; imports nothing from the package).

Every config is ``get_config(arg)`` with ``arg = "<size>"`` or ``"<size>,<recipe>"``: ``size`` is t, s or b
(RWKV-UNet-T/-S/-B) and the recipe switches from the paper's Implementation Details to another one:
``official`` is what the official training script does today (Oct 2025) where the two differ; a dataset
config may name more (``acdc``: ``feb2025``, the official code as it stood when the paper's numbers were made). Every field can be overridden on the command line,
e.g. ``--config.optim.lr=5e-4`` or ``--config.model.depths="(1,1,2,2)"``.

Fields (read by ``rwkvunet_jax.train.finetune``; the names shared with ``configs/pretrain_imagenet.py``
mean the same there):
  dataset            name for ``rwkvunet_jax.data.get_source`` / ``get_volumes``
  class_names        background first; used in metric tables
  data.root          dataset directory; data.list_dir the folder of its list files (synapse, acdc; "" = beside
                     the data, e.g. TransUNet's lists/lists_Synapse in its checkout); data.image_size (H, W)
                     network input; data.augment the training augmentation recipe ("transunet": p 0.5 rot90 +
                     flip, else p 0.5 rotation, the paper-time Synapse/ACDC recipe; "synapse", "acdc": the
                     official Oct 2025 recipes; "binary"; "none"; see rwkvunet_jax.data.augment);
                     data.image_order the spline order of the image resize (0 nearest, 1 bilinear, 3 cubic;
                     labels are always nearest); data.rotate_degrees d, the rotation range ([-d, d - 1] integer
                     degrees in the official recipes, U(-d, d) in "binary"; unused by "synapse" and "none");
                     data.split_seed (8:1:1 splits); data.{train,val,test}_split ("" = none);
                     data.worker_count (grain worker processes; 0 = threads only, -1 = CPU cores - 2);
                     data.max_bad_fraction: a training example that cannot be read or augmented is logged and
                     replaced; the run stops when more than this fraction of the drawn examples were bad
                     (checked from data.bad_fraction_min_examples drawn examples on; 1.0 = never)
  model.name/num_classes/in_chans, model.depths/widths (() = the size's default), drop_path_rate,
                     dtype ("float32" or "bfloat16" compute), wkv_impl, wkv_variant
  init.encoder       "" (from scratch), an Orbax checkpoint of an encoder/classifier/segmentation model, or an
                     official PyTorch encoder file (.pth/.pt/.safetensors)
  optim              name ("adamw" | "sgd"), lr, min_lr, warmup_init_lr (all at reference_batch, scaled
                     linearly to batch_size; reference_batch 0 = as given), schedule (cosine | timm_cosine |
                     poly | cosine_restarts | constant), poly_power, period_steps (cosine_restarts), warmup_steps
                     (or warmup_epochs when 0), weight_decay, weight_decay_mask ("all": every parameter, as the
                     official segmentation trainers; "timm"), b1, b2, eps, momentum (sgd), grad_clip_norm (0 = off)
  loss               ce_weight, dice_weight, ignore_index (-1 = none)
  batch_size, epochs, total_steps (0 = epochs * steps per epoch), seed (model, drop path, data order),
                     log_every_steps
  accum_steps        micro-batches per step (gradients averaged; BatchNorm statistics per micro-batch)
  bn_group_size      > 0: BatchNorm statistics per group of this many images; 0: the whole batch
  ema_decay          > 0: keep an EMA of the weights; validation, the best checkpoint and the test use it
  eval               protocol ("volume": slice-wise on whole volumes, Dice + HD95 per class; "image": per image),
                     every_steps / every_epochs (validation cadence; both 0 = off), tta (the final test's
                     test-time augmentation: "none"; "hflip_logits", the paper's protocol: logits averaged over
                     the identity and a horizontal flip, as the official Jan-Feb 2025 test script's ttach
                     wrapper; "hv_probs": probabilities averaged over the identity, a horizontal and a vertical
                     flip), val_tta (the same for validation), batch_size, num_overlays
  checkpoint         every_steps, keep, async_save
  debug              log_batches (a fingerprint per step in WORKDIR/batch_log), sigterm_at_step (rehearsal)
  paper              the numbers the paper reports for this dataset and size (printed next to ours)
"""

import ml_collections

SIZES = ("t", "s", "b")
MODEL_NAMES = {"t": "rwkv_unet_t", "s": "rwkv_unet_s", "b": "rwkv_unet_b"}


def parse_arg(arg, recipes=("official",)):
    """``"b"`` or ``"b,<recipe>"`` -> (size, recipe), recipe "" (the default) or one of ``recipes``."""
    tokens = [t.strip().lower() for t in (arg or "b").split(",") if t.strip()]
    size = tokens[0] if tokens else "b"
    if size not in SIZES:
        raise ValueError(f"config argument must start with a model size in {SIZES}, got {arg!r}")
    extra = tokens[1:]
    if len(extra) > 1 or (extra and extra[0] not in recipes):
        raise ValueError(f"unknown config argument(s) {extra} in {arg!r}; known recipes: {', '.join(recipes)}")
    return size, extra[0] if extra else ""


def base_config(*, dataset, size, root, num_classes, in_chans, image_size, augment, image_order, rotate_degrees,
                protocol, class_names):
    """The fields every fine-tuning config has, with neutral defaults the dataset configs then set."""
    c = ml_collections.ConfigDict()
    c.dataset = dataset
    c.class_names = tuple(class_names)
    c.data = ml_collections.ConfigDict(
        dict(root=root, image_size=tuple(image_size), augment=augment, image_order=int(image_order),
             rotate_degrees=int(rotate_degrees), split_seed=0,
             train_split="train", val_split="val", test_split="test", worker_count=0,
             max_bad_fraction=0.01, bad_fraction_min_examples=1000, list_dir="")
    )
    c.model = ml_collections.ConfigDict(
        dict(name=MODEL_NAMES[size], num_classes=num_classes, in_chans=in_chans, depths=(), widths=(),
             drop_path_rate=0.05, dtype="float32", wkv_impl="auto", wkv_variant="official")
    )
    c.init = ml_collections.ConfigDict(dict(encoder=""))
    c.optim = ml_collections.ConfigDict(
        dict(name="adamw", lr=1e-3, reference_batch=0, min_lr=0.0, warmup_init_lr=0.0, schedule="cosine",
             poly_power=0.9, period_steps=0, warmup_steps=0, warmup_epochs=0.0, weight_decay=1e-4,
             weight_decay_mask="all", b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, grad_clip_norm=0.0)
    )
    c.loss = ml_collections.ConfigDict(dict(ce_weight=0.5, dice_weight=0.5, ignore_index=-1))
    c.batch_size = 24
    c.epochs = 1
    c.total_steps = 0
    c.seed = 1234
    c.accum_steps = 1
    c.bn_group_size = 0
    c.ema_decay = 0.0
    c.log_every_steps = 20
    c.eval = ml_collections.ConfigDict(
        dict(protocol=protocol, every_steps=0, every_epochs=1.0, tta="none", val_tta="none", batch_size=24,
             num_overlays=4)
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2, async_save=True))
    c.debug = ml_collections.ConfigDict(dict(log_batches=False, sigterm_at_step=0))
    c.paper = ml_collections.ConfigDict(dict(mean_dice=-1.0, mean_hd95=-1.0))
    return c


def binary_config(*, dataset, size, root, paper_dice):
    """The paper's recipe for the binary datasets (Table 5): 256x256, 300 epochs, batch 8, lr 1e-4 -> 1e-5.

    One output channel with sigmoid + 0.5 BCE + 1 Dice (the paper's binary weights; its FLOPs are for
    one class). Weight decay is not stated in the paper: 1e-2 is torch.optim.AdamW's default.
    Augmentation (not given by the paper or the official code; our choice): flips, rot90, small rotations,
    brightness/contrast. Validation Dice every epoch; the best checkpoint is tested (Dice and IoU per image,
    mean over the test split).
    """
    c = base_config(dataset=dataset, size=size, root=root, num_classes=1, in_chans=3, image_size=(256, 256),
                    augment="binary", image_order=1, rotate_degrees=15, protocol="image",
                    class_names=("background", "foreground"))
    c.epochs = 300
    c.batch_size = 8
    c.optim.lr = 1e-4
    c.optim.min_lr = 1e-5
    c.optim.weight_decay = 1e-2
    c.loss.ce_weight = 0.5
    c.loss.dice_weight = 1.0
    c.eval.batch_size = 8
    c.eval.every_epochs = 1.0
    c.paper.mean_dice = float(paper_dice[size])
    return c
