"""Every help text and error message reaches the user whole: rich markup must not eat bracketed text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from fluxguard.cli import app


def commands(cmd: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group of the CLI, with its path (typer's click-style command objects)."""
    cmd = cmd or typer.main.get_command(app)
    yield path, cmd
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from commands(sub, (*path, name))


def help_texts() -> Iterator[tuple[str, str]]:
    for path, cmd in commands():
        where = " ".join(("fluxguard", *path))
        for kind, text in (("help", cmd.help), ("epilog", cmd.epilog)):
            if text:
                yield f"{where} ({kind})", text
        for param in cmd.params:
            if getattr(param, "help", None):
                yield f"{where} {param.opts[0]}", param.help


HELP_TEXTS = list(help_texts())


def test_every_command_is_checked() -> None:
    assert {w.split(" (")[0] for w in [w for w, _ in HELP_TEXTS] if "--" not in w} >= {
        "fluxguard", "fluxguard protect", "fluxguard check", "fluxguard features protect", "fluxguard serve"}


@pytest.mark.parametrize(("where", "text"), HELP_TEXTS, ids=[w for w, _ in HELP_TEXTS])
def test_help_text_is_shown_as_written(where: str, text: str) -> None:
    # typer renders help with rich markup: an unescaped "[dist]" is read as a style tag and vanishes
    assert Text.from_markup(text).plain == text.replace("\\[", "["), where


def test_bracketed_help_is_rendered(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = " ".join(CliRunner().invoke(app, ["protect", "--help"], terminal_width=200).output.split())
    assert "pip install 'fluxguard[dist]'" in text
    assert "or its GPUs / --ray-gpus with --device cuda)" in text


def test_error_messages_keep_their_brackets(tmp_path) -> None:
    res = CliRunner().invoke(app, ["protect", str(tmp_path / "holiday [2019]" / "*.jpg"), "--method", "pgd"])
    assert res.exit_code == 1
    assert "holiday [2019]" in " ".join(res.output.split())  # the pattern as given, in the error
    res = CliRunner().invoke(app, ["faces", str(tmp_path / "a [1].png"), str(tmp_path / "b [2].png")])
    assert res.exit_code == 2
    assert "a [1].png" in res.output and "b [2].png" in res.output
