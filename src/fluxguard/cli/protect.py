"""``fluxguard protect``: files, folders and globs in; protected copies out; a JSON summary; resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fluxguard.batch import (
    SUMMARY_NAME,
    BatchJob,
    BatchSummary,
    batch_exit_code,
    claim_output,
    demo_photo,
    expand_inputs,
    file_sha256,
    protect_local,
)
from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, split_names
from fluxguard.defaults import DEFAULT_METHOD
from fluxguard.errors import ConfigError
from fluxguard.io.image import DEFAULT_JPEG_QUALITY, DEFAULT_MAX_PIXELS
from fluxguard.threads import AUTO


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


def parse_threads(value: str) -> int | str:
    if value == AUTO:
        return AUTO
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--threads takes a number >= 1 or {AUTO!r}, got {value!r}")
    return n


@app.command(
    epilog="Exit codes: 0 every photo protected (in this run or an earlier one); 2 some photos could not be read "
    "(missing, not an image, too large); 3 some photos had no face; 4 some photos failed while being protected or "
    "written. When a batch has several, 4 wins over 2 and 2 over 3. 1: bad arguments, nothing was done.\n\n"
    "Examples:\n\n"
    "  fluxguard protect --demo --out out/\n\n"
    "  fluxguard protect holiday/ --out protected/ --strength high\n\n"
    "  fluxguard protect 'photos/*.jpg' --out protected/ --method pgd --fr-models mobilefacenet,dlib-resnet\n\n"
    "  fluxguard protect me.jpg --out protected/ --mode impersonate --target someone_else.jpg",
)
@friendly_errors
def protect(
    photos: list[str] = typer.Argument(None, help="Photos, folders or quoted glob patterns.", show_default=False),
    out: Path = typer.Option(Path("protected"), "--out", "-o", help="Output folder (created if needed)."),
    method: str = typer.Option(DEFAULT_METHOD, "--method", "-m", help="Protection method: pgd (default), fluxguard, "
                               "wdp."),
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
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed and --threads give the same pixels."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    threads: str = typer.Option(AUTO, "--threads", help="torch CPU threads: a number, or auto (the cores not busy "
                                "with other work when the run starts). The pixels depend on the thread count: give "
                                "a number for byte-identical re-runs."),
    suffix: str = typer.Option("_protected", "--suffix", help="Added to each output file name."),
    quality: int | None = typer.Option(None, "--quality", min=50, max=100, help="JPEG/WebP quality "
                                       f"(default {DEFAULT_JPEG_QUALITY}, 4:4:4 chroma; see "
                                       "benchmarks/results/jpeg_quality.md)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo photos whose output exists."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse photos with more "
                                   "pixels (decompression-bomb guard)."),
    demo: bool = typer.Option(False, "--demo", help="Protect a sample photo (skimage's astronaut, kept in the "
                              "cache folder, not in OUT)."),
    summary: Path | None = typer.Option(None, "--summary", help=f"JSON summary path (default OUT/{SUMMARY_NAME})."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    ray: str | None = typer.Option(None, "--ray", metavar="ADDRESS", help=escape(
                                   "Run on Ray (pip install 'fluxguard[dist]'): 'local' starts Ray on this machine, "
                                   "'auto' joins the cluster this machine belongs to, else a head address "
                                   "(host:6379, ray://host:10001)."), rich_help_panel="Ray"),
    ray_workers: int | None = typer.Option(None, "--ray-workers", min=1, help="Workers, each loading the models "
                                           "once (default: the cluster's CPUs / --ray-cpus, or its GPUs / --ray-gpus "
                                           "with --device cuda).", rich_help_panel="Ray"),
    ray_cpus: float = typer.Option(1.0, "--ray-cpus", min=0.1, help="CPUs per worker (its torch threads, in place "
                                   "of --threads).", rich_help_panel="Ray"),
    ray_gpus: float | None = typer.Option(None, "--ray-gpus", min=0.0, help="GPUs per worker (default: 1 with "
                                          "--device cuda, else 0); 0.5 puts two workers on a GPU.",
                                          rich_help_panel="Ray"),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Photos a worker takes at a time.",
                                   rich_help_panel="Ray"),
) -> None:
    """Protect every face in PHOTOS; write protected copies to OUT (never over the originals)."""
    import functools

    from fluxguard.api import Protector, method_params, resolve_device
    from fluxguard.io import load_image, remove_stale_partials
    from fluxguard.methods import METHODS
    from fluxguard.threads import torch_threads

    # Every flag is checked against the method before any photo or model is loaded: nothing is silently ignored.
    params = method_params(method, parse_params(param), model=model, edit=edit, mode=mode)
    device = device if ray is not None else resolve_device(device)  # on Ray, the workers' devices count
    presets = METHODS[method].presets
    if strength is not None and strength not in presets:
        raise ConfigError(f"method {method!r} has no strength {strength!r}; valid: {', '.join(presets) or 'none'}")
    if mode == "impersonate" and target is None:
        raise ConfigError("--mode impersonate needs --target PHOTO (the identity to look like)")
    if mode == "dodge" and target is not None:
        raise ConfigError("--target is only used with --mode impersonate")
    requested_threads = parse_threads(threads)
    if ray is not None and requested_threads != AUTO:
        raise ConfigError("--threads sets this machine's torch threads; on Ray each worker uses --ray-cpus threads")
    target_image = load_image(target, max_pixels=max_pixels) if target is not None else None
    if demo:
        if photos:
            raise ConfigError("--demo protects the built-in sample photo; give either --demo or photos")
        photos = [str(demo_photo())]
    if not photos:
        raise ConfigError("no photos given (try --demo, or see --help)")
    inputs = expand_inputs(photos, recursive, exclude=out)
    if not inputs:
        raise ConfigError("no image files found in the given folders" + ("" if recursive else
                          " (add -r to search their sub-folders)"))
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)  # what a killed earlier run was writing; its finished outputs are whole

    make_protector = functools.partial(Protector, method, mode=mode, fr_models=split_names(fr_models),
                                       judges=split_names(judges), strength=strength, device=device, **params)
    job = BatchJob(out=out, suffix=suffix, overwrite=overwrite, quality=quality, seed=seed, target=target_image,
                   max_pixels=max_pixels, items=tuple(photos), recursive=recursive)
    with torch_threads(requested_threads if ray is None else 1) as n_threads:
        settings: dict[str, Any] = {"method": method, "mode": mode, "seed": seed,
                                    "threads": n_threads if ray is None else ray_cpus}
        if target is not None:
            settings["target"] = {"path": str(target), "sha256": file_sha256(target)}
        protector = make_protector() if ray is None else None
        notes = _method_notes(protector) if protector is not None else []
        for note in notes:
            console.print(f"[yellow]note:[/] {escape(note)}")
        if notes:
            settings["notes"] = notes
        summary_file = BatchSummary(summary or out / SUMMARY_NAME, settings)
        if protector is not None:
            summary_file.record["params"] = protector.params()
        ray_options = {} if ray is None else {"workers": ray_workers, "num_cpus": ray_cpus, "device": device,
                                              "num_gpus": ray_gpus, "batch_size": batch_size}
        record = _run_with_progress(inputs, job, make_protector, protector, summary_file, json_out, ray=ray,
                                    **ray_options)
    if json_out:
        from fluxguard.cli._common import print_json

        print_json(record)
    else:
        _print_table(record)
    code = batch_exit_code(record["counts"])
    if code:
        raise typer.Exit(code)


def _run_with_progress(inputs: list[Path], job: BatchJob, make_protector: Any, protector: Any,
                       summary_file: BatchSummary, json_out: bool, *, ray: str | None,
                       **ray_options: Any) -> dict[str, Any]:
    """The batch under a progress bar (photos, and the current photo's stage); returns the finished summary."""
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
            bar.update(stage_task, description=f"  {escape(stage)}", completed=step, total=total, visible=True)

        if ray is None:
            results = protect_local(inputs, job, protector if protector is not None else make_protector(),
                                    on_progress)
        else:
            from fluxguard import dist

            claimed: dict[Path, Path] = {}  # output -> the input that writes it in this run
            # the same protect_one in Ray workers that load the models once; entries come back as they finish
            results = ((claim_output(e, claimed), p) for e, p in dist.protect_photos(
                inputs, make_protector, job, address=ray, **ray_options))
        for entry, run_params in results:
            entry = summary_file.add(entry, run_params)
            if entry["status"] in ("failed", "unreadable"):
                console.print(f"[red]{entry['status']}:[/] {escape(entry['message'])}")
            if "note" in entry:  # e.g. the format the output was written in, when not the input's
                console.print(f"[yellow]note:[/] {escape(entry['input'])}: {escape(entry['note'])}")
            bar.advance(photos_task)
            bar.update(stage_task, visible=False)
    return summary_file.finish(inputs)


def _method_notes(protector: Any) -> list[str]:
    """What the user should know about how the method will run (said on the console and in the summary)."""
    from fluxguard.generators.lite import is_lite

    config = getattr(protector.method, "config", None)
    if protector.method_name == "fluxguard" and config is not None and is_lite(config.model):
        return ["Flux-Guard runs on the built-in lite models, which have no text encoders: the face is protected "
                "without a text edit. For edits, use --model black-forest-labs/FLUX.1-dev (or a local FLUX folder) "
                "with --edit."]
    return []


def _matched_by(similarity: dict[str, dict[str, Any]]) -> list[str] | None:
    """The FR models that match the protected face to the reference (the unprotected face when dodging, the target
    when impersonating) at FAR 1e-2, by the benchmarks' rule (a match is a similarity not below the threshold);
    None when a model has no calibrated threshold."""
    from fluxguard.eval.psr import success

    if any(s.get("threshold_far_1e-2") is None for s in similarity.values()):
        return None
    return [m for m, s in similarity.items() if not success(s["after"], s["threshold_far_1e-2"], "dodge")]


def _print_table(record: dict) -> None:
    from rich.table import Table

    table = Table(title=f"fluxguard protect — {record['method']} ({record['mode']})", title_justify="left")
    for col in ("photo", "status", "faces", "FR similarity before → after (attacked*)", "seconds"):
        table.add_column(col)
    faces_seen = faces_matched = 0
    for e in record["photos"]:
        if e["status"] == "protected":
            seconds = f"{e['timings']['total']:.1f}"
        else:  # an earlier run's seconds are not this run's
            seconds = "earlier run" if e["status"] == "skipped" else ""
        sims = []
        for i, f in enumerate(e.get("faces", [])):
            parts = [f"{m}{'*' if s['attacked'] else ''} {s['before']:.2f}→{s['after']:.2f}"
                     for m, s in f["similarity"].items()]
            matched = _matched_by(f["similarity"])
            verdict = f"; matched by {len(matched)} of {len(f['similarity'])}" if matched is not None else ""
            sims.append(f"#{i + 1}: " + ", ".join(parts) + verdict)
            faces_seen += 1
            faces_matched += bool(matched)
        table.add_row(
            escape(os.path.basename(e["input"])),
            e["status"],
            str(len(e.get("faces", []))),
            escape("\n".join(sims) or e.get("message", "")),
            seconds,
        )
    console.print(table)
    if faces_matched and record["mode"] == "dodge":
        console.print(f"[yellow]note:[/] {faces_matched} of {faces_seen} faces are still matched to their unprotected "
                      "photo by at least one FR model at FAR 1e-2 (the budget bounds how much a face may change); "
                      "--strength high changes more, and shows on a close look.")
    c = record["counts"]
    console.print(f"{c['protected']} protected, {c['skipped']} already done by an earlier run, {c['no_face']} "
                  f"without a face, {c['unreadable']} unreadable, {c['failed']} failed.")
