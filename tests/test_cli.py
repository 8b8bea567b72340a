"""The command line: every subcommand listed, help and usage errors as exit codes, in-process."""

import subprocess
import sys

from aikd.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("detect", "align", "label", "train", "score", "embed", "evaluate", "export", "demo"):
        assert name in COMMANDS and f"    {name}" in out
    assert "exit status" in out


def test_no_command_and_unknown_command(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for name in COMMANDS:
        assert main([name, "--help"]) == 0, name
        assert f"aikd {name}" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "aikd", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("aikd ")
