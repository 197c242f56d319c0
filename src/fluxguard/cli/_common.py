"""Shared CLI plumbing: one place that turns library errors into messages and exit codes."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from fluxguard.errors import FluxguardError

F = TypeVar("F", bound=Callable[..., Any])

console = Console(stderr=True, highlight=False)


def friendly_errors(fn: F) -> F:
    """Print a :class:`FluxguardError` as one line (no traceback) and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FluxguardError as e:
            # escaped: messages hold file names and extras ('fluxguard[dist]') that rich would read as markup
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class AccelerateMissingFilter(logging.Filter):
    """Drops diffusers' "Cannot initialize model with low cpu memory usage because `accelerate` was not found"
    warning. diffusers prints it for every model it loads when ``accelerate`` (the ``[flux]`` extra) is not
    installed; the built-in lite models are a few MB and load as fast without it, so it is only noise before a
    user's first result."""

    MESSAGE = "Cannot initialize model with low cpu memory usage because `accelerate` was not found"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.MESSAGE)


def quiet_model_loading() -> None:
    """Install :class:`AccelerateMissingFilter` on the diffusers logger that loads models (once per process).

    Called by the CLI when it starts, not at import: the library leaves logging configuration to its callers."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, AccelerateMissingFilter) for f in logger.filters):
        logger.addFilter(AccelerateMissingFilter())


def print_json(obj: Any) -> None:
    import json

    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def split_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    return names or None
