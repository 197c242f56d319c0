"""``fluxguard evaluate``: the black-box protection benchmark of a method on a face folder (results + report)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, split_names
from fluxguard.cli.protect import parse_params
from fluxguard.errors import ConfigError


@app.command(
    epilog="Examples:\n\n"
    "  fluxguard evaluate --method pgd --data ../shared/faces --out runs/pgd --limit 20\n\n"
    "  fluxguard evaluate --method pgd --data ../shared/faces --out runs/pgd4 --param eps=0.0157 --mode dodge\n\n"
    "Re-running with the same --out resumes (finished faces are not protected again).",
)
@friendly_errors
def evaluate(
    method: str = typer.Option(..., "--method", "-m", help="Protection method: pgd, wdp, fluxguard."),
    data: Path | None = typer.Option(None, "--data", help="Face folder laid out like ../shared/faces "
                                     "(default: $FLUXGUARD_DATA or ../shared/faces)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results.json, results.md, report.html, "
                             "protected photos and caches."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the method."),
    mode: str = typer.Option("both", "--mode", help="dodge, impersonate or both."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Number of eval identities (default: all)."),
    judges: str | None = typer.Option(None, "--judges", help="Judged FR models, comma-separated (default: every "
                                      "available model). See `fluxguard models`."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter key=value (repeatable)."),
    strength: str | None = typer.Option(None, "--strength", "-s", help="Method preset: low, medium or high."),
    robustness: bool = typer.Option(True, "--robustness/--no-robustness", help="Re-score after JPEG, resize, "
                                    "blur, crop and a social-network pipeline."),
    purification: str = typer.Option("auto", "--purification", help="Diffusion purification check: auto (the lite "
                                     "SD model when shipped), none, or an SD model folder / hub id."),
    white_box: bool = typer.Option(False, "--white-box", help="Also attack with the whole zoo and report the "
                                   "attacked models' (white-box) PSR as an extra."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's; 1 is "
                                       "fastest on a machine shared with other jobs)."),
    json_out: bool = typer.Option(False, "--json", help="Print results.json's summary tables on stdout."),
) -> None:
    """Evaluate a protection method: black-box dodging / impersonation PSR, quality, robustness, purification."""
    from fluxguard.data import find_faces_dir
    from fluxguard.eval.report import markdown
    from fluxguard.eval.runner import evaluate as run_evaluation

    if mode not in ("dodge", "impersonate", "both"):
        raise ConfigError(f"--mode must be dodge, impersonate or both, got {mode!r}")
    data_dir = data or find_faces_dir()
    if data_dir is None:
        raise ConfigError("no face folder: pass --data DIR or set FLUXGUARD_DATA")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("evaluate", total=1)

        def on_progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage[:70], completed=done, total=total)

        results = run_evaluation(
            method, data_dir, out, mode=mode, seed=seed, limit=limit, judges=split_names(judges),
            robustness=robustness, purification=None if purification == "none" else purification,
            white_box=white_box, strength=strength, device=device, progress=on_progress, **parse_params(param),
        )
    if json_out:
        from fluxguard.cli._common import print_json

        print_json({k: results[k] for k in ("method", "params", "psr", "quality", "timing", "robustness",
                                            "purification", "notes")})
    else:
        console.print(markdown(results), markup=False, highlight=False, soft_wrap=True)
        console.print(escape(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, {out / 'report.html'}"))
