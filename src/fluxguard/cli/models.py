"""``fluxguard models`` (the FR model zoo) and ``fluxguard calibrate`` (cosine thresholds at fixed FARs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, print_json, split_names


@app.command()
@friendly_errors
def models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the face-recognition models: embedding size, input, source, licence, thresholds."""
    from fluxguard.recognition import FR_MODELS

    rows = []
    for name in FR_MODELS:
        cls = FR_MODELS[name]
        d = cls.calibrated_spec().to_dict()
        d["available"] = cls.is_available()
        rows.append(d)
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Face-recognition models (details: --json)", title_justify="left")
    for col in ("name", "dim", "crop", "shipped", "on disk", "thr @FAR 1e-2", "licence"):
        t.add_column(col)
    for d in rows:
        th = d["thresholds"].get("1e-2")
        t.add_row(d["name"], str(d["embedding_size"]), f"{d['crop_size']} px", "yes" if d["shipped"] else "no",
                  "yes" if d["available"] else "no", "-" if th is None else f"{th:.3f}",
                  escape(d["licence"].split(" (")[0]))
    Console().print(t)


@app.command()
@friendly_errors
def calibrate(
    data: Path = typer.Option(..., "--data", help="Face-photo folder laid out like ../shared/faces."),
    out: Path | None = typer.Option(None, "--out", help="Where to write the thresholds (default: the package's "
                             "recognition/thresholds.json)."),
    fr_models: str | None = typer.Option(None, "--models", help="Comma-separated FR models (default: those on disk)."),
    landmarks: Path | None = typer.Option(None, "--landmarks", help="JSON of precomputed landmarks per photo "
                                          "(scripts/detect_landmarks.py), instead of running the face detector."),
    split: str = typer.Option("calib", "--split", help="Identity split to use (calib | eval | train)."),
) -> None:
    """Cosine thresholds at FAR 1e-1 / 1e-2 / 1e-3 from impostor pairs of the calib-split identities."""
    import json

    import torch

    from fluxguard.data import SPLITS
    from fluxguard.errors import ConfigError
    from fluxguard.recognition import FR_MODELS, available_models, load_recognizer
    from fluxguard.recognition.base import THRESHOLDS_FILE
    from fluxguard.recognition.calibration import calibrate as run_calibration
    from fluxguard.recognition.calibration import detection_cache_path, gather_faces

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    names = split_names(fr_models) or available_models()
    for n in names:
        FR_MODELS[n]  # unknown names fail here, listing the valid ones
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cache = None if landmarks else detection_cache_path(data, "detector")
    records = gather_faces(data, split, landmark_file=landmarks, cache=cache)
    console.print(f"{len(records)} faces of {len({r.identity for r in records})} {split} identities")
    table = run_calibration({n: load_recognizer(n) for n in names}, records,
                            data_note=f"labelled photos of data folder {data.resolve().name!r}, identities of the "
                                      f"{split!r} split (fluxguard.data.split_of), main face per photo",
                            landmark_source=str(landmarks.name) if landmarks else "fluxguard.faces.detect")
    dest = out or THRESHOLDS_FILE
    if dest.is_file():  # keep the models not recalibrated now
        old = json.loads(dest.read_text())
        table["models"] = {**{k: v for k, v in old.get("models", {}).items() if k not in table["models"]},
                           **table["models"]}
    dest.write_text(json.dumps(table, indent=1) + "\n")
    for n in names:
        th = table["models"][n]["thresholds"]
        console.print(f"{n}: " + ", ".join(f"FAR {k}: {v:.4f}" for k, v in th.items()))
    console.print(escape(f"wrote {dest}"))
