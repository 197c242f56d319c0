"""Utility and privacy of AdvFace templates on held-out people (the ``eval`` split), against clean templates and
against plain Gaussian noise of the same size.

Utility: verification with protected templates in the gallery and clean probes (pairs of photos; genuine = same
identity, impostor = different identities of one source): TAR at FAR 1e-2 / 1e-3 (thresholds read off the impostor
scores of that setting, i.e. the ROC), 10-fold verification accuracy on balanced pairs, and TAR at the model's
calibrated FAR 1e-2 threshold (what a deployed system with a fixed threshold sees).

Privacy: a separately trained attacker (a different architecture, trained on other identities than the shadow
decoder) reconstructs the face from each template; we report SSIM / PSNR of its reconstruction to the real aligned
face (64 px, scikit-image on uint8) and how often a *different* FR model of the zoo (the judge) matches the
reconstruction to the person at the judge's calibrated FAR 1e-2 threshold: against another photo of the person
(``match_other``) and against the same photo (``match_same``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fluxguard.errors import FluxguardError

log = logging.getLogger(__name__)

SETTINGS = ("clean", "gauss_A", "A", "gauss_B", "B")
DEFAULT_JUDGES = {"mobilefacenet": "mobileface"}  # any other model is judged by mobilefacenet
EVAL_FARS = ("1e-2", "1e-3")


def judge_for(model: str) -> str:
    """The FR model that judges reconstructions of ``model`` templates (a different one; both judges take the
    ArcFace-aligned crop a reconstruction is)."""
    return DEFAULT_JUDGES.get(model, "mobilefacenet")


@dataclass
class EvalFaces:
    """The eval-split faces: portrait crops, landmarks, identities, sources, and the real 64 px aligned faces."""

    crops: np.ndarray  # (N, S, S, 3) uint8
    landmarks: np.ndarray  # (N, 5, 2) in crop pixels
    identities: np.ndarray
    sources: np.ndarray
    keys: np.ndarray
    targets: np.ndarray = field(init=False)  # (N, 64, 64, 3) uint8

    def __post_init__(self) -> None:
        from fluxguard.features.faceset import recon_target, to_tensor

        out = []
        for i in range(0, len(self.crops), 64):
            t = recon_target(to_tensor(self.crops[i:i + 64]), self.landmarks[i:i + 64])
            out.append((t.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8))
        self.targets = np.concatenate(out) if out else np.zeros((0, 64, 64, 3), np.uint8)

    def subset(self, idx: np.ndarray) -> EvalFaces:
        return EvalFaces(self.crops[idx], self.landmarks[idx], self.identities[idx], self.sources[idx], self.keys[idx])


def load_eval_faces(data: str | Path, detections: Path | None = None, limit: int | None = None) -> EvalFaces:
    """Detect and crop the faces of the ``eval`` split of ``data`` (detections cached on disk); with ``limit``, about
    that many faces of whole identities (chosen before detection, so a small run stays fast)."""
    from fluxguard.faces.detect import load_rgb
    from fluxguard.features.faceset import collect, detector_landmarks, portrait_crop

    keep = _identity_subset(data, limit) if limit is not None else None
    items = collect(data, "eval", detector_landmarks(detections), portraits=False, identities=keep)
    if not items:
        raise FluxguardError("no faces of the eval split found", path=data)
    crops, lms = zip(*(portrait_crop(load_rgb(it.path), it.landmarks) for it in items), strict=True)
    return EvalFaces(np.stack(crops), np.stack(lms), np.array([it.group for it in items]),
                     np.array([it.source for it in items]), np.array([it.key for it in items]))


def _identity_subset(data: str | Path, limit: int) -> set[str]:
    """Eval-split identities with about ``limit`` photos in all, in the order of a hash (a stable subset)."""
    import hashlib

    from fluxguard.data import identity_groups, list_photos, photos_in_split

    groups = identity_groups(photos_in_split(list_photos(Path(data)), "eval"), min_photos=1)
    keep: set[str] = set()
    total = 0
    for g in sorted(groups, key=lambda g: hashlib.sha1(g.encode()).hexdigest()):
        if total >= limit:
            break
        keep.add(g)
        total += len(groups[g])
    return keep


# --- metrics ----------------------------------------------------------------------------------------------------


def verification_metrics(gallery: np.ndarray, probe: np.ndarray, genuine: np.ndarray, impostor: np.ndarray,
                         calibrated: float | None, seed: int = 0) -> dict:
    """TAR at FAR (ROC), 10-fold balanced accuracy, TAR/FAR at a fixed threshold; pairs are (gallery, probe)."""
    g = np.einsum("kd,kd->k", gallery[genuine[:, 0]], probe[genuine[:, 1]])
    i = np.einsum("kd,kd->k", gallery[impostor[:, 0]], probe[impostor[:, 1]])
    out: dict = {"genuine_pairs": int(len(g)), "impostor_pairs": int(len(i)), "tar": {}}
    s = np.sort(i)[::-1]
    for far in EVAL_FARS:
        k = int(np.floor(float(far) * len(s)))
        out["tar"][far] = float((g > s[k]).mean()) if k >= 1 else None
    out["accuracy"] = _tenfold_accuracy(g, i, seed)
    if calibrated is not None:
        out["calibrated"] = {"threshold": calibrated, "tar": float((g > calibrated).mean()),
                             "far": float((i > calibrated).mean())}
    out["genuine_mean"], out["impostor_mean"] = float(g.mean()), float(i.mean())
    return out


def _tenfold_accuracy(genuine: np.ndarray, impostor: np.ndarray, seed: int) -> float:
    """LFW-style accuracy: as many impostor as genuine pairs, threshold chosen on 9 folds and applied to the 10th."""
    rng = np.random.default_rng(seed)
    imp = rng.choice(impostor, size=min(len(genuine), len(impostor)), replace=False)
    scores = np.concatenate([genuine, imp])
    labels = np.concatenate([np.ones(len(genuine), bool), np.zeros(len(imp), bool)])
    folds = rng.permutation(len(scores)) % 10
    correct = 0
    for f in range(10):
        tr, te = folds != f, folds == f
        cand = np.unique(scores[tr])
        acc = [((scores[tr] > t) == labels[tr]).mean() for t in cand]
        t = cand[int(np.argmax(acc))]
        correct += int(((scores[te] > t) == labels[te]).sum())
    return correct / len(scores)


def image_metrics(recon: np.ndarray, target: np.ndarray) -> dict:
    """Mean SSIM and PSNR (scikit-image, uint8, colour) of reconstructions against the real aligned faces."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ssim = [structural_similarity(a, b, channel_axis=2, data_range=255) for a, b in zip(recon, target, strict=True)]
    psnr = [peak_signal_noise_ratio(b, a, data_range=255) for a, b in zip(recon, target, strict=True)]
    return {"ssim": float(np.mean(ssim)), "psnr": float(np.mean(psnr))}


def match_rates(judge_recon: np.ndarray, judge_real: np.ndarray, identities: np.ndarray, threshold: float) -> dict:
    """How often the judge matches a reconstruction to its person: other photos / the same photo."""
    same = np.einsum("nd,nd->n", judge_recon, judge_real) > threshold
    sim = judge_recon @ judge_real.T
    mask = (identities[:, None] == identities[None, :]) & ~np.eye(len(identities), dtype=bool)
    other = sim[mask] > threshold
    return {"match_other": float(other.mean()) if other.size else None, "other_pairs": int(other.size),
            "match_same": float(same.mean())}


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def decode(net: torch.nn.Module, templates: np.ndarray, batch: int = 128) -> np.ndarray:
    """(N, 64, 64, 3) uint8 reconstructions."""
    return np.concatenate([_to_uint8(net(torch.from_numpy(templates[i:i + batch]).float()))
                           for i in range(0, len(templates), batch)])


# --- the experiment ---------------------------------------------------------------------------------------------


def threshold_of(model: str, thresholds: dict | None, far: str = "1e-2") -> float | None:
    """A model's calibrated threshold: from a thresholds.json-style table, else the installed calibration."""
    from fluxguard.recognition import FR_MODELS

    if thresholds is not None:
        v = thresholds.get("models", {}).get(model, {}).get("thresholds", {}).get(far)
        if v is not None:
            return float(v)
    return FR_MODELS[model].calibrated_spec().thresholds.get(far)


def require_attacker(model: str, path: Path) -> None:
    """Raise, saying how to make one, unless the evaluation attacker of ``model`` exists at ``path``."""
    if not Path(path).is_file():
        raise FluxguardError(f"no evaluation attacker for {model!r}: `fluxguard features evaluate` trains one on the "
                             "data folder's training split unless --no-train-attackers is given (5-15 min per model "
                             "on one CPU core; `train_attacker` in Python), or pass --attackers DIR", path=path)


def evaluate_model(model: str, faces: EvalFaces, configs: dict, *, attacker: Path, thresholds: dict | None = None,
                   judge: str | None = None, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """All settings for one FR model. Returns (metrics per setting, reconstructions per setting)."""
    from fluxguard.features.advface import AdvFace, gaussian_like
    from fluxguard.features.decoders import load_decoder
    from fluxguard.features.faceset import embed, identity_pairs, recon_landmarks, to_tensor
    from fluxguard.recognition import load_recognizer

    say = progress or (lambda s: log.info(s))
    require_attacker(model, attacker)
    fr = load_recognizer(model)
    judge = judge or judge_for(model)
    if judge == model:
        raise FluxguardError(f"the judge must be another FR model than {model!r}")
    jthr = threshold_of(judge, thresholds)
    if jthr is None:
        raise FluxguardError(f"judge {judge!r} has no calibrated FAR 1e-2 threshold: run `fluxguard calibrate` or "
                             "pass --thresholds")
    net, meta = load_decoder(attacker)
    if meta.get("role") != "attacker" or meta.get("fr_model") != model:
        raise FluxguardError(f"{attacker} is not the evaluation attacker of {model!r} (role {meta.get('role')!r}, "
                             f"model {meta.get('fr_model')!r})")
    t0 = time.perf_counter()
    z = embed(fr, faces.crops, faces.landmarks)
    gen, imp = identity_pairs(_items(faces))
    jm = load_recognizer(judge)
    j_real = embed(jm, faces.crops, faces.landmarks)
    rl = np.broadcast_to(recon_landmarks(), (len(faces.targets), 5, 2))
    say(f"{model}: {len(z)} faces embedded ({time.perf_counter() - t0:.0f} s)")

    templates: dict[str, np.ndarray] = {"clean": z}
    info: dict[str, dict] = {}
    g = torch.Generator().manual_seed(seed)
    for v, cfg in configs.items():
        t0 = time.perf_counter()
        adv = AdvFace(fr, cfg)  # resolves the budget against the model's threshold
        res = adv.run(z)
        templates[v] = res.templates
        templates[f"gauss_{v}"] = gaussian_like(z, res.templates, g)
        info[v] = {"seconds_per_template": (time.perf_counter() - t0) / max(1, len(z)),
                   "projected_fraction": float(res.projected.mean()), "config": adv.config.to_dict()}
        say(f"{model}: variant {v} done ({time.perf_counter() - t0:.0f} s)")

    out: dict = {"model": model, "judge": judge, "judge_threshold": jthr, "faces": len(z),
                 "identities": int(len(set(faces.identities))), "settings": {}}
    calibrated = threshold_of(model, thresholds)
    recons: dict[str, np.ndarray] = {}
    for name in [s for s in SETTINGS if s in templates]:
        p = templates[name]
        rec = decode(net, p)
        recons[name] = rec
        j_rec = embed(jm, to_tensor(rec), rl)
        cos = np.einsum("nd,nd->n", p, z)
        out["settings"][name] = {
            "template_change": {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                                "l2_mean": float(np.linalg.norm(p - z, axis=1).mean())},
            "utility": verification_metrics(p, z, gen, imp, calibrated, seed),
            "privacy": {**image_metrics(rec, faces.targets), **match_rates(j_rec, j_real, faces.identities, jthr)},
            **({"protection": info[name]} if name in info else {}),
        }
    # the ceiling of the privacy metrics: the judge on the real 64 px aligned face itself
    j_tgt = embed(jm, to_tensor(faces.targets), rl)
    out["real_64px"] = match_rates(j_tgt, j_real, faces.identities, jthr)
    return out, recons


def _items(faces: EvalFaces) -> list:
    from fluxguard.features.faceset import FaceItem

    return [FaceItem(k, Path(k), i, s, lm) for k, i, s, lm in
            zip(faces.keys, faces.identities, faces.sources, faces.landmarks, strict=True)]


# --- report -----------------------------------------------------------------------------------------------------


def markdown_table(results: dict) -> str:
    """One row per (model, setting)."""
    lines = ["| model | setting | cos to clean | TAR@1e-2 | TAR@1e-3 | acc | TAR@calib thr | attacker SSIM | PSNR | "
             "judge match (other photo) | judge match (same photo) |", "|" + "---|" * 11]
    for r in results["models"]:
        for name, s in r["settings"].items():
            u, p = s["utility"], s["privacy"]
            cal = u.get("calibrated", {}).get("tar")
            lines.append(f"| {r['model']} | {name} | {s['template_change']['cosine_mean']:.3f} | "
                         f"{_f(u['tar']['1e-2'])} | {_f(u['tar']['1e-3'])} | {u['accuracy']:.3f} | {_f(cal)} | "
                         f"{p['ssim']:.3f} | {p['psnr']:.2f} | {_f(p['match_other'])} | {p['match_same']:.3f} |")
        c = r["real_64px"]
        lines.append(f"| {r['model']} | (real 64 px face, judge {r['judge']}) | | | | | | 1 | inf | "
                     f"{_f(c['match_other'])} | {c['match_same']:.3f} |")
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _png(rgb: np.ndarray, scale: int = 2) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    if scale != 1:
        im = im.resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def html_report(results: dict, pictures: dict[str, dict[str, np.ndarray]], targets: np.ndarray,
                picks: np.ndarray, table: str) -> str:
    """A self-contained HTML page: the table and, per model, real faces and the attacker's reconstructions."""
    parts = ["<!doctype html><meta charset='utf-8'><title>AdvFace evaluation</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{display:block}"
             ".grid td{border:none;padding:1px;text-align:center;font-size:11px}</style>",
             "<h1>AdvFace: template inversion before and after protection</h1>",
             f"<p>{html.escape(results['note'])}</p>",
             "<pre>" + html.escape(json.dumps(results["command"])) + "</pre>",
             _md_to_html(table)]
    for model, recs in pictures.items():
        parts.append(f"<h2>{html.escape(model)}: attacker reconstructions</h2><table class='grid'>")
        rows = [("real face", targets[picks])] + [(k, recs[k][picks]) for k in SETTINGS if k in recs]
        for label, imgs in rows:
            cells = "".join(f"<td><img src='{_png(im)}'></td>" for im in imgs)
            parts.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
        parts.append("</table>")
    return "\n".join(parts)


def _md_to_html(md: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in md.strip().splitlines() if not r.startswith("|---")]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def run_evaluation(data: str | Path, models: Sequence[str], configs: dict, *, attackers: Path | None = None,
                   thresholds: dict | None = None, limit: int | None = None, detections: Path | None = None,
                   out: Path | None = None, command: str = "", seed: int = 0, pictures: int = 12,
                   train_attackers: bool = False, attacker_steps: int = 300,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate every model of ``models`` under every setting; write JSON, Markdown and HTML into ``out``.

    ``train_attackers``: first train the missing evaluation attackers on the training split of ``data``."""
    from fluxguard.features.decoders import attackers_dir

    say = progress or (lambda s: log.info(s))
    root = attackers or attackers_dir()
    for m in models:  # before the slow part
        path = root / f"attacker-{m}.safetensors"
        if train_attackers and not path.is_file():
            from fluxguard.features.training import train_attacker

            say(f"{m}: training the evaluation attacker on the training split of {data} ({attacker_steps} steps)")
            t0 = time.perf_counter()
            train_attacker(m, data, steps=attacker_steps, detections=detections, out=path)
            say(f"{m}: attacker trained ({time.perf_counter() - t0:.0f} s) -> {path}")
        require_attacker(m, path)
    t0 = time.perf_counter()
    faces = load_eval_faces(data, detections, limit)
    say(f"eval split: {len(faces.keys)} faces of {len(set(faces.identities))} identities "
        f"({time.perf_counter() - t0:.0f} s)")
    results: dict = {"models": [], "command": command, "data": str(data),
                     "note": "Eval-split identities (held out from calibration and from the decoders' training). "
                             "Gallery: protected templates; probes: clean templates. gauss_X: isotropic noise with "
                             "the same template change as variant X. Privacy: a separately trained attacker "
                             "(other architecture, other identities) inverts the templates."}
    recs_all: dict[str, dict[str, np.ndarray]] = {}
    for m in models:
        path = root / f"attacker-{m}.safetensors"
        r, recs = evaluate_model(m, faces, configs, attacker=path, thresholds=thresholds, seed=seed,
                                 progress=progress)
        results["models"].append(r)
        recs_all[m] = recs
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if out is not None:
        from fluxguard.io import write_bytes_atomic

        table = markdown_table(results)
        picks = np.linspace(0, len(faces.keys) - 1, min(pictures, len(faces.keys))).round().astype(int)
        write_bytes_atomic(out / "advface_eval.json", json.dumps(results, indent=1).encode(), overwrite=True)
        write_bytes_atomic(out / "advface_eval.md", table.encode(), overwrite=True)
        page = html_report(results, recs_all, faces.targets, picks, table)
        write_bytes_atomic(out / "advface_eval.html", page.encode(), overwrite=True)
    return results
