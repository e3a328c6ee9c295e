r"""ISIC 2017 skin lesions, the paper's Table 5 (binary segmentation).

    rwkvunet finetune --config configs/isic2017.py:b --workdir runs/isic2017_b \
        --config.data.root=data/ISIC2017 --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/isic2017.py:b --checkpoint runs/isic2017_b

Data: ``ISIC-2017_{Training,Validation,Test_v2}_Data`` + ``..._Part1_GroundTruth`` (official splits: 2000 / 150 / 600).
Recipe: the paper's for the binary datasets, ``binary_config`` in configs/common.py (256x256 RGB, 300
epochs, batch 8, AdamW lr 1e-4 cosine to 1e-5, sigmoid output with 0.5 BCE + 1 Dice, best validation Dice tested).
Augmentation ``binary`` (flips, rot90, small rotations, brightness/contrast) is our choice: neither the
paper nor the official code gives one. No TTA (the paper uses it for Synapse and ACDC only).

Paper (Dice %): RWKV-UNet (b) 85.32, -S 86.38, -T 85.59.
"""

import pathlib
import runpy
import types

# configs/ is not a package and never imports the library: load the shared helpers from the file next to this one.
common = types.SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("common.py"))))

PAPER_DICE = {'t': 85.59, 's': 86.38, 'b': 85.32}


def get_config(arg=None):
    size, _ = common.parse_arg(arg)  # the official code has no binary-dataset script; ",official" changes nothing
    return common.binary_config(dataset="isic2017", size=size, root="data/ISIC2017", paper_dice=PAPER_DICE)
