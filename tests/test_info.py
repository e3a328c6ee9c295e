"""``rwkvunet info``: exact parameter counts and paper-convention FLOPs through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rwkvunet_jax.cli import main


def test_info_json_reports_official_counts(capsys):
    assert main(["info", "--model", "rwkv_unet_t", "--num-classes", "1", "--in-chans", "3",
                 "--img-size", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["params"] == 3_145_761
    assert isinstance(result["flops"], int)
    # thop counts 3.744 G for the official T at 256; the paper (3.78 G) also charges the CCM resizes.
    assert 3.744e9 < result["flops"] < 3.79e9
    assert result["paper"] == {"params_m": 3.3, "gflops": 3.78}


def test_info_table_accepts_non_square_sizes(capsys):
    assert main(["info", "--model", "rwkv_unet_encoder_t", "--img-size", "224", "160"]) == 0
    out = capsys.readouterr().out
    assert "3.100" in out and "224x160" in out


def test_info_rejects_sizes_that_are_not_multiples_of_16(capsys):
    assert main(["info", "--model", "rwkv_unet_t", "--img-size", "100"]) == 2
    assert capsys.readouterr().err == "rwkvunet info: --img-size must be positive multiples of 16, got 100\n"


def test_console_dispatcher_lists_commands_and_rejects_unknown_ones():
    out = subprocess.run([sys.executable, "-m", "rwkvunet_jax", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "finetune" in out.stdout and "info" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "rwkvunet_jax", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr
