r"""CVC-ColonDB colonoscopy polyps, the paper's Table 5 (binary segmentation).

    rwkvunet finetune --config configs/cvc_colondb.py:b --workdir runs/cvc_colondb_b \
        --config.data.root=data/CVC-ColonDB --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/cvc_colondb.py:b --checkpoint runs/cvc_colondb_b

Data: ``images/`` + ``masks/``; split 8:1:1 by ``data.split_seed``.
Recipe: the paper's for the binary datasets, ``binary_config`` in configs/common.py (256x256 RGB, 300
epochs, batch 8, AdamW lr 1e-4 cosine to 1e-5, sigmoid output with 0.5 BCE + 1 Dice, best validation Dice tested).
Augmentation ``binary`` (flips, rot90, small rotations, brightness/contrast) is our choice: neither the
paper nor the official code gives one. No TTA (the paper uses it for Synapse and ACDC only).
The paper averages three random splits: repeat with ``--config.data.split_seed=1`` and ``=2``.

Paper (Dice %): RWKV-UNet (b) 92.27 +- 2.48, -S 91.30 +- 3.21, -T 89.56 +- 5.26 (mean +- std over three random splits).
"""

import pathlib
import runpy
import types

# configs/ is not a package and never imports the library: load the shared helpers from the file next to this one.
common = types.SimpleNamespace(**runpy.run_path(str(pathlib.Path(__file__).with_name("common.py"))))

PAPER_DICE = {'t': 89.56, 's': 91.3, 'b': 92.27}


def get_config(arg=None):
    size, _ = common.parse_arg(arg)  # the official code has no binary-dataset script; ",official" changes nothing
    return common.binary_config(dataset="cvc_colondb", size=size, root="data/CVC-ColonDB", paper_dice=PAPER_DICE)
