r"""BUSI breast ultrasound (benign, malignant and normal; lesion vs background), the paper's Table 5 (binary
segmentation).

    rwkvunet finetune --config configs/busi.py:b --workdir runs/busi_b \
        --config.data.root=data/BUSI --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/busi.py:b --checkpoint runs/busi_b

Data: ``{benign,malignant,normal}/<name>.png`` + ``<name>_mask*.png`` (normal included, as in the paper); split
8:1:1 by ``data.split_seed``.
Recipe: the paper's for the binary datasets, ``binary_config`` in configs/common.py (256x256 RGB, 300
epochs, batch 8, AdamW lr 1e-4 cosine to 1e-5, sigmoid output with 0.5 BCE + 1 Dice, best validation Dice tested).
Augmentation ``binary`` (flips, rot90, small rotations, brightness/contrast) is our choice: neither the
paper nor the official code gives one. No TTA (the paper uses it for Synapse and ACDC only).
The paper averages three random splits: repeat with ``--config.data.split_seed=1`` and ``=2``.

Paper (Dice %): RWKV-UNet (b) 81.92 +- 0.82, -S 80.92 +- 1.74, -T 79.47 +- 1.35 (mean +- std over three random splits).
"""

import pathlib
import runpy
import types

# configs/ is not a package and never imports the library: load the shared helpers from the file next to this one.
common = types.SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("common.py"))))

PAPER_DICE = {'t': 79.47, 's': 80.92, 'b': 81.92}


def get_config(arg=None):
    size, _ = common.parse_arg(arg)  # the official code has no binary-dataset script; ",official" changes nothing
    return common.binary_config(dataset="busi", size=size, root="data/BUSI", paper_dice=PAPER_DICE)
