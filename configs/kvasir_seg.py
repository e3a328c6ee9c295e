r"""Kvasir-SEG polyps, the paper's Table 5 (binary segmentation).

    rwkvunet finetune --config configs/kvasir_seg.py:b --workdir runs/kvasir_seg_b \
        --config.data.root=data/Kvasir-SEG --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/kvasir_seg.py:b --checkpoint runs/kvasir_seg_b

Data: ``images/`` + ``masks/``; split 8:1:1 by ``data.split_seed``.
Recipe: the paper's for the binary datasets, ``binary_config`` in configs/common.py (256x256 RGB, 300
epochs, batch 8, AdamW lr 1e-4 cosine to 1e-5, sigmoid output with 0.5 BCE + 1 Dice, best validation Dice tested).
Augmentation ``binary`` (flips, rot90, small rotations, brightness/contrast) is our choice: neither the
paper nor the official code gives one. No TTA (the paper uses it for Synapse and ACDC only).
The paper averages three random splits: repeat with ``--config.data.split_seed=1`` and ``=2``.

Paper (Dice %): RWKV-UNet (b) 91.26 +- 1.27, -S 91.78 +- 1.24, -T 91.26 +- 2.13 (mean +- std over three random splits).
"""

import pathlib
import runpy
import types

# configs/ is not a package and never imports the library: load the shared helpers from the file next to this one.
common = types.SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("common.py"))))

PAPER_DICE = {'t': 91.26, 's': 91.78, 'b': 91.26}


def get_config(arg=None):
    size, _ = common.parse_arg(arg)  # the official code has no binary-dataset script; ",official" changes nothing
    return common.binary_config(dataset="kvasir_seg", size=size, root="data/Kvasir-SEG", paper_dice=PAPER_DICE)
