"""``fluxguard check``: would face recognition still match this photo to these reference photos?"""

from __future__ import annotations

from pathlib import Path

import typer

from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, print_json, split_names


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


@app.command(epilog="Example:\n\n  fluxguard check protected/me_protected.jpg --reference me_2019.jpg "
             "--reference me_2021.jpg")
@friendly_errors
def check(
    photo: Path = typer.Argument(..., help="The photo to test (e.g. a protected one)."),
    reference: list[Path] = typer.Option(..., "--reference", "-r", help="Other photo(s) of the person (repeat)."),
    fr_models: str | None = typer.Option(None, "--fr-models", help="FR models, comma-separated (default: all)."),
    device: str = typer.Option("cpu", "--device"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """Check whether FR models match PHOTO to each REFERENCE, at FAR 1e-1, 1e-2 and 1e-3."""
    rows = check_photo(photo, reference, split_names(fr_models), device)
    if json_out:
        print_json(rows)
        return
    from rich.table import Table

    t = Table(title=f"Would face recognition match {photo.name}?", title_justify="left")
    for c in ("reference", "model", "similarity", "match @FAR 1e-1", "match @FAR 1e-2", "match @FAR 1e-3"):
        t.add_column(c)

    def verdict(row: dict, far: str) -> str:
        if f"match_far_{far}" not in row:
            return "n/a"
        m = row[f"match_far_{far}"]
        return f"{'[red]yes' if m else '[green]no'}[/] (>{row[f'threshold_far_{far}']:.3f})"

    for r in rows:
        t.add_row(Path(r["reference"]).name, r["model"], f"{r['similarity']:.3f}",
                  verdict(r, "1e-1"), verdict(r, "1e-2"), verdict(r, "1e-3"))
    console.print(t)
