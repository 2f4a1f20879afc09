"""``e3prune <command> --help`` works for every command, nested ones included.

The commands are discovered from the parser ``e3prune`` itself builds (``build_parser``), so a
command added later is checked without touching this file. Help is printed by argparse, which
%-formats every help string: a bare ``%`` in a config field's description once crashed
``e3prune search --help`` (``add_config_flags`` escapes it now).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e3prune.cli import build_parser


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path under ``parser``: ("search",), ("reference-model",), ("reference-model", "build"), …"""
    found: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())


def test_discovery_finds_the_known_commands():
    assert {("search",), ("promote",), ("schedule",), ("reference-model", "build")} <= set(COMMANDS)


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "e3prune")
def test_help_exits_zero_and_shows_usage(command):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    text = out.getvalue()
    assert text.startswith("usage: e3prune" + "".join(f" {c}" for c in command))
    assert "--help" in text


def test_search_help_in_a_real_process():
    """The console script (or ``python -m e3prune.cli`` without one), as a user runs it."""
    script = Path(sys.executable).with_name("e3prune")
    argv = [str(script)] if script.is_file() else [sys.executable, "-m", "e3prune.cli"]
    env = {**os.environ, "COLUMNS": "100"}
    proc = subprocess.run([*argv, "search", "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: e3prune search")
    assert "%%" not in proc.stdout  # escaped for argparse, printed once


def test_percent_in_a_description_or_default_is_printed_as_is():
    from pydantic import BaseModel, Field

    from e3prune.cli import add_config_flags

    class Config(BaseModel):
        ratio: float = Field(0.25, description="share of layers removed, e.g. 0.25 = 25 %")
        label: str = Field("at 40 %(x)s", description="a %d-free default")

    parser = argparse.ArgumentParser(prog="demo")
    add_config_flags(parser, Config)
    text = parser.format_help()
    assert "e.g. 0.25 = 25 % (default: 0.25)" in text
    assert "a %d-free default (default: at 40 %(x)s)" in text
