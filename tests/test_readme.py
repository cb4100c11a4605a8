"""The README stays true: every `polytask` command and flag it shows exists, and the two
setup commands are the ones CI runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polytask.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GROUPS = {"registry"}


def _shell_blocks() -> list[str]:
    """Bodies of the README's bash code blocks (fences tracked line by line)."""
    blocks, current, lang = [], [], None
    for line in README.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang = line[3:].strip() or "text"
            else:
                if lang in ("bash", "sh"):
                    blocks.append("\n".join(current))
                current, lang = [], None
        elif lang is not None:
            current.append(line)
    return blocks


def _polytask_commands() -> list[list[str]]:
    """Every `polytask ...` invocation in the README's bash blocks, as argv lists."""
    commands = []
    for block in _shell_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            command: list[str] = []
            for word in [*lexer, "&&"]:
                if word in ("&&", "||", "|", ";"):
                    starts = [i for i, w in enumerate(command) if w == "polytask"
                              and (i == 0 or command[i - 1] == "--")]  # also `ray job submit -- polytask`
                    if starts:
                        commands.append(command[starts[0] + 1 :])
                    command = []
                else:
                    command.append(word)
    return commands


def test_readme_mentions_commands() -> None:
    assert len(_polytask_commands()) >= 8


@pytest.mark.parametrize("argv", _polytask_commands(), ids=lambda a: " ".join(a)[:60])
def test_each_readme_command_and_flag_exists(argv: list[str]) -> None:
    path = argv[:2] if argv and argv[0] in GROUPS else argv[:1]
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"polytask {' '.join(path)} does not exist: {result.output}"
    help_text = re.sub(r"\s+", " ", result.output)
    for flag in [a.split("=")[0] for a in argv if a.startswith("--")]:
        assert flag in help_text, f"README uses {flag}, which `polytask {' '.join(path)}` lacks"


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert ". .venv/bin/activate && pytest" in README
    assert "pip install torch==2.13.0" in README and "torch==2.13.0" in ci
    assert ci.strip().splitlines()[-1] == "pytest"
