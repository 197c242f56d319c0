"""The ``fluxguard`` command line (typer + rich). Each command group is one module registered below.

The typer ``app`` lives in :mod:`fluxguard.cli._app`; the command modules import it from there (not from this
package, which imports them), and this package re-exports it with every command registered.
"""

from __future__ import annotations

from fluxguard.cli._app import app


def _register() -> None:
    # One import per command module; each module adds its commands to `app`.
    from fluxguard.cli import check, evaluate, faces, features, models, protect, quality, serve  # noqa: F401


_register()


def main() -> None:
    app()


__all__ = ["app", "main"]
