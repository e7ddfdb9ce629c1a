"""The command line's help: every subcommand and every argument has a one-line help in plain text
(no reST markup), the top-level list is aligned, and ``hypernetworks --help`` answers without
importing torch."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from hypernetworks import cli

REPO = Path(__file__).resolve().parents[1]
MARKUP = ("``", ":class:", ":func:", ":meth:")


def test_top_level_help_imports_neither_torch_nor_lightning():
    code = ("import sys\nfrom hypernetworks.cli import main\nassert main(['--help']) == 0\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'numpy'))\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "fit" in done.stdout and "handwriting" in done.stdout


def test_top_level_help_lists_every_command_aligned(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert not any(m in out for m in MARKUP)
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if line.startswith("  ") and parts and parts[0] in (*cli.TRAINING_COMMANDS, *cli.COMMANDS):
            rows[parts[0]] = line
    assert set(rows) == {*cli.TRAINING_COMMANDS, *cli.COMMANDS}
    # every description starts in the same column, after at least two spaces
    starts = {line.index(line.split()[1], len(name) + 2) for name, line in rows.items()}
    assert len(starts) == 1, rows
    for name, line in rows.items():
        assert line[2 + len(name):2 + len(name) + 2] == "  ", line


def _argparse_commands():
    """(name, parser) for every argparse subcommand."""
    out = []
    for name, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        build = getattr(mod, "build_parser", None)
        if build is not None:
            out.append((name, build()))
    return out


def test_every_argparse_command_builds_a_parser():
    assert {name for name, _ in _argparse_commands()} >= {"demo", "sample", "activity", "handwriting", "serve"}


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_argument_has_plain_help(name, capsys):
    mod = importlib.import_module(cli.COMMANDS[name][0])
    build = getattr(mod, "build_parser", None)
    if build is None:  # params builds its parser in main(); its --help is checked as text
        with pytest.raises(SystemExit):
            mod.main(["--help"])
        text = capsys.readouterr().out
        assert not any(m in text for m in MARKUP), text
        return
    parser = build()
    assert parser.description and not any(m in parser.description for m in MARKUP), parser.description
    missing = [a.dest for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not missing, f"hypernetworks {name}: arguments without help: {missing}"
    text = parser.format_help()
    assert not any(m in text for m in MARKUP), text


def test_arguments_that_lacked_help_have_it():
    helps = {}
    for name, parser in _argparse_commands():
        for a in parser._actions:
            helps[(name, a.option_strings[0] if a.option_strings else a.dest)] = a.help
    for key in [("demo", "--batch-size"), ("demo", "--seq-len"), ("demo", "--lr"), ("demo", "--seed"),
                ("sample", "--seed"), ("activity", "checkpoint"), ("activity", "--temperature"),
                ("activity", "--prime"), ("activity", "--seed"), ("handwriting", "--format")]:
        assert helps.get(key), key


@pytest.mark.parametrize("sub", sorted(cli.TRAINING_COMMANDS))
def test_training_subcommand_help_is_plain_and_described(sub, capsys, monkeypatch):
    from hypernetworks.training import run_cli

    monkeypatch.setattr(sys, "argv", ["hypernetworks"])
    with pytest.raises(SystemExit) as e:
        run_cli([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert cli.TRAINING_COMMANDS[sub][:20].lower() in out.lower()
    assert "``" not in out and ":class:" not in out
