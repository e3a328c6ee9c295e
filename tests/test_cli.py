"""The ``rwkvunet`` command line: one flag style, --help listing every flag, --version, one-line errors.

Every command runs in-process through the console entry point with its argv; an error must exit with
status 2 and print exactly one line on stderr, never a traceback.
"""

from __future__ import annotations

import io
from importlib.metadata import version
from pathlib import Path

import pytest

from rwkvunet_jax.cli import main

REPO = Path(__file__).resolve().parents[1]
SYNAPSE = str(REPO / "configs" / "synapse.py")

# The flags each subcommand documents (the specification, written out independently of the parsers).
FLAGS = {
    "info": ["--model", "--num-classes", "--in-chans", "--img-size", "--json"],
    "demo": ["--workdir", "--config", "--steps", "--num-train", "--num-val", "--num-test", "--image-size",
             "--batch-size", "--seed", "--no-export", "--no-progress", "--config.FIELD=VALUE"],
    "finetune": ["--config", "--workdir", "--no-progress", "--config.FIELD=VALUE"],
    "evaluate": ["--config", "--checkpoint", "--split", "--tta", "--no-tta", "--tta-mode", "--outdir", "--no-progress",
                 "--config.FIELD=VALUE"],
    "predict": ["--checkpoint", "--outdir", "--image-size", "--window", "--tta", "--tta-mode", "--batch-size"],
    "pretrain": ["--config", "--workdir", "--distributed", "--coordinator-address", "--num-processes",
                 "--process-id", "--cpu-collectives", "--no-progress", "--config.FIELD=VALUE"],
    "convert": ["--from", "--to", "--model", "--num-classes", "--in-chans", "--override", "--encoder-only",
                "--non-strict", "--seed", "--overwrite", "--verbose"],
}


def fails(capsys, argv: list[str]) -> str:
    """Run ``rwkvunet argv``; assert status 2 and a single stderr line; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"rwkvunet {argv[0]}: "), err
    return lines[0]


def test_version_is_the_installed_distributions(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rwkvunet-jax {version('rwkvunet-jax')}"


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_lists_every_flag(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rwkvunet {command}")
    missing = [flag for flag in FLAGS[command] if flag not in out]
    assert not missing, f"rwkvunet {command} --help does not list {missing}"


@pytest.mark.parametrize("command", ["demo", "finetune", "evaluate", "pretrain"])
def test_one_flag_style_absl_spellings_are_refused(command, capsys):
    line = fails(capsys, [command, "--config", SYNAPSE, "--noprogress"])
    assert "unrecognized arguments: --noprogress" in line and f"rwkvunet {command} --help" in line


@pytest.mark.parametrize("command, suggestion", [
    ("finetune", "configs/synapse.py:b"), ("evaluate", "configs/synapse.py:b"),
    ("pretrain", "configs/pretrain_imagenet.py:b")])
def test_a_missing_config_names_the_right_one_for_the_command(command, suggestion, capsys):
    line = fails(capsys, [command])
    assert f"--config is required, e.g. --config {suggestion}" in line


def test_missing_and_misspelt_config_files(tmp_path, capsys):
    line = fails(capsys, ["finetune", "--config", "configs/synapse2.py:b", "--workdir", str(tmp_path)])
    assert "config file not found: configs/synapse2.py; did you mean configs/synapse.py?" in line
    assert "acdc" in line and "pretrain_imagenet" in line  # the valid names
    line = fails(capsys, ["finetune", "--config", str(tmp_path / "mine.py"), "--workdir", str(tmp_path)])
    assert f"config file not found: {tmp_path / 'mine.py'}" in line


def test_configs_paths_work_from_outside_the_checkout(tmp_path, monkeypatch, capsys):
    from rwkvunet_jax.commands.parsing import load_config

    monkeypatch.chdir(tmp_path)
    assert load_config("configs/synapse.py:s").model.name == "rwkv_unet_s"
    assert load_config("acdc.py:t").dataset == "acdc"
    assert load_config("synapse:t").model.name == "rwkv_unet_t"
    # Through a command: the config loads, and the first problem is the checkpoint that is not there.
    line = fails(capsys, ["evaluate", "--config", "configs/synapse.py:b", "--checkpoint", str(tmp_path / "none")])
    assert "checkpoint path does not exist" in line


def test_unknown_preset_lists_the_valid_ones(tmp_path, capsys):
    line = fails(capsys, ["finetune", "--config", f"{SYNAPSE}:x", "--workdir", str(tmp_path)])
    assert f"--config {SYNAPSE}:x:" in line and "('t', 's', 'b')" in line
    line = fails(capsys, ["pretrain", "--config", f"{REPO / 'configs' / 'pretrain_imagenet.py'}:xl",
                          "--workdir", str(tmp_path)])
    assert "t, s, b or smoke" in line


def test_misspelt_field_gets_a_plain_suggestion(tmp_path, capsys):
    line = fails(capsys, ["finetune", "--config", f"{SYNAPSE}:b", "--workdir", str(tmp_path),
                          "--config.optim.lrr=1"])
    assert line == "rwkvunet finetune: no config field 'optim.lrr'; did you mean 'optim.lr'?"
    line = fails(capsys, ["finetune", "--config", f"{SYNAPSE}:b", "--workdir", str(tmp_path), "--config.zzz=1"])
    assert "no config field 'zzz'" in line and "did you mean" not in line


def test_an_old_field_name_gets_the_new_one_in_one_line(tmp_path, capsys):
    line = fails(capsys, ["finetune", "--config", f"{SYNAPSE}:b", "--workdir", str(tmp_path),
                          "--config.optim.base_lr=1e-3"])
    assert line == "rwkvunet finetune: config field 'optim.base_lr' was renamed: use optim.lr"
    line = fails(capsys, ["pretrain", "--config", f"{REPO / 'configs' / 'pretrain_imagenet.py'}:smoke",
                          "--workdir", str(tmp_path), "--config.num_epochs", "3"])
    assert line == "rwkvunet pretrain: config field 'num_epochs' was renamed: use epochs"


def test_bad_override_values_and_the_space_separated_form(tmp_path, capsys):
    from rwkvunet_jax.commands.parsing import load_config, split_overrides

    line = fails(capsys, ["finetune", "--config", f"{SYNAPSE}:b", "--workdir", str(tmp_path),
                          "--config.optim.lr=fast"])
    assert line.startswith("rwkvunet finetune: bad override --config.optim.lr=fast:")
    overrides, rest = split_overrides(["--config.optim.lr", "5e-4", "--workdir", "w",
                                       "--config.checkpoint.async_save=False"])
    assert overrides == ["--config.optim.lr=5e-4", "--config.checkpoint.async_save=False"]
    assert rest == ["--workdir", "w"]
    config = load_config(f"{SYNAPSE}:b", overrides)
    assert config.optim.lr == 5e-4 and config.checkpoint.async_save is False


def test_step_bar_says_compiling_then_times_from_the_first_step():
    from rwkvunet_jax.train.progress import StepBar

    out = io.StringIO()
    bar = StepBar(total=100, initial=10, desc="finetune", file=out)
    assert "compiling" in str(bar.bar) and "10/100" in str(bar.bar)
    bar.set_postfix(loss="1.0")  # not while compiling: "compiling" stays visible
    assert "compiling" in str(bar.bar)
    bar.update(1)
    shown = str(bar.bar)
    assert "compiling" not in shown and "11/100" in shown
    # tqdm's rate and ETA count from here: the compiled step is part of the starting point, not of the rate.
    assert bar.bar.format_dict["initial"] == 11 and bar.bar.format_dict["n"] == 11
    bar.update(2)
    bar.set_postfix(loss="0.5")
    assert "13/100" in str(bar.bar) and "loss=0.5" in str(bar.bar)
    bar.close()


def test_pretrain_data_errors_are_one_line(tmp_path, capsys):
    argv = ["pretrain", "--config", f"{REPO / 'configs' / 'pretrain_imagenet.py'}:b", "--workdir", str(tmp_path / "w"),
            "--distributed", "off", f"--config.data.data_dir={tmp_path / 'none'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"rwkvunet pretrain: tfds data_dir not found: {tmp_path / 'none'}" in err and "Traceback" not in err
