"""``fluxguard faces``: list the faces found in photos (boxes, five landmarks, scores)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, print_json
from fluxguard.errors import FluxguardError


@app.command("faces")
@friendly_errors
def faces_command(
    photos: Annotated[list[Path], typer.Argument(help="Photos (JPEG, PNG, WebP, ...).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per photo.")] = False,
    detector: Annotated[str, typer.Option("--detector", "-d", help="Face detector: mtcnn or dlib-hog.")] = "mtcnn",
    min_face_size: Annotated[int, typer.Option("--min-face-size", min=1, help="Smallest face to find, px.")] = 20,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Minimum detection score (default: the detector's own).")
    ] = None,
) -> None:
    """Find the faces in each photo: box (x0, y0, x1, y1), the five ArcFace landmarks and the score.

    Landmarks are in ArcFace order: eye on the viewer's left, eye on the viewer's right, nose tip, mouth corner on
    the viewer's left, mouth corner on the viewer's right. Nothing is written to disk.
    """
    from fluxguard.faces.detect import DETECTORS, detect_faces, load_rgb

    DETECTORS[detector]  # an unknown name fails here, before any photo is read
    results: list[dict] = []
    exit_code = 0
    for path in photos:
        try:
            rgb = load_rgb(path)
            faces = detect_faces(rgb, min_face_size=min_face_size, threshold=threshold, detector=detector)
        except FluxguardError as e:
            if len(photos) == 1:
                raise
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            results.append({"path": str(path), "error": str(e)})
            exit_code = max(exit_code, e.exit_code)
            continue
        results.append({"path": str(path), "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
                        "faces": [f.to_dict() for f in faces]})
    if as_json:
        print_json(results)
    else:
        _print_tables(results)
    if exit_code:
        raise typer.Exit(exit_code)


def _print_tables(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    for res in results:
        if "error" in res:
            continue
        n = len(res["faces"])
        table = Table(
            title=escape(f"{res['path']} ({res['width']}x{res['height']}): {n} face{'s' if n != 1 else ''}"),
            title_justify="left",
            caption="box: x0,y0,x1,y1; points: x,y px; L/R = viewer's left/right",
            caption_justify="left",
        )
        for col in ("#", "score"):
            table.add_column(col, justify="right", no_wrap=True)
        for col in ("box", "eyes L / R", "nose", "mouth L / R"):
            table.add_column(col, no_wrap=True)
        for i, f in enumerate(res["faces"], 1):
            p = [f"{x:.1f},{y:.1f}" for x, y in f["landmarks"]]
            box = ",".join(f"{v:.0f}" for v in f["box"])
            table.add_row(str(i), f"{f['score']:.3f}", box, f"{p[0]}\n{p[1]}", p[2], f"{p[3]}\n{p[4]}")
        out.print(table)
