r"""GlaS gland segmentation (histology), the paper's Table 5 (binary segmentation).

    rwkvunet finetune --config configs/glas.py:b --workdir runs/glas_b \
        --config.data.root=data/GlaS --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/glas.py:b --checkpoint runs/glas_b

Data: ``train_<n>.bmp`` + ``train_<n>_anno.bmp``, ``testA_*``/``testB_*``; official test set, training set split
9:1 into train/val by ``data.split_seed``.
Recipe (paper, Implementation Details): 256x256 RGB, 300 epochs, batch 8, AdamW lr 1e-4 with cosine annealing
to 1e-5, one sigmoid output with 0.5 BCE + 1 Dice; validation Dice every epoch, the best checkpoint is tested
(Dice and IoU per image, mean over the test split). Weight decay 1e-2 (not stated; torch AdamW's default).
Augmentation (not given by the paper or the official code; our choice): flips, rot90, small rotations,
brightness/contrast.
The paper averages three random splits: repeat with ``--config.data.split_seed=1`` and ``=2``.

Paper (Dice %): RWKV-UNet (b) 92.35 +- 0.07, -S 92.11 +- 0.16, -T 91.96 +- 0.31 (mean +- std over three random splits).
"""

import importlib.util
import pathlib

PAPER_DICE = {'t': 91.96, 's': 92.11, 'b': 92.35}


def _common():
    path = pathlib.Path(__file__).with_name("common.py")
    spec = importlib.util.spec_from_file_location("_rwkvunet_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    common = _common()
    size, _ = common.parse_arg(arg)  # the official code has no binary-dataset script; ",official" changes nothing
    return common.binary_config(dataset="glas", size=size, root="data/GlaS", paper_dice=PAPER_DICE)
