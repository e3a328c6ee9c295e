r"""Synapse multi-organ CT (8 organs + background), the paper's Table 3.

    rwkvunet finetune --config configs/synapse.py:b --workdir runs/synapse_b \
        --config.data.root=data/Synapse --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/synapse.py:b --checkpoint runs/synapse_b

Data: the TransUNet release (``train_npz/*.npz`` slices, ``test_vol_h5/*.npy.h5`` volumes). The case lists
(``train.txt``, ``test_vol.txt``) sit in TransUNet's checkout: pass ``--config.data.list_dir=TransUNet/lists/lists_Synapse``
(or copy ``lists_Synapse/`` beside the data); without them every file of the folders is used, with a warning.
Presets (``:<size>[,official]``):

``:b`` (default; the paper's recipe, Implementation Details, with the official code of Jan-Feb 2025 where the
paper is silent): 224x224, 30 epochs, batch 24, AdamW lr 1e-3 with cosine annealing to 0, loss 0.5 CE + 0.5 Dice;
weight decay 1e-3 from the official script (the paper gives none). Augmentation: TransUNet's ``RandomGenerator``
as the Jan-Feb 2025 ``dataset_synapse.py`` ran it (``data.augment="transunet"``): p 0.5 rot90 + flip, else p 0.5
rotation by an integer angle in [-20, 19] degrees (order 0 for image and label), then a cubic image resize
(``data.image_order=3``; the 512x512 slices shrink to 224). Test: horizontal-flip TTA with the mean of the logits
(``eval.tta="hflip_logits"``, the official test script's ttach wrapper); ``--config.eval.tta=hv_probs`` gives
today's h+v flips with the mean of the probabilities (flips swap the left and right kidney, so the modes differ).
There is no validation split (the official run keeps the last epoch). Test: the 12 volumes, slice-wise at 224
(cubic resize in, nearest back), Dice and HD95 per organ, mean over cases then organs.

``:b,official``: the official train.py of Oct 2025 instead: the per-iteration poly schedule
lr = 1e-3 (1 - it / max_it)^0.9 (``optim.schedule="poly"``; the Jan-Feb 2025 trainer wrote it into the optimizer
too), its augmentation (``data.augment="synapse"``: p 0.1 brightness/contrast, p 0.1 crop, nearest resize) and
no TTA.

Paper (Table 3, mean DSC % / HD95 mm): RWKV-UNet (b) 84.02 / 15.70, -S 82.20 / 21.16, -T 81.58 / 17.83.
Per organ, DSC % (aorta, gallbladder, kidney L, kidney R, liver, pancreas, spleen, stomach):
(b) 89.53, 68.94, 87.63, 84.07, 95.57, 69.38, 90.95, 86.09; -S 89.36, 67.60, 84.11, 79.26, 95.60, 68.86, 91.58,
81.21; -T 89.28, 64.18, 86.03, 83.76, 95.09, 63.50, 90.36, 80.44.
"""

import pathlib
import runpy
import types

# configs/ is not a package and never imports the library: load the shared helpers from the file next to this one.
common = types.SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("common.py"))))

PAPER = {"t": (81.58, 17.83), "s": (82.20, 21.16), "b": (84.02, 15.70)}
# TransUNet's label order.
CLASS_NAMES = ("background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen",
               "stomach")


def get_config(arg=None):
    size, recipe = common.parse_arg(arg)
    official = recipe == "official"
    # Paper time: TransUNet's rot90/flip or rotation in [-20, 19] degrees, cubic image resize; Oct 2025: p 0.1
    # brightness/contrast, p 0.1 crop, nearest resize.
    augment = dict(augment="synapse", image_order=0, rotate_degrees=0) if official else \
        dict(augment="transunet", image_order=3, rotate_degrees=20)
    c = common.base_config(dataset="synapse", size=size, root="data/Synapse", num_classes=9, in_chans=1,
                           image_size=(224, 224), protocol="volume", class_names=CLASS_NAMES, **augment)
    c.data.val_split = ""
    c.epochs = 30
    c.batch_size = 24
    c.optim.lr = 1e-3
    c.optim.min_lr = 0.0
    c.optim.weight_decay = 1e-3
    c.optim.schedule = "poly" if official else "cosine"
    c.loss.ce_weight = 0.5
    c.loss.dice_weight = 0.5
    c.eval.every_epochs = 0.0
    c.eval.tta = "none" if official else "hflip_logits"
    c.eval.batch_size = 24
    c.paper.mean_dice, c.paper.mean_hd95 = PAPER[size]
    return c
