r"""GlaS gland segmentation (histology), the paper's Table 5 (binary segmentation).

    rwkvunet finetune --config configs/glas.py:b --workdir runs/glas_b \
        --config.data.root=data/GlaS --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/glas.py:b --checkpoint runs/glas_b

Data: ``train_<n>.bmp`` + ``train_<n>_anno.bmp``, ``testA_*``/``testB_*``; official test set, training set split
9:1 into train/val by ``data.split_seed``.
Recipe: the paper's for the binary datasets, ``binary_config`` in configs/common.py (256x256 RGB, 300
epochs, batch 8, AdamW lr 1e-4 cosine to 1e-5, sigmoid output with 0.5 BCE + 1 Dice, best validation Dice tested).
Augmentation ``binary`` (flips, rot90, small rotations, brightness/contrast) is our choice: neither the
paper nor the official code gives one. No TTA (the paper uses it for Synapse and ACDC only).
The paper averages three random splits: repeat with ``--config.data.split_seed=1`` and ``=2``.

Paper (Dice %): RWKV-UNet (b) 92.35 +- 0.07, -S 92.11 +- 0.16, -T 91.96 +- 0.31 (mean +- std over three random splits).
"""

import pathlib
import runpy
import types

# configs/ is not a package and never imports the library: load the shared helpers from the file next to this one.
common = types.SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("common.py"))))

PAPER_DICE = {'t': 91.96, 's': 92.11, 'b': 92.35}


def get_config(arg=None):
    size, _ = common.parse_arg(arg)  # the official code has no binary-dataset script; ",official" changes nothing
    return common.binary_config(dataset="glas", size=size, root="data/GlaS", paper_dice=PAPER_DICE)
