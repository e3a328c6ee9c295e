"""Shortcut for the segmentation metrics: ``from rwkvunet_jax.metrics import dice_hd95``."""

from rwkvunet_jax.eval.metrics import dice, dice_hd95, dice_iou, hd95, mean_dice_iou, per_class_dice_hd95  # noqa: F401
