"""``fluxguard protect``: files, folders and globs in; protected copies out; a JSON summary; resumable."""

from __future__ import annotations

import glob
import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from fluxguard.cli import app
from fluxguard.cli._common import console, friendly_errors, split_names
from fluxguard.errors import ConfigError, FluxguardError, ImageError, NoFaceError
from fluxguard.io.image import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_PIXELS

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
SUMMARY_NAME = "fluxguard-summary.json"

# Exit codes of a batch (also listed in --help):
EXIT_OK = 0  # every photo protected (or already done)
EXIT_NO_FACE = 3  # no photo failed, but some had no face
EXIT_SOME_FAILED = 4  # at least one photo failed (unreadable, error while protecting)


def expand_inputs(items: list[str], recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Files as given, image files of folders, and glob patterns (quoted on the shell), in a stable order.

    Files found in folders or by patterns under ``exclude`` (the output folder) are left out, so a re-run over a
    folder that holds its own output never protects the protected copies again.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None

    def add(p: Path, found: bool = True) -> None:
        r = p.resolve()
        if found and skip is not None and r.is_relative_to(skip):
            return
        if r not in seen:
            seen.add(r)
            out.append(p)

    for item in items:
        p = Path(item)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            for f in sorted(it):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTS and not f.name.startswith("."):
                    add(f)
        elif any(c in item for c in "*?[") and not p.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ConfigError(f"no file matches {item!r}")
            for m in matches:
                if Path(m).is_file():
                    add(Path(m))
        else:
            add(p, found=False)  # a missing file is reported per photo, not here
    return out


def output_subdir(src: Path, items: list[str], recursive: bool) -> Path:
    """Where under the output folder ``src``'s result goes: with ``--recursive``, its sub-folder inside the folder
    given on the command line (``holiday/day1/a.jpg`` -> ``OUT/day1/``), so equal names in sub-folders never meet."""
    if recursive:
        r = src.resolve()
        for item in items:
            d = Path(item)
            if d.is_dir() and r.is_relative_to(d.resolve()):
                return r.parent.relative_to(d.resolve())
    return Path()


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``--param key=value`` pairs; values parsed as JSON when they look like it (numbers, lists, true/false)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--param expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        k = k.strip().replace("-", "_")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return params


def _write_summary(path: Path, summary: dict) -> None:
    from fluxguard.io import write_bytes_atomic

    write_bytes_atomic(path, json.dumps(summary, indent=2).encode(), overwrite=True)


def _previous_entries(path: Path) -> dict[str, dict]:
    """Per output file, the entry an earlier run wrote (so a resumed run keeps the similarities it measured)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        done = ("protected", "skipped")
        return {e["output"]: e for e in old.get("photos", []) if e.get("status") in done and "output" in e}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


@app.command(
    epilog="Exit codes: 0 all photos protected; 3 some photos had no face; 4 some photos failed; "
    "1/2 bad arguments or input.\n\n"
    "Examples:\n\n"
    "  fluxguard protect --demo --out out/\n\n"
    "  fluxguard protect holiday/ --out protected/ --strength high\n\n"
    "  fluxguard protect 'photos/*.jpg' --out protected/ --method pgd --fr-models mobilefacenet,dlib_resnet\n\n"
    "  fluxguard protect me.jpg --out protected/ --mode impersonate --target someone_else.jpg",
)
@friendly_errors
def protect(
    photos: list[str] = typer.Argument(None, help="Photos, folders or quoted glob patterns.", show_default=False),
    out: Path = typer.Option(Path("protected"), "--out", "-o", help="Output folder (created if needed)."),
    method: str = typer.Option("fluxguard", "--method", "-m", help="Protection method: fluxguard, wdp, pgd."),
    mode: str = typer.Option("dodge", "--mode", help="dodge (FR must not match you) or impersonate (--target)."),
    target: Path | None = typer.Option(None, "--target", help="Photo of the identity to impersonate."),
    fr_models: str | None = typer.Option(None, "--fr-models", help="Attack ensemble, comma-separated "
                                         "(default: every shipped FR model). See `fluxguard models`."),
    judges: str | None = typer.Option(None, "--judges", help="FR models that report similarity before/after, "
                                      "comma-separated (default: every shipped FR model)."),
    strength: str | None = typer.Option(None, "--strength", "-s", help="Preset: low, medium (the method's "
                                        "defaults) or high; --param overrides single values."),
    model: str | None = typer.Option(None, "--model", help="Generator weights: a Hugging Face id or a local "
                                     "folder (FLUX for fluxguard, SD for wdp). Default: the built-in lite models."),
    edit: str | None = typer.Option(None, "--edit", help="Text edit for fluxguard, e.g. 'red lipstick' "
                                    "(needs a real FLUX model)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter key=value (repeatable); "
                                     "overrides the preset."),
    seed: int = typer.Option(0, "--seed", help="Random seed (results are reproducible for a seed)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    suffix: str = typer.Option("_protected", "--suffix", help="Added to each output file name."),
    quality: int | None = typer.Option(None, "--quality", min=50, max=100, help="JPEG/WebP quality "
                                       f"(default {DEFAULT_JPEG_QUALITY}, 4:4:4 chroma; see "
                                       "benchmarks/results/jpeg_quality.md)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo photos whose output exists."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse photos with more "
                                   "pixels (decompression-bomb guard)."),
    demo: bool = typer.Option(False, "--demo", help="Protect a sample photo (skimage's astronaut)."),
    summary: Path | None = typer.Option(None, "--summary", help=f"JSON summary path (default OUT/{SUMMARY_NAME})."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Protect every face in PHOTOS; write protected copies to OUT (never over the originals)."""
    from fluxguard.api import Protector, method_params, resolve_device
    from fluxguard.io import load_image, output_path, remove_stale_partials
    from fluxguard.methods import METHODS

    # Every flag is checked against the method before any photo or model is loaded: nothing is silently ignored.
    params = method_params(method, parse_params(param), model=model, edit=edit, mode=mode)
    device = resolve_device(device)
    presets = METHODS[method].presets
    if strength is not None and strength not in presets:
        raise ConfigError(f"method {method!r} has no strength {strength!r}; valid: {', '.join(presets) or 'none'}")
    if mode == "impersonate" and target is None:
        raise ConfigError("--mode impersonate needs --target PHOTO (the identity to look like)")
    if mode == "dodge" and target is not None:
        raise ConfigError("--target is only used with --mode impersonate")
    target_image = load_image(target, max_pixels=max_pixels) if target is not None else None
    if demo:
        if photos:
            raise ConfigError("--demo protects the built-in sample photo; give either --demo or photos")
        photos = [str(_demo_photo(out))]
    if not photos:
        raise ConfigError("no photos given (try --demo, or see --help)")
    inputs = expand_inputs(photos, recursive, exclude=out)
    if not inputs:
        raise ConfigError("no image files found in the given folders")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)  # what a killed earlier run was writing; its finished outputs are whole
    summary_path = summary or out / SUMMARY_NAME
    previous = _previous_entries(summary_path)

    protector = Protector(method, mode=mode, fr_models=split_names(fr_models), judges=split_names(judges),
                          strength=strength, device=device, **params)
    record: dict[str, Any] = {
        "method": method,
        "mode": mode,
        "params": protector.params(),
        "seed": seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "photos": [],
    }
    notes = _method_notes(protector)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    if notes:
        record["notes"] = notes
    counts = {"protected": 0, "skipped": 0, "no_face": 0, "failed": 0}
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True, disable=json_out and not console.is_terminal) as bar:
        photos_task = bar.add_task("photos", total=len(inputs))
        stage_task = bar.add_task("", total=1, visible=False)

        def on_progress(stage: str, step: int, total: int) -> None:
            bar.update(stage_task, description=f"  {stage}", completed=step, total=total, visible=True)

        claimed: dict[Path, Path] = {}  # output -> the input that writes it in this run
        for src in inputs:
            entry: dict[str, Any] = {"input": str(src)}
            try:
                loaded = load_image(src, max_pixels=max_pixels)
                dest = output_path(src, out / output_subdir(src, photos, recursive), loaded.save_format, suffix)
                entry["output"] = str(dest)
                if dest.resolve() == src.resolve():
                    raise ImageError("the output would replace the input; choose another --out or --suffix",
                                     path=src)
                if dest.resolve() in claimed:
                    raise ImageError(f"has the same output name as {claimed[dest.resolve()]} ({dest.name}); rename "
                                     "one, or give their common folder with --recursive", path=src)
                claimed[dest.resolve()] = src
                if dest.exists() and not overwrite:
                    # finished by an earlier run (outputs are written atomically, so it is whole)
                    done = previous.get(str(dest), {})
                    entry.update(status="skipped", **{k: done[k] for k in ("faces", "timings") if k in done})
                else:
                    res = protector.protect(loaded, target=target_image, seed=seed, progress=on_progress)
                    res.save(dest, overwrite=overwrite, quality=quality)
                    entry.update(status="protected", faces=[f.to_dict() for f in res.faces],
                                 timings={k: round(v, 3) for k, v in res.timings.items()})
            except NoFaceError as e:
                entry.update(status="no_face", message=str(e))
            except FluxguardError as e:
                entry.update(status="failed", message=str(e))
                console.print(f"[red]failed:[/] {e}")
            counts[entry["status"]] += 1
            record["photos"].append(entry)
            record["counts"] = counts
            _write_summary(summary_path, record)  # after every photo: a killed run loses nothing it reported
            bar.advance(photos_task)
            bar.update(stage_task, visible=False)

    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_summary(summary_path, record)
    if json_out:
        from fluxguard.cli._common import print_json

        print_json(record)
    else:
        _print_table(record)
    if counts["failed"]:
        raise typer.Exit(EXIT_SOME_FAILED)
    if counts["no_face"]:
        raise typer.Exit(EXIT_NO_FACE)


def _method_notes(protector: Any) -> list[str]:
    """What the user should know about how the method will run (said on the console and in the summary)."""
    from fluxguard.generators.lite import is_lite

    config = getattr(protector.method, "config", None)
    if protector.method_name == "fluxguard" and config is not None and is_lite(config.model):
        return ["Flux-Guard runs on the built-in lite models, which have no text encoders: the face is protected "
                "without a text edit. For edits, use --model black-forest-labs/FLUX.1-dev (or a local FLUX folder) "
                "with --edit."]
    return []


def _demo_photo(out: Path) -> Path:
    """skimage's astronaut (Eileen Collins, NASA, public domain) written once as a PNG input for --demo."""
    from skimage import data

    from fluxguard.io import encode_image, write_bytes_atomic

    p = out / "demo_input" / "astronaut.png"
    if not p.exists():
        write_bytes_atomic(p, encode_image(data.astronaut(), "PNG"))
    return p


def _print_table(record: dict) -> None:
    from rich.table import Table

    table = Table(title=f"fluxguard protect — {record['method']} ({record['mode']})", title_justify="left")
    for col in ("photo", "status", "faces", "FR similarity before → after (attacked*)", "seconds"):
        table.add_column(col)
    for e in record["photos"]:
        sims = []
        for i, f in enumerate(e.get("faces", [])):
            parts = [f"{m}{'*' if s['attacked'] else ''} {s['before']:.2f}→{s['after']:.2f}"
                     for m, s in f["similarity"].items()]
            sims.append(f"#{i + 1}: " + ", ".join(parts))
        table.add_row(
            os.path.basename(e["input"]),
            e["status"],
            str(len(e.get("faces", []))),
            "\n".join(sims) or e.get("message", ""),
            f"{e['timings']['total']:.1f}" if "timings" in e else "",
        )
    console.print(table)
    c = record["counts"]
    console.print(f"{c['protected']} protected, {c['skipped']} already done, {c['no_face']} without a face, "
                  f"{c['failed']} failed.")
