"""`whale-dist <command> --help` and `python jobs/<command>.py --help`: flags and config keys, from the code."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from whale_dist.cli import COMMANDS, command_help, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_lists_its_flags_and_keys(command, capsys):
    assert main([command, "--help"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: whale-dist {command} ")
    flags = getattr(importlib.import_module(COMMANDS[command][0]), "FLAGS", {})
    for flag, key in flags.items():
        assert f"{flag} VALUE" in printed and f"sets {key}" in printed
        assert f"  {key} = " in printed  # a flag's key is among the keys the command says it reads
    assert "  root = " in printed


@pytest.mark.parametrize("command,key,absent", [
    ("identify", "identify.threshold", "loss.scale"),
    ("index", "embed.out", "embed.batch_size"),
    ("train", "loss.subcenters", "index.nprobe"),
    ("embed", "train.run_name", "train.epochs"),
])
def test_help_names_what_the_command_reads_and_not_the_rest(command, key, absent):
    text = command_help(command)
    assert f"  {key} = " in text and f"  {absent} = " not in text


def test_identify_help_through_the_job_script():
    out = subprocess.run([sys.executable, str(REPO / "jobs" / "identify.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: whale-dist identify" in out.stdout and "--catalogue VALUE" in out.stdout
