r"""ISIC 2017 skin lesions, the paper's Table 5 (binary segmentation).

    rwkvunet finetune --config configs/isic2017.py:b --workdir runs/isic2017_b \
        --config.data.root=data/ISIC2017 --config.init.encoder=pretrained/net_B.pth
    rwkvunet evaluate --config configs/isic2017.py:b --checkpoint runs/isic2017_b

Data: ``ISIC-2017_{Training,Validation,Test_v2}_Data`` + ``..._Part1_GroundTruth`` (official splits: 2000 / 150 / 600).
Recipe (paper, Implementation Details): 256x256 RGB, 300 epochs, batch 8, AdamW lr 1e-4 with cosine annealing
to 1e-5, one sigmoid output with 0.5 BCE + 1 Dice; validation Dice every epoch, the best checkpoint is tested
(Dice and IoU per image, mean over the test split). Weight decay 1e-2 (not stated; torch AdamW's default).
Augmentation (not given by the paper or the official code; our choice): flips, rot90, small rotations,
brightness/contrast.

Paper (Dice %): RWKV-UNet (b) 85.32, -S 86.38, -T 85.59.
"""

import importlib.util
import pathlib

PAPER_DICE = {'t': 85.59, 's': 86.38, 'b': 85.32}


def _common():
    path = pathlib.Path(__file__).with_name("common.py")
    spec = importlib.util.spec_from_file_location("_rwkvunet_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    common = _common()
    size, _ = common.parse_arg(arg)  # the official code has no binary-dataset script; ",official" changes nothing
    return common.binary_config(dataset="isic2017", size=size, root="data/ISIC2017", paper_dice=PAPER_DICE)
