"""Every config with every size loads through the command-line parser and carries the paper's recipe."""

from pathlib import Path

import pytest

from rwkvunet_jax.commands.parsing import CommandError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BINARY = ("busi", "cvc_clinicdb", "cvc_colondb", "kvasir_seg", "isic2017", "glas")
DATASETS = ("synapse", "acdc", *BINARY)
MODEL = {"t": "rwkv_unet_t", "s": "rwkv_unet_s", "b": "rwkv_unet_b"}

# Paper, Implementation Details and Tables 3-5 (mean DSC %).
PAPER_DICE = {
    "synapse": {"t": 81.58, "s": 82.20, "b": 84.02},
    "acdc": {"t": 90.92, "s": 91.64, "b": 92.17},
    "busi": {"t": 79.47, "s": 80.92, "b": 81.92},
    "cvc_clinicdb": {"t": 95.05, "s": 95.58, "b": 95.26},
    "cvc_colondb": {"t": 89.56, "s": 91.30, "b": 92.27},
    "kvasir_seg": {"t": 91.26, "s": 91.78, "b": 91.26},
    "isic2017": {"t": 85.59, "s": 86.38, "b": 85.32},
    "glas": {"t": 91.96, "s": 92.11, "b": 92.35},
}


def load(name, arg, *overrides):
    return load_config(f"{CONFIGS / name}.py:{arg}", overrides)


@pytest.mark.parametrize("size", ["t", "s", "b"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_every_config_and_size_follows_the_paper(dataset, size):
    c = load(dataset, size)
    assert c.dataset == dataset
    assert c.model.name == MODEL[size]
    assert c.paper.mean_dice == pytest.approx(PAPER_DICE[dataset][size])
    assert c.optim.schedule == "cosine"
    assert c.init.encoder == ""
    if dataset == "synapse":
        assert (c.data.image_size, c.epochs, c.batch_size) == ((224, 224), 30, 24)
        assert (c.optim.lr, c.optim.min_lr, c.optim.weight_decay) == (1e-3, 0.0, 1e-3)
        assert (c.loss.ce_weight, c.loss.dice_weight) == (0.5, 0.5)
        assert (c.model.num_classes, c.model.in_chans, c.eval.protocol, c.eval.tta) == (9, 1, "volume",
                                                                                          "hflip_logits")
        assert c.paper.mean_hd95 == pytest.approx({"t": 17.83, "s": 21.16, "b": 15.70}[size])
        # TransUNet's RandomGenerator of the Jan-Feb 2025 dataset_synapse.py: cubic image resize.
        assert (c.data.augment, c.data.image_order, c.data.rotate_degrees) == ("transunet", 3, 20)
        assert len(c.class_names) == 9
    elif dataset == "acdc":
        assert (c.data.image_size, c.epochs, c.batch_size) == ((224, 224), 150, 24)
        # Per-iteration cosine over the whole run (T_max = 150 epochs) to 0; Jan-Feb 2025 AdamW weight decay.
        assert (c.optim.lr, c.optim.min_lr, c.optim.weight_decay, c.optim.warmup_steps) == (5e-4, 0.0, 1e-4, 0)
        assert (c.loss.ce_weight, c.loss.dice_weight) == (0.3, 0.7)
        assert (c.model.num_classes, c.model.in_chans, c.eval.protocol, c.eval.tta) == (4, 1, "volume",
                                                                                          "hflip_logits")
        assert c.eval.every_steps == 100 and c.data.val_split == "val"
        # The Jan-Feb 2025 dataset_acdc.py: the same RandomGenerator but a nearest image resize.
        assert (c.data.augment, c.data.image_order, c.data.rotate_degrees) == ("transunet", 0, 20)
    else:
        assert (c.data.image_size, c.epochs, c.batch_size) == ((256, 256), 300, 8)
        assert (c.optim.lr, c.optim.min_lr) == (1e-4, 1e-5)
        assert (c.loss.ce_weight, c.loss.dice_weight) == (0.5, 1.0)
        assert (c.model.num_classes, c.model.in_chans, c.eval.protocol) == (1, 3, "image")
        assert (c.data.augment, c.data.image_order, c.data.rotate_degrees) == ("binary", 1, 15)


def test_official_options_reproduce_the_official_scripts():
    synapse = load("synapse", "b,official")
    assert synapse.optim.schedule == "poly" and synapse.optim.poly_power == 0.9 and synapse.eval.tta == "none"
    assert (synapse.data.augment, synapse.data.image_order) == ("synapse", 0)
    acdc = load("acdc", "s,official")
    assert acdc.optim.schedule == "cosine_restarts" and acdc.optim.min_lr == 1e-6
    assert (acdc.loss.ce_weight, acdc.loss.dice_weight, acdc.loss.ignore_index) == (0.2, 0.8, 4)
    assert acdc.optim.weight_decay == 1.5e-4
    assert (acdc.data.augment, acdc.data.image_order, acdc.data.rotate_degrees) == ("acdc", 0, 30)


def test_every_field_can_be_overridden_on_the_command_line():
    c = load("synapse", "b", "--config.optim.lr=5e-4", "--config.model.depths=(1,1,2,2)",
             "--config.data.root=/data/x", "--config.eval.tta=hv_probs", "--config.data.image_order=1")
    assert c.optim.lr == 5e-4 and c.model.depths == (1, 1, 2, 2) and c.data.root == "/data/x"
    assert c.eval.tta == "hv_probs" and c.data.image_order == 1


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="model size"):
        load("synapse", "xl")
    with pytest.raises(ValueError, match="official"):
        load("synapse", "b,fast")
    with pytest.raises(ValueError, match="lrr"):
        load("synapse", "b", "--config.optim.lrr=1")


def test_demo_config_trains_rwkv_unet_t_on_the_phantom():
    c = load("demo", "t")
    assert c.model.name == "rwkv_unet_t" and c.dataset == "phantom"
    assert c.data.image_size == c.phantom.image_size and c.model.num_classes == c.phantom.num_classes
    assert len(c.class_names) == c.model.num_classes


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.py")), ids=lambda p: p.name)
def test_configs_do_not_import_the_package_and_document_the_command(path):
    text = path.read_text()
    assert "import rwkvunet_jax" not in text and "from rwkvunet_jax" not in text
    if path.name not in ("common.py", "pretrain_imagenet.py"):
        assert "rwkvunet " in text.split('"""')[1], f"{path.name}: the docstring should give the command"


def test_acdc_feb2025_is_the_official_trainer_when_the_paper_was_made():
    c = load("acdc", "b,feb2025")
    assert (c.optim.schedule, c.optim.period_steps, c.optim.min_lr, c.optim.weight_decay) == (
        "cosine_restarts", 150, 0.0, 1e-4)  # CosineAnnealingLR(T_max=epochs, eta_min=0) stepped per iteration
    assert (c.loss.ce_weight, c.loss.dice_weight, c.eval.tta) == (0.3, 0.7, "hflip_logits")
    assert load("acdc", "b,feb2025", "--config.epochs=100").optim.period_steps == 100
    official = load("acdc", "b,official", "--config.epochs=100")
    assert official.optim.period_steps == 75 and official.optim.weight_decay == 1.5e-4  # 3 * epochs // 4
    with pytest.raises(ValueError, match="feb2025"):
        load("acdc", "b,jan")
    with pytest.raises(ValueError, match="official"):
        load("synapse", "b,feb2025")


def _fields(config, prefix=""):
    out = set()
    for key, value in config.items():
        name = f"{prefix}{key}"
        out |= _fields(value, name + ".") if hasattr(value, "items") and key != "paper" else {name}
    return out


def test_finetune_and_pretrain_configs_share_one_vocabulary():
    pretrain = _fields(load("pretrain_imagenet", "b"))
    finetune = _fields(load("synapse", "b"))
    shared = {"seed", "batch_size", "epochs", "total_steps", "accum_steps", "bn_group_size", "ema_decay",
              "log_every_steps", "data.root", "data.worker_count", "data.train_split", "data.val_split",
              "data.image_size", "data.max_bad_fraction", "data.bad_fraction_min_examples", "eval.every_steps", "eval.every_epochs", "eval.batch_size", "checkpoint.every_steps",
              "checkpoint.keep", "checkpoint.async_save", "debug.log_batches", "debug.sigterm_at_step",
              "model.name", "model.num_classes", "model.drop_path_rate", "model.dtype"}
    optim = {f for f in pretrain if f.startswith("optim.")}
    assert optim == {f for f in finetune if f.startswith("optim.")}
    assert shared <= pretrain and shared <= finetune, (shared - pretrain, shared - finetune)


def test_old_field_names_get_a_message_naming_the_new_one():
    from rwkvunet_jax.train.config_fields import RENAMED, check_common_fields, renamed_override_message

    for old, new in RENAMED.items():
        message = renamed_override_message(["--workdir=x", f"--config.{old}=1"])
        assert message is not None and old in message and new in message and "\n" not in message
        new_field = new.split("=")[0].split()[0]
        for name in ("pretrain_imagenet", "synapse"):
            fields = _fields(load(name, "b"))
            assert old not in fields and new_field in fields, (name, old, new_field)
            with pytest.raises(CommandError) as refused:  # the override names the new field
                load(name, "b", f"--config.{old}=1")
            assert str(refused.value) == message and "no config field" not in message
    assert renamed_override_message(["--config.optim.lr=1", "--config.model.depths=(1,1,2,2)"]) is None
    old_file = load("synapse", "b")  # a config written before the rename still reads, and is told
    with old_file.unlocked():
        old_file.optim.base_lr = 1e-3
    with pytest.raises(ValueError, match="optim.base_lr.*optim.lr"):
        check_common_fields(old_file)
    check_common_fields(load("synapse", "b"))
    check_common_fields(load("pretrain_imagenet", "b"))


def test_acdc_learning_rates_follow_torch_cosine_annealing_per_iteration():
    import math

    from rwkvunet_jax.train.optimizer import schedule_from_config

    def torch_cosine(step, t_max, lr=5e-4):  # CosineAnnealingLR's closed form, eta_min 0
        return lr * (1 + math.cos(math.pi * step / t_max)) / 2

    steps_per_epoch = 55  # ACDC's ~1312 training slices / batch 24
    total = 150 * steps_per_epoch
    for preset, t_max in (("b", total), ("b,feb2025", 150)):  # T_max = 150 epochs vs 150 iterations
        c = load("acdc", preset)
        schedule = schedule_from_config(c.optim, batch_size=c.batch_size, steps_per_epoch=steps_per_epoch,
                                        total_steps=total)
        for step in (0, 75, 150, 300, 1000, total // 2, total - 1):
            assert float(schedule(step)) == pytest.approx(torch_cosine(step, t_max), rel=1e-4, abs=1e-9), (preset, step)
