"""``fluxguard features``: FR templates of photos, AdvFace protection of templates, and its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, print_json, split_names
from fluxguard.errors import ConfigError, FluxguardError

features_app = typer.Typer(
    name="features",
    help="Face templates for FR providers: extract them, protect them with AdvFace, evaluate the protection.\n\n"
    "Examples:\n\n"
    "  fluxguard features extract photos/ --model mobileface --out templates.npz\n\n"
    "  fluxguard features protect templates.npz protected.npz --variant B --budget 0.35\n\n"
    "  fluxguard features evaluate --data ../shared/faces --out report/",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(features_app, name="features")


def _config(variant: str, min_cosine: float | None, epsilon: float | None, steps: int | None, seed: int,
            budget: float | None = None):
    from fluxguard.features.advface import AdvFaceConfig

    kw: dict = {"variant": variant.upper(), "seed": seed}
    if min_cosine is not None and budget is not None:
        raise ConfigError("give either --min-cosine or --budget, not both")
    if min_cosine is not None:
        kw["min_cosine"] = min_cosine
    if budget is not None:
        kw["budget"] = budget
    if epsilon is not None:
        kw["epsilon"] = epsilon / 255.0
    if steps is not None:
        kw["steps"] = steps
    return AdvFaceConfig(**kw)


@features_app.command()
@friendly_errors
def extract(
    photos: list[str] = typer.Argument(..., help="Photos, folders or quoted globs."),
    model: str = typer.Option(..., "--model", "-m", help="FR model of the zoo (see `fluxguard models`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Template file to write (.npz)."),
    best_face: bool = typer.Option(False, "--best-face", help="Only the best-scoring face of each photo."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Descend into sub-folders."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Detect, align and embed every face: one template per face, with the model, its weights' sha256 and the
    source file names."""
    from fluxguard.batch import expand_inputs
    from fluxguard.features.templates import extract_templates
    from fluxguard.recognition import FR_MODELS

    FR_MODELS[model]  # unknown name -> a clear error before any work
    files = expand_inputs(photos, recursive=recursive)
    if not files:
        raise ConfigError("no photos given")
    if out.exists() and not overwrite:
        raise FluxguardError("output exists; pass --overwrite to replace it", path=out)
    ts, missed = extract_templates(files, model, all_faces=not best_face)
    ts.save(out, overwrite=overwrite)
    console.print(escape(f"{len(ts)} template(s) of {len(files) - len(missed)} photo(s) -> {out} ({model}, "
                         f"{ts.dim}-d)" + (f"; no face in {len(missed)}: {', '.join(Path(m).name for m in missed)}"
                                           if missed else "")))


@features_app.command()
@friendly_errors
def protect(
    src: Path = typer.Argument(..., help="Clean template file from `fluxguard features extract`."),
    dst: Path = typer.Argument(..., help="Protected template file to write."),
    variant: str = typer.Option("B", "--variant", help="A: image-domain noise through the shadow decoder, "
                                "re-extracted by the FR model; B: noise on the template itself."),
    min_cosine: float = typer.Option(None, "--min-cosine", help="Budget: cosine floor between protected and clean "
                                     "template (default: from --budget)."),
    budget: float = typer.Option(None, "--budget", help="Budget relative to the FR model: the template may turn by "
                                 "this fraction of the model's decision angle arccos(threshold at FAR 1e-2) "
                                 "(default 0.35: cosine 0.91 for mobileface, 0.99 for dlib-resnet)."),
    epsilon: float = typer.Option(None, "--epsilon", help="Variant A budget: L-inf image noise in 1/255 (default 8)."),
    steps: int = typer.Option(None, "--steps", help="PGD iterations (default 20)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random start."),
    shadow: Path = typer.Option(None, "--shadow", help="Shadow decoder file (default: the shipped one of the "
                                "templates' model)."),
    model: str = typer.Option(None, "--model", "-m", help="Expected FR model of the templates (checked); needed "
                              "for a template store."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DST if it exists."),
    ray: str = typer.Option(None, "--ray", metavar="ADDRESS", help=escape("Protect a template store on Ray (pip "
                            "install 'fluxguard[dist]'): 'local', 'auto' or a head address."),
                            rich_help_panel="Template stores"),
    ray_workers: int = typer.Option(None, "--ray-workers", min=1, help="Ray workers (default: one per CPU).",
                                    rich_help_panel="Template stores"),
) -> None:
    """Protect templates with AdvFace; the result keeps cosine >= the floor to each clean template.

    SRC may also be a template store: a folder of shards (``.npy`` (N, D) arrays, or ``.safetensors`` with the
    templates under ``embeddings``), protected shard by shard into the folder DST (resumable, with
    DST/fluxguard-templates-summary.json), here or with --ray on a Ray cluster."""
    import numpy as np

    from fluxguard.features.advface import AdvFace
    from fluxguard.features.templates import TemplateSet

    if variant.upper() not in ("A", "B"):
        raise ConfigError(f"--variant must be A or B, got {variant!r}")
    if src.is_dir() or src.suffix in (".npy", ".safetensors") or ray is not None:
        config = _config(variant, min_cosine, epsilon, steps, seed, budget)
        _protect_store(src, dst, config, shadow, model, overwrite, ray, ray_workers, seed)
        return
    ts = TemplateSet.load(src)
    if model is not None and model != ts.model:
        raise FluxguardError(f"the templates come from FR model {ts.model!r}, not {model!r}; templates of different "
                             "models cannot be mixed", path=src)
    if dst.exists() and not overwrite:
        raise FluxguardError("output exists; pass --overwrite to replace it", path=dst)
    adv = AdvFace(ts.model, _config(variant, min_cosine, epsilon, steps, seed, budget), shadow=shadow)
    adv.check_templates(ts)
    res = adv.run(ts.embeddings)
    ts.with_protection(res.templates, adv.describe()).save(dst, overwrite=overwrite)
    console.print(escape(f"{len(ts)} {ts.model} template(s) protected (variant {adv.config.variant}) -> {dst}; "
                         f"cosine to clean min {np.min(res.cosine, initial=1):.3f}, mean "
                         f"{np.mean(res.cosine) if len(ts) else 1:.3f}"))


def _advface_protect(model: str, config: object, shadow: Path | None):
    """Built once per worker: AdvFace(...).protect, a (templates (N, D), generator) -> (N, D) callable."""
    from fluxguard.features.advface import AdvFace

    return AdvFace(model, config, shadow=shadow).protect


def _protect_store(src: Path, dst: Path, config: object, shadow: Path | None, model: str | None, overwrite: bool,
                   ray: str | None, ray_workers: int | None, seed: int) -> None:
    import functools

    from fluxguard import dist
    from fluxguard.batch import EXIT_SOME_FAILED
    from fluxguard.features.advface import AdvFace

    if src.suffix == ".npz":
        raise ConfigError("--ray protects template stores (folders of .npy/.safetensors shards); a .npz template "
                          "file is protected without --ray")
    if model is None:
        raise ConfigError("template store shards do not name their FR model; give --model (e.g. mobileface)")
    adv = AdvFace(model, config, shadow=shadow)  # a wrong model or shadow decoder fails here, before any worker
    rec = dist.protect_template_store(
        src, dst, functools.partial(_advface_protect, model, config, shadow), ray=ray, workers=ray_workers,
        seed=seed, overwrite=overwrite, describe=adv.describe(),
        on_entry=lambda e: console.print(escape(f"{Path(e['input']).name}: {e['status']}"
                                                + (f" ({e['message']})" if "message" in e else ""))))
    c = rec["counts"]
    console.print(escape(f"{rec['templates']} {model} template(s) protected in {c['protected']} shard(s) -> {dst}; "
                         f"{c['skipped']} shard(s) already done, {c['failed']} failed"))
    if c["failed"]:
        raise typer.Exit(EXIT_SOME_FAILED)


@features_app.command()
@friendly_errors
def evaluate(
    data: Path = typer.Option(..., "--data", help="Face-photo folder laid out like ../shared/faces (uses its eval "
                              "split)."),
    out: Path = typer.Option(None, "--out", help="Folder for advface_eval.{json,md,html}."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    fr_models: str = typer.Option(None, "--models", help="Comma-separated FR models (default: those with a shipped "
                                  "shadow decoder)."),
    variants: str = typer.Option("A,B", "--variants", help="Comma-separated AdvFace variants."),
    min_cosine: float = typer.Option(None, "--min-cosine", help="Cosine floor (both variants; default: from "
                                     "--budget)."),
    budget: float = typer.Option(None, "--budget", help="Template turn as a fraction of each model's decision "
                                 "angle (default 0.35)."),
    epsilon: float = typer.Option(None, "--epsilon", help="Variant A L-inf image budget in 1/255."),
    steps: int = typer.Option(None, "--steps", help="PGD iterations."),
    limit: int = typer.Option(None, "--limit", help="Use about this many faces (whole identities)."),
    attackers: Path = typer.Option(None, "--attackers", help="Folder of attacker-<model>.safetensors (default: "
                                   "<cache>/advface/attackers)."),
    train_attackers: bool = typer.Option(True, "--train-attackers/--no-train-attackers", help="Train a missing "
                                         "attacker on DATA's training split first (5-15 min per model on one CPU "
                                         "core, kept in the cache); with --no-train-attackers a missing one is an "
                                         "error."),
    attacker_steps: int = typer.Option(300, "--attacker-steps", min=1, help="Training steps of each attacker."),
    thresholds: Path = typer.Option(None, "--thresholds", help="thresholds.json to use instead of the installed "
                                    "calibration."),
    detections: Path = typer.Option(None, "--detections", help="Detection cache folder."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Utility (TAR at FAR, accuracy) and privacy (attacker SSIM/PSNR, judge match rate) of clean, Gaussian-noise
    and AdvFace templates on the eval split."""
    import sys

    from fluxguard.features import shadow_models
    from fluxguard.features.evaluate import markdown_table, run_evaluation

    models = split_names(fr_models) or shadow_models()
    configs = {v.upper(): _config(v, min_cosine, epsilon, steps, seed, budget) for v in (split_names(variants) or [])}
    if not data.is_dir():
        raise FluxguardError("data folder not found", path=data)
    table = json.loads(thresholds.read_text()) if thresholds is not None else None
    if train_attackers:  # attacker training takes minutes: show its progress lines
        import logging

        from rich.logging import RichHandler

        train_log = logging.getLogger("fluxguard.features.training")
        train_log.setLevel(logging.INFO)
        if not any(isinstance(h, RichHandler) for h in train_log.handlers):
            train_log.addHandler(RichHandler(console=console, show_path=False))
    results = run_evaluation(data, models, configs, attackers=attackers, thresholds=table, limit=limit,
                             detections=detections, out=out, command="fluxguard " + " ".join(sys.argv[1:]),
                             seed=seed, train_attackers=train_attackers, attacker_steps=attacker_steps,
                             progress=lambda s: console.print(escape(s)))
    if as_json:
        print_json(results)
    else:
        sys.stdout.write(markdown_table(results))
