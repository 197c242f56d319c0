"""The typer application every ``fluxguard`` command registers on (:mod:`fluxguard.cli` imports the commands)."""

from __future__ import annotations

import typer

from fluxguard._version import __version__

app = typer.Typer(
    name="fluxguard",
    help="Protect the faces in your photos from unauthorised face recognition.\n\n"
    "Examples:\n\n"
    "  fluxguard protect --demo --out out/            # protect a sample photo with the built-in models\n\n"
    "  fluxguard protect me.jpg --out protected/      # protect every face in a photo\n\n"
    "  fluxguard check protected/me_protected.jpg --reference me2.jpg   # does FR still match?\n\n"
    "  fluxguard faces me.jpg --json                  # faces found: boxes, landmarks, scores\n\n"
    "  fluxguard serve                                # the web UI on http://127.0.0.1:7860",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fluxguard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """fluxguard: face privacy against unauthorised face recognition."""
