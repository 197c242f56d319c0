"""The evaluation every protection method is judged by (AMT-GAN protocol, methods.md §1; black-box by default).

Protocol
--------
* Faces: identities of the ``eval`` split (:func:`fluxguard.data.split_of`) with at least two photos, in a fixed
  order (SHA-1 of the name, which mixes the label spaces), so every method sees the same people and ``limit``
  takes a prefix. Thresholds were calibrated on the disjoint ``calib`` split. Per identity: a *source* photo (the
  one protected) and a *different* reference photo of the same person; the first two photos (by file name) in
  which the detector finds a face.
* Dodging: a protected face succeeds for a judge when its cosine to the reference photo is *below* the judge's
  threshold. Impersonation: the source is pushed towards one of the four protocol targets
  (:data:`PROTOCOL_TARGETS`, assigned round-robin); it succeeds when its cosine to the target's *test* photo (a
  different photo than the one the method saw) is *above* the threshold. PSR is reported at FAR 1e-1, 1e-2
  (main) and 1e-3, beside the clean rate (the unprotected source scored the same way).
* Black-box: each judged model ``j`` scores photos protected against the attack zoo minus ``j`` (minus every zoo
  model of ``j``'s family), rotating through every model of the zoo. A judge outside the zoo (a model we do not
  ship, e.g. ``faceplugin-mfn512``) is an extra held-out judge: it scores every rotation that excludes its family.
  White-box numbers (the whole zoo attacked, the judge in it) are an extra, labelled as such.
* Scoring goes through the saved 8-bit PNG: the face is re-detected (the detection overlapping the original box
  best; the original landmarks when it is lost, counted in ``redetect_lost``), embedded by the judge and compared
  with the reference photo's embedding.
* Quality (PSNR, SSIM, MS-SSIM) of the protected photo against the source, on the face box and the whole photo.
* Robustness: every :data:`fluxguard.eval.robustness.TRANSFORMS` entry applied to the saved photo, re-detected and
  re-scored; the PSR kept is PSR after / PSR before.
* Purification: the face re-detected in the protected photo is aligned, purified by an SD-style latent diffusion
  model (:func:`fluxguard.eval.purification.purify`), pasted back and re-scored.

Everything is cached under ``out_dir`` (protected photos, per-item records, detections and embeddings keyed by
file content), so an interrupted run resumes where it stopped and a larger ``limit`` only adds the new faces.

Parts: :mod:`~fluxguard.eval.protocol` (identities, targets, configuration), :mod:`~fluxguard.eval.zoo` (FR models,
leave-one-out rotations), :mod:`~fluxguard.eval.cache` (detections, embeddings), :mod:`~fluxguard.eval.protection`
(the protected photos), :mod:`~fluxguard.eval.scoring` (re-detection, cosines, transforms, purified photos),
:mod:`~fluxguard.eval.summary` (the tables of results.json), :mod:`~fluxguard.eval.files` (the folder's files);
this module runs them in order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fluxguard.errors import ConfigError, FluxguardError
from fluxguard.eval.cache import EmbeddingCache, FaceCache, detector_tag
from fluxguard.eval.files import clean_json, item_path, read_rgb, sha1_file, write_json
from fluxguard.eval.protection import protect_all
from fluxguard.eval.protocol import (
    MODES,
    PROTOCOL_TARGETS,
    SCHEMA,
    Detector,
    EvalConfig,
    ProgressFn,
    Subject,
    Target,
    find_subjects,
    find_targets,
    reference_key,
)
from fluxguard.eval.purification import Purifier, make_purifier
from fluxguard.eval.scoring import Scorer, lazy
from fluxguard.eval.summary import summarise
from fluxguard.eval.zoo import ModelSet, Zoo, all_zoos, judges_of, plan_judges

Refs = Mapping[str, Mapping[str, np.ndarray]]


class Evaluation:
    """Runs the protocol of the module docstring; :func:`evaluate` is the one-call entry point."""

    def __init__(
        self,
        config: EvalConfig,
        *,
        judges: Sequence[str] | None = None,
        attack_models: Sequence[str] | None = None,
        models: Mapping[str, Any] | None = None,
        detector: Detector | None = None,
        targets: Sequence[tuple[str, str]] = PROTOCOL_TARGETS,
        progress: ProgressFn | None = None,
    ) -> None:
        self.cfg = config
        self.out = Path(config.out_dir)
        self.data = Path(config.data_dir)
        if not self.data.is_dir():
            raise FluxguardError("data folder not found", path=self.data)
        for m in config.modes:
            if m not in MODES:
                raise ConfigError(f"mode must be dodge, impersonate or both, got {m!r}")
        self.progress = progress or (lambda s, k, n: None)
        self.target_paths = list(targets)
        # detections (and the embeddings cut at them) depend on the detector: one cache per detector version
        cache = self.out / "cache" / detector_tag(detector)
        self.faces = FaceCache(cache / "faces", detector)
        self.embs = EmbeddingCache(cache / "embeddings")
        self.notes: list[str] = []
        self.models = ModelSet(config.device, self.notes, source=models, attack_models=attack_models, judges=judges)
        self.attack_models = self.models.attack_models
        self.judges = self.models.judges
        self.plans = plan_judges(self.models, config.white_box)
        self.scorer = Scorer(self.models, self.faces, self.embs, self.out / "cache" / "purified", config.device)

    def zoos(self) -> list[Zoo]:
        return all_zoos(self.plans)

    def subjects(self) -> list[Subject]:
        return find_subjects(self.data, self.cfg.limit, self.faces.file_faces, self.notes)

    def targets(self) -> list[Target]:
        return find_targets(self.data, self.target_paths, self.faces.file_faces)

    # ---- scoring
    def score_clean(self, subjects: Sequence[Subject], targets: Sequence[Target], refs: Refs,
                    purifier: Purifier | None) -> dict[str, dict[str, Any]]:
        """Cosines of the unprotected sources (as they are, transformed, purified) to every reference."""
        sc, judges = self.scorer, self.judges
        out: dict[str, dict[str, Any]] = {}
        for k, s in enumerate(subjects):
            self.progress(f"score clean: {s.identity}", k + 1, len(subjects))
            sha = sha1_file(s.source)
            shape = self.faces.file_faces(s.source)[1]
            rec: dict[str, Any] = {}
            for mode in self.cfg.modes:
                ref = refs[reference_key(mode, s, targets)]
                r: dict[str, Any] = {"plain": {j: float(np.dot(sc.embed_file(j, s.source, s.source_face), ref[j]))
                                               for j in judges}}
                if self.cfg.robustness:
                    src = lazy(lambda p=s.source: read_rgb(p))
                    r["transforms"] = sc.score_transforms(judges, sha, src, shape, s.source_face, ref)
                if purifier is not None:
                    r["purified"] = sc.score_purified(judges, s.source, sha, shape, s.source_face, ref, purifier)
                rec[mode] = r
            out[s.identity] = rec
        return out

    def score_protected(self, subjects: Sequence[Subject], targets: Sequence[Target], refs: Refs,
                        purifier: Purifier | None) -> list[dict[str, Any]]:
        """Cosines of the protected photos (as saved, transformed, purified), with their records."""
        sc = self.scorer
        items = []
        work = [(m, z) for m in self.cfg.modes for z in self.zoos()]
        total, done = len(work) * len(subjects), 0
        for mode, zoo in work:
            judges = judges_of(self.plans, zoo)
            names = [j for j, _ in judges]
            for s in subjects:
                done += 1
                meta = json.loads(item_path(self.out, mode, zoo.tag, s.identity, ".json").read_text())
                png = item_path(self.out, mode, zoo.tag, s.identity, ".png")
                sha = meta["png_sha1"]
                self.progress(f"score {mode} {zoo.tag}: {s.identity}", done, total)
                ref = refs[reference_key(mode, s, targets)]
                shape = self.faces.file_faces(s.source)[1]
                box, lm = s.source_face.box, s.source_face.landmarks
                prot = lazy(lambda p=png: read_rgb(p))
                scores: dict[str, Any] = {"protected": sc.score_image(names, "file-" + sha, prot, shape, box, lm,
                                                                      ref)}
                if self.cfg.robustness:
                    scores["transforms"] = sc.score_transforms(names, sha, prot, shape, s.source_face, ref)
                if purifier is not None:
                    scores["purified"] = sc.score_purified(names, png, sha, shape, s.source_face, ref, purifier)
                items.append({**meta, "judges": {j: {"white_box": wb} for j, wb in judges}, "scores": scores})
        return items

    # ---- the whole run
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_run_file()
        subjects = self.subjects()
        targets = self.targets() if "impersonate" in self.cfg.modes else []
        t0 = time.perf_counter()
        protect_all(self.cfg, self.models, self.zoos(), subjects, targets, self.progress)
        purifier = make_purifier(self.cfg.purification, self.cfg.seed, self.cfg.device, self.notes)
        refs = self.scorer.references(subjects, targets, "impersonate" in self.cfg.modes)
        clean = self.score_clean(subjects, targets, refs, purifier)
        items = self.score_protected(subjects, targets, refs, purifier)
        results = summarise(self.cfg, self.models, self.plans, subjects, targets, clean, items, purifier, self.notes)
        results["wall_seconds_this_run"] = round(time.perf_counter() - t0, 1)
        return results

    def _run_fingerprint(self) -> dict[str, Any]:
        return {"method": self.cfg.method, "params": self.cfg.params, "strength": self.cfg.strength,
                "seed": self.cfg.seed, "attack_models": [self.models.tag(m) for m in self.attack_models],
                "targets": self.target_paths,
                "schema": SCHEMA}

    def _check_run_file(self) -> None:
        """A resumed run must use the settings that made the cached photos."""
        p = self.out / "run.json"
        fp = clean_json(json.loads(json.dumps(self._run_fingerprint(), default=str)))
        if p.is_file():
            old = json.loads(p.read_text())
            if old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise ConfigError(f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                                  "use another --out or delete it")
        else:
            write_json(p, fp)


def evaluate(
    method: str,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "both",
    seed: int = 0,
    limit: int | None = None,
    judges: Sequence[str] | None = None,
    robustness: bool = True,
    purification: Any = "auto",
    white_box: bool = False,
    strength: str | None = None,
    device: str = "cpu",
    attack_models: Sequence[str] | None = None,
    models: Mapping[str, Any] | None = None,
    detector: Detector | None = None,
    targets: Sequence[tuple[str, str]] = PROTOCOL_TARGETS,
    progress: ProgressFn | None = None,
    write_report: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Evaluate a protection method on the eval identities of a face folder; see the module docstring.

    Args:
        method: a name in :data:`fluxguard.methods.METHODS`.
        data_dir: a folder laid out like ``../shared/faces`` (identities/, portraits/, MANIFEST.tsv).
        out_dir: results and caches (re-running with the same settings resumes).
        mode: ``"dodge"``, ``"impersonate"`` or ``"both"``.
        seed: seeds the method (every face uses it).
        limit: number of identities (protocol order); None = all.
        judges: FR models that score (default: every available model; shipped ones rotate out of the attack zoo).
        robustness: re-score after every :data:`~fluxguard.eval.robustness.TRANSFORMS` entry.
        purification: ``"auto"`` (the lite SD model when shipped), an SD folder / hub id, an SDBackend, or None.
        white_box: also attack with the whole zoo and score the attacked models (a labelled extra).
        strength: the method's preset.
        device: torch device of the method and the judges.
        attack_models: the attack zoo (default: every shipped FR model).
        models: name -> FaceRecognizer to use instead of loading (tests, custom zoos).
        detector: RGB -> faces (default: :func:`fluxguard.faces.detect.detect_faces`).
        targets: impersonation (target photo, test photo) pairs relative to ``data_dir``.
        progress: ``progress(stage, done, total)``.
        write_report: write results.json, results.md and report.html into ``out_dir`` (else only return them).
        **params: method parameters.

    Returns:
        The results dictionary (written to ``out_dir/results.json`` when ``write_report``).
    """
    modes = MODES if mode == "both" else (mode,)
    cfg = EvalConfig(method=method, data_dir=Path(data_dir), out_dir=Path(out_dir), modes=tuple(modes), seed=seed,
                     limit=limit, robustness=robustness, purification=purification, white_box=white_box,
                     strength=strength, device=device, params=dict(params))
    ev = Evaluation(cfg, judges=judges, attack_models=attack_models, models=models, detector=detector,
                    targets=targets, progress=progress)
    results = ev.run()
    if write_report:
        from fluxguard.eval.report import write_reports

        write_reports(results, cfg.out_dir)
    return results
