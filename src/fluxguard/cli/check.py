"""``fluxguard check``: would face recognition still match this photo to these reference photos?"""

from __future__ import annotations

from pathlib import Path

import typer

from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, print_json, split_names
from fluxguard.errors import ConfigError

EXIT_NO_MATCH = 0  # no FR model matches the photo to any reference at --far
EXIT_MATCH = 5  # at least one does (1, 2, 3 stay the errors: bad arguments, unreadable photo, no face)


def check_photo(photo: Path, references: list[Path], fr_models: list[str] | None = None,
                device: str = "cpu") -> list[dict]:
    """Per reference and FR model: cosine similarity of the largest faces, threshold and verdict at each FAR."""
    import torch

    from fluxguard.api import as_loaded, largest_face, recognizers, to_tensor
    from fluxguard.errors import NoFaceError
    from fluxguard.faces.detect import detect_faces
    from fluxguard.recognition.base import FARS

    def embed(path: Path) -> dict[str, torch.Tensor]:
        img = as_loaded(path)
        faces = detect_faces(img.rgb)
        if not faces:
            raise NoFaceError("no face found", path=path)
        lm = largest_face(faces).landmarks
        x = to_tensor(img.rgb, device)[None]
        with torch.no_grad():
            return {r.name: r(x, lm[None])[0] for r in models}

    models = recognizers(fr_models, device)
    probe = embed(photo)
    rows = []
    for ref in references:
        e = embed(ref)
        for r in models:
            sim = float((probe[r.name] * e[r.name]).sum())
            row: dict = {"photo": str(photo), "reference": str(ref), "model": r.name, "similarity": round(sim, 4)}
            th = r.calibrated_spec().thresholds
            for far in FARS:
                if far in th:
                    row[f"threshold_far_{far}"] = round(th[far], 4)
                    row[f"match_far_{far}"] = bool(sim > th[far])
            rows.append(row)
    return rows


@app.command(epilog=f"Exit codes: {EXIT_NO_MATCH} no FR model matches PHOTO to a reference at --far; {EXIT_MATCH} "
             "at least one does; 1 bad arguments; 2 a photo cannot be read; 3 a photo has no face.\n\n"
             "Example:\n\n  fluxguard check protected/me_protected.jpg --reference me_2019.jpg "
             "--reference me_2021.jpg")
@friendly_errors
def check(
    photo: Path = typer.Argument(..., help="The photo to test (e.g. a protected one)."),
    reference: list[Path] = typer.Option(..., "--reference", "-r", help="Other photo(s) of the person (repeat)."),
    fr_models: str | None = typer.Option(None, "--fr-models", help="FR models, comma-separated (default: all)."),
    far: str = typer.Option("1e-2", "--far", help=f"The false-accept rate whose threshold decides the exit code "
                            f"({EXIT_MATCH} when a model matches): 1e-1, 1e-2 or 1e-3."),
    device: str = typer.Option("cpu", "--device"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """Check whether FR models match PHOTO to each REFERENCE, at FAR 1e-1, 1e-2 and 1e-3."""
    from fluxguard.recognition.base import FARS

    if far not in FARS:
        raise ConfigError(f"--far must be one of {', '.join(FARS)}, got {far!r}")
    rows = check_photo(photo, reference, split_names(fr_models), device)
    code = EXIT_MATCH if any(r.get(f"match_far_{far}") for r in rows) else EXIT_NO_MATCH
    if json_out:
        print_json(rows)
    else:
        _print_table(photo, rows)
    if code != EXIT_NO_MATCH:
        raise typer.Exit(code)


def _print_table(photo: Path, rows: list[dict]) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"Would face recognition match {photo.name}?"), title_justify="left")
    t.add_column("reference", overflow="fold")  # long file names wrap, never lose characters
    # model names are never cut: other columns wrap first
    t.add_column("model", no_wrap=True, min_width=max((len(r["model"]) for r in rows), default=5))
    for c in ("similarity", "match @FAR 1e-1", "match @FAR 1e-2", "match @FAR 1e-3"):
        t.add_column(c)

    def verdict(row: dict, far: str) -> str:
        if f"match_far_{far}" not in row:
            return "n/a"
        m = row[f"match_far_{far}"]
        return f"{'[red]yes' if m else '[green]no'}[/] (>{row[f'threshold_far_{far}']:.3f})"

    for r in rows:
        t.add_row(escape(Path(r["reference"]).name), r["model"], f"{r['similarity']:.3f}",
                  verdict(r, "1e-1"), verdict(r, "1e-2"), verdict(r, "1e-3"))
    console.print(t)
