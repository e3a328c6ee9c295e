r"""Kvasir-SEG polyps, the paper's Table 5 (binary segmentation).

    rwkvunet finetune --config configs/kvasir_seg.py:b --workdir runs/kvasir_seg_b \
        --config.data.root=data/Kvasir-SEG --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/kvasir_seg.py:b --checkpoint runs/kvasir_seg_b

Data: ``images/`` + ``masks/``; split 8:1:1 by ``data.split_seed``.
Recipe (paper, Implementation Details): 256x256 RGB, 300 epochs, batch 8, AdamW lr 1e-4 with cosine annealing
to 1e-5, one sigmoid output with 0.5 BCE + 1 Dice; validation Dice every epoch, the best checkpoint is tested
(Dice and IoU per image, mean over the test split). Weight decay 1e-2 (not stated; torch AdamW's default).
Augmentation (not given by the paper or the official code; our choice): flips, rot90, small rotations,
brightness/contrast.
The paper averages three random splits: repeat with ``--config.data.split_seed=1`` and ``=2``.

Paper (Dice %): RWKV-UNet (b) 91.26 +- 1.27, -S 91.78 +- 1.24, -T 91.26 +- 2.13 (mean +- std over three random splits).
"""

import importlib.util
import pathlib

PAPER_DICE = {'t': 91.26, 's': 91.78, 'b': 91.26}


def _common():
    path = pathlib.Path(__file__).with_name("common.py")
    spec = importlib.util.spec_from_file_location("_rwkvunet_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    common = _common()
    size, _ = common.parse_arg(arg)  # the official code has no binary-dataset script; ",official" changes nothing
    return common.binary_config(dataset="kvasir_seg", size=size, root="data/Kvasir-SEG", paper_dice=PAPER_DICE)
