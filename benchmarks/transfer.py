"""Transfer at the visibility budget: black-box PSR against FR models never attacked, with visibility columns.

Protocol (the cheap black-box check that ablations need; the leave-one-out table is ``benchmarks/protection.py``):

* Faces: the first ``--limit`` eval-split identities with two photos (protocol order, as the evaluation), both modes.
* Attack: every shipped FR model (``fluxguard.recognition.shipped_models``). Judges: FR models outside that zoo
  (``--judges``, default ``faceres-deep,faceplugin-mfn512``; they are converted from their npm packages into the user
  cache on first use), at their thresholds calibrated on the disjoint calib split.
* Dodging succeeds when the protected face's cosine to a *different* photo of the person falls below the judge's
  threshold; impersonation (one of the four protocol targets, round-robin) when its cosine to the target's *other*
  photo rises above it. Faces are embedded at the detected landmarks of the source photo (the change is too small
  to move a detector, and the evaluation runner checks re-detection).
* ``social``: the same scoring after the social-network chain (longer side to 1080 px, JPEG 75), and the share of
  PSR kept.
* Each PSR is the mean over judges with a Wilson 95 % interval over identities (``fluxguard.eval.psr``); visibility
  is measured on the saved 8-bit photo over the face mask (``fluxguard.eval.quality.face_quality``).

Rows are named in :data:`ROWS`; protected photos are cached in ``--work`` so adding rows or identities resumes.

    python benchmarks/transfer.py --limit 30 --rows pgd,pgd-luma,fluxguard --append
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FARS = ("1e-1", "1e-2")
MODES = ("dodge", "impersonate")
# name -> (method, strength, parameters, what the row shows)
ROWS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "pgd-low": ("pgd", "low", {}, "PGD at the low budget"),
    "pgd": ("pgd", "medium", {}, "PGD (MI-FGSM + DI, grey-level steps), the default, at the medium budget"),
    "pgd-high": ("pgd", "high", {}, "PGD at the high budget (+ JPEG EOT)"),
    "fluxguard-low": ("fluxguard", "low", {}, "Flux-Guard on the lite models, low budget"),
    "fluxguard": ("fluxguard", "medium", {}, "Flux-Guard on the lite models, medium budget"),
    "fluxguard-high": ("fluxguard", "high", {}, "Flux-Guard on the lite models, high budget"),
    "wdp-low": ("wdp", "low", {}, "WDP on the lite models, low budget"),
    "wdp": ("wdp", "medium", {}, "WDP on the lite models, medium budget"),
    "wdp-high": ("wdp", "high", {}, "WDP on the lite models, high budget"),
    # past the presets, to show how much visibility a goal would cost: high's per-pixel scales x1.5 and x2 (caps
    # raised with them so the scales bind, as at the presets)
    "pgd-high-x1.5": ("pgd", "high", {"budget": {"name": "high x1.5", "smooth_scale": 1.5, "texture_scale": 6.0,
                                                 "max_delta_e": 4.5, "max_visible": 1.0}},
                      "PGD past the presets: high's per-pixel scales x1.5 (+ JPEG EOT)"),
    "pgd-high-x2": ("pgd", "high", {"budget": {"name": "high x2", "smooth_scale": 2.0, "texture_scale": 8.0,
                                               "max_delta_e": 6.0, "max_visible": 1.0}},
                    "PGD past the presets: high's per-pixel scales x2 (+ JPEG EOT)"),
    "pgd-high-smooth": ("pgd", "high", {"budget": {"name": "high, smooth x1.5", "smooth_scale": 1.5,
                                                   "texture_scale": 4.0, "max_delta_e": 4.5, "max_visible": 1.0}},
                        "PGD past the presets: high with only its smooth-skin scale x1.5 (+ JPEG EOT)"),
    "pgd-high-texture": ("pgd", "high", {"budget": {"name": "high, texture x1.5", "smooth_scale": 1.0,
                                                    "texture_scale": 6.0, "max_delta_e": 4.5, "max_visible": 1.0}},
                         "PGD past the presets: high with only its texture scale x1.5 (+ JPEG EOT)"),
    # levers, each against its reference row: pgd-rgb for the R, G, B rows (measured before grey-level steps became
    # the default), pgd for the other pgd-* rows, fluxguard for the fluxguard-* rows
    "pgd-rgb": ("pgd", "medium", {"colour": "rgb"}, "sign steps on R, G and B separately"),
    "pgd-plain": ("pgd", "medium", {"colour": "rgb", "momentum": 0.0, "diversity_prob": 0.0},
                  "R, G, B; plain PGD: no momentum, no input diversity"),
    "pgd-balanced": ("pgd", "medium", {"colour": "rgb", "model_weighting": "balanced"},
                     "R, G, B; per-model gradient normalisation"),
    "pgd-eot": ("pgd", "medium", {"colour": "rgb", "eot": ["jpeg"]}, "R, G, B; expectation over JPEG"),
    "pgd-centroid": ("pgd", "medium", {"colour": "rgb", "target_views": 8, "source_weight": 0.5},
                     "R, G, B; impersonation towards the target's centroid over 8 views, away from the source"),
    "pgd-sparse": ("pgd", "medium", {"projection": "sparse", "step_size": 4 / 255},
                   "the colour-difference budget as an L1 ball (sparse change)"),
    "pgd-ti": ("pgd", "medium", {"ti_kernel": 5}, "translation-invariant gradients (5 px)"),
    "pgd-dropout": ("pgd", "medium", {"model_dropout": 0.3},
                    "model augmentation: each surrogate thinned by dropout at every step, by a rate that uses 30 % of "
                    "its matching margin on the clean face"),
    "pgd-spectrum": ("pgd", "medium", {"spectrum_rho": 0.5},
                     "spectrum augmentation (SSA): noise at the bound and every frequency scaled by U(0.5, 1.5)"),
    "pgd-margin": ("pgd", "medium", {"model_weighting": "margin"},
                   "each surrogate's cosine divided by its matching margin (1 - FAR 1e-2 threshold)"),
    "pgd-strong": ("pgd", "medium", {"steps": 150, "step_size": 0.5 / 255, "diversity_prob": 0.0},
                   "a stronger white-box attack: 150 steps of 0.5 grey levels, no input diversity"),
    "pgd-window": ("pgd", "medium", {"window": True},
                   "each face attacked in a window of the photo (an integer shift: nothing resampled between the "
                   "attack's view and the photo), not in an aligned crop"),
    "pgd-feature": ("pgd", "medium", {"feature_weight": 1.0},
                    "feature-level loss: each surrogate's middle-layer feature map pushed away from the clean face's "
                    "(cosine, weight 1) besides its embedding"),
    "pgd-feature-strong": ("pgd", "medium", {"feature_weight": 10.0},
                           "feature-level loss at weight 10: the middle layer's term leads the embedding's"),
    "pgd-vmi": ("pgd", "medium", {"steps": 20, "step_size": 1.5 / 255, "variance_samples": 2},
                "variance tuning (VMI-FGSM): 20 steps of 1.5 grey levels, each corrected by 2 gradients drawn within "
                "1.5 x the bound (60 gradients, against 50)"),
    "pgd-vmi-long": ("pgd", "medium", {"variance_samples": 4},
                     "variance tuning on the default's 50 steps of 1 grey level, 4 samples a step (250 gradients: "
                     "5 x the time)"),
    "fluxguard-long": ("fluxguard", "medium", {"attack_start": 6, "adam_steps": 12},
                       "Flux-Guard, 4 attacked steps x 12 Adam iterations (48, against 20)"),
    "fluxguard-gain": ("fluxguard", "medium", {"change_gain": 3.0},
                       "Flux-Guard, the regenerated change x3 before it is shaped into the budget"),
    "fluxguard-full": ("fluxguard", "medium", {"change_gain": 3.0, "jnd_midpoint": 1.0},
                       "Flux-Guard, change x3 and the identity weight halved only at the full budget"),
}


def row_folder(work: Path, method: str, strength: str, params: dict[str, Any], models: list[str]) -> Path:
    """The cache folder of a row: keyed by every parameter the method resolves (defaults included, the seed of the
    run aside), so rows that end up with the same settings share their photos and a changed default never reuses
    stale ones."""
    from fluxguard.api import Protector

    resolved = Protector(method, fr_models=models, judges=[], strength=strength, **params).params()
    resolved = {k: v for k, v in resolved.items() if k not in ("mode", "strength")}
    key = hashlib.sha1(json.dumps([method, resolved, models], sort_keys=True, default=str).encode()).hexdigest()
    return work / f"{method}-{key[:12]}"


def social(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The social-network chain and the scale it applied to coordinates."""
    from fluxguard.eval.robustness import social_network

    out = social_network(1080, 75)(rgb)
    return out, out.shape[1] / rgb.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="pgd")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--modes", default="dodge,impersonate")
    ap.add_argument("--judges", default="faceres-deep,faceplugin-mfn512")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "fluxguard" / "bench" / "transfer")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="transfer")
    ap.add_argument("--append", action="store_true", help="keep the other rows of an existing results file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sheet-row", default=None, help="row whose contact sheet is written (default: the first)")
    ap.add_argument("--merge", nargs="*", type=Path, default=None,
                    help="combine the rows of these results files (runs made in parallel) into --out/--name, then "
                    "write the contact sheet of --sheet-row from the cached photos; protects and judges nothing")
    args = ap.parse_args()
    if args.merge is not None:
        merge(args)
        return

    import torch

    from fluxguard.api import Protector, recognizers, to_tensor
    from fluxguard.data import find_faces_dir
    from fluxguard.eval.protocol import PROTOCOL_TARGETS, find_subjects, find_targets
    from fluxguard.eval.psr import rate_interval
    from fluxguard.faces.detect import detect_cached
    from fluxguard.io import load_image
    from fluxguard.recognition import shipped_models

    torch.set_num_threads(args.threads)
    data = args.data or find_faces_dir()
    if data is None:
        sys.exit("no face photos: set FLUXGUARD_DATA or put them in ../shared/faces")

    def file_faces(p: Path) -> tuple[list, tuple[int, int]]:
        img = load_image(p)
        return detect_cached(p, image=img.rgb), img.rgb.shape[:2]

    notes: list[str] = []
    subjects = find_subjects(data, args.limit, file_faces, notes)
    targets = find_targets(data, PROTOCOL_TARGETS, file_faces)
    judges = recognizers(args.judges.split(","))
    zoo = shipped_models()
    modes = args.modes.split(",")

    def embed(model: Any, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(to_tensor(rgb)[None], np.asarray(landmarks, np.float64)[None])[0].numpy()

    refs: dict[tuple[str, str], np.ndarray] = {}

    def reference(j: Any, mode: str, s: Any) -> np.ndarray:
        key = (j.name, f"ref:{s.identity}" if mode == "dodge" else f"tgt:{s.index % len(targets)}")
        if key not in refs:
            if mode == "dodge":
                refs[key] = embed(j, load_image(s.reference).rgb, s.reference_face.landmarks)
            else:
                t = targets[s.index % len(targets)]
                refs[key] = embed(j, load_image(t.test).rgb, t.test_face.landmarks)
        return refs[key]

    results_path = args.out / f"{args.name}.json"
    old = json.loads(results_path.read_text()) if (args.append and results_path.is_file()) else {}
    rows_out: dict[str, Any] = dict(old.get("rows", {}))
    for name in args.rows.split(","):
        method, strength, params, what = ROWS[name]
        folder = row_folder(args.work, method, strength, params, zoo)
        folder.mkdir(parents=True, exist_ok=True)
        prot = None
        per_mode: dict[str, Any] = {}
        for mode in modes:
            items = []
            for s in subjects:
                png, meta_p = folder / f"{mode}-{s.identity}.png", folder / f"{mode}-{s.identity}.json"
                src = load_image(s.source)
                if not (png.is_file() and meta_p.is_file()):
                    if prot is None or prot.mode != mode:
                        prot = Protector(method, mode=mode, fr_models=zoo, judges=[], strength=strength, **params)
                    tgt = targets[s.index % len(targets)] if mode == "impersonate" else None
                    t0 = time.perf_counter()
                    res = prot.protect(src, faces=[s.source_face], seed=0,
                                       target=None if tgt is None else load_image(tgt.photo),
                                       target_face=None if tgt is None else tgt.face)
                    secs = time.perf_counter() - t0
                    from PIL import Image

                    buf = io.BytesIO()
                    Image.fromarray(res.image).save(buf, "PNG")
                    png.write_bytes(buf.getvalue())
                    meta_p.write_text(json.dumps({"quality": res.faces[0].quality, "seconds": secs,
                                                  "params": {k: v for k, v in prot.params().items()
                                                             if k != "fr_models"}}, default=str))
                    print(f"{name} {mode} {s.identity}: {secs:.1f} s", flush=True)
                meta = json.loads(meta_p.read_text())
                out_rgb = load_image(png).rgb
                soc, scale = social(out_rgb)
                lm = s.source_face.landmarks
                item = {"identity": s.identity, "quality": meta["quality"], "seconds": meta["seconds"], "judges": {}}
                for j in judges:
                    ref = reference(j, mode, s)
                    item["judges"][j.name] = {
                        "clean": float(embed(j, src.rgb, lm) @ ref),
                        "protected": float(embed(j, out_rgb, lm) @ ref),
                        "social": float(embed(j, soc, lm * scale) @ ref),
                    }
                items.append(item)
            per_mode[mode] = summarise(items, judges, mode, rate_interval)
        params_used = json.loads((next(folder.glob("*.json"))).read_text())["params"]
        rows_out[name] = {"method": method, "strength": strength, "params": params, "what": what,
                          "params_used": params_used, "n_identities": len(subjects),
                          "identities": [s.identity for s in subjects], "modes": per_mode,
                          "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:])}
        print(json.dumps({name: {m: v["mean"] for m, v in per_mode.items()}}), flush=True)

    report = {
        "command": "python benchmarks/transfer.py " + " ".join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine()},
        "protocol": {"attack_models": zoo, "judges": {j.name: j.calibrated_spec().thresholds for j in judges},
                     "targets": [str(t.photo.relative_to(data)) for t in targets], "notes": notes},
        "rows": rows_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(report, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(report))
    args.sheet_row = args.sheet_row or args.rows.split(",")[0]
    if args.sheet_row in rows_out and "dodge" in rows_out[args.sheet_row]["modes"]:
        write_sheet(args, rows_out[args.sheet_row])


def merge(args: argparse.Namespace) -> None:
    """One report from several (rows of later files replace same-named earlier ones)."""
    report: dict[str, Any] = {}
    for path in args.merge:
        part = json.loads(path.read_text())
        for row in part["rows"].values():  # files written before rows carried their own command and identities
            row.setdefault("command", part["command"])
            row.setdefault("identities", part["protocol"].get("identities", [])[: row["n_identities"]])
        if not report:
            report = {**part, "rows": {}}
            report["protocol"] = {k: v for k, v in part["protocol"].items() if k not in ("n_identities",
                                                                                      "identities")}
        for row in part["rows"].values():  # the command that makes the row, wherever the parallel run wrote it
            row["command"] = re.sub(r" --(name|out) \S+", "", row["command"])
        report["rows"].update(part["rows"])
    # final rows first (each method at each budget), then the levers, in the order of ROWS
    order = {name: i for i, name in enumerate(ROWS)}
    report["rows"] = dict(sorted(report["rows"].items(), key=lambda kv: order.get(kv[0], len(order))))
    report["created"] = max(json.loads(p.read_text())["created"] for p in args.merge)
    report["command"] = "python benchmarks/transfer.py --merge " + " ".join(str(p) for p in args.merge)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(report))
    if args.sheet_row:
        write_sheet(args, report["rows"][args.sheet_row])


def write_sheet(args: argparse.Namespace, row: dict[str, Any]) -> None:
    """The contact sheet of a row's first 8 dodging faces, from the cached protected photos."""
    from PIL import Image

    from fluxguard.data import find_faces_dir
    from fluxguard.eval.contact_sheet import SheetRow, caption, contact_sheet
    from fluxguard.eval.protocol import find_subjects
    from fluxguard.faces.detect import detect_cached
    from fluxguard.io import load_image
    from fluxguard.recognition import shipped_models

    data = args.data or find_faces_dir()

    def file_faces(p: Path) -> tuple[list, tuple[int, int]]:
        img = load_image(p)
        return detect_cached(p, image=img.rgb), img.rgb.shape[:2]

    name = args.sheet_row
    folder = row_folder(args.work, row["method"], row["strength"], row["params"], shipped_models())
    sheet = []
    for s in find_subjects(data, 8, file_faces, []):
        png, meta = folder / f"dodge-{s.identity}.png", folder / f"dodge-{s.identity}.json"
        if png.is_file() and meta.is_file():
            q = json.loads(meta.read_text())["quality"]
            sheet.append(SheetRow(load_image(s.source).rgb, load_image(png).rgb, s.source_face.box,
                                  caption(q, s.identity)))
    img = contact_sheet(sheet, title=f"{name}: {row['what']}")
    Image.fromarray(img).save(args.out / f"{args.name}_{name}.jpg", quality=88, subsampling=0, optimize=True)


def summarise(items: list[dict], judges: list, mode: str, rate_interval: Any) -> dict[str, Any]:
    """Per judge and mean PSR (+ Wilson interval over identities) for protected, social and clean; visibility."""
    def success(cos: float, th: float) -> bool:
        return cos < th if mode == "dodge" else cos > th

    out: dict[str, Any] = {"judges": {}, "mean": {}, "interval": {}, "clean": {}, "social": {}, "kept": {}}
    n = len(items)
    for far in FARS:
        shares = {"protected": np.zeros(n), "clean": np.zeros(n), "social": np.zeros(n)}
        for j in judges:
            th = j.calibrated_spec().thresholds[far]
            row = {}
            for kind in shares:
                hits = np.array([success(it["judges"][j.name][kind], th) for it in items], float)
                shares[kind] += hits / len(judges)
                row[kind] = 100 * float(hits.mean())
            out["judges"].setdefault(j.name, {})[far] = row
        ri = rate_interval(float(shares["protected"].mean()), n)
        out["mean"][far] = 100 * ri.value
        out["interval"][far] = [100 * ri.low, 100 * ri.high]
        out["clean"][far] = 100 * float(shares["clean"].mean())
        out["social"][far] = 100 * float(shares["social"].mean())
        out["kept"][far] = (out["social"][far] / out["mean"][far]) if out["mean"][far] else None
    q = [it["quality"] for it in items]
    out["quality"] = {k: float(np.mean([x[k] for x in q if x.get(k) is not None]))
                      for k in ("delta_e_mean", "delta_e_p95", "visible", "ssim_mask")}
    out["quality"]["max_colour_shift"] = float(max(max(abs(x[k]) for k in ("dL", "da", "db")) for x in q))
    out["quality"]["changed_outside"] = int(sum(x["changed_outside"] for x in q))
    out["seconds_per_face"] = float(np.mean([it["seconds"] for it in items]))
    out["items"] = items
    return out


def judge_words(protocol: dict[str, Any]) -> str:
    """How the judges relate to the attack: never attacked (black-box), or the attacked models themselves (the
    white-box ceiling of the same protocol, ``--judges`` set to the attack models)."""
    attacked = set(protocol["judges"]) & set(protocol["attack_models"])
    if not attacked:
        return "judges never attacked"
    if attacked == set(protocol["judges"]):
        return "judges the attacked models themselves (white-box: the ceiling of any transfer)"
    return f"judges (attacked: {', '.join(sorted(attacked))})"


def markdown(report: dict[str, Any]) -> str:
    p = report["protocol"]
    ns = sorted({r["n_identities"] for r in report["rows"].values()})
    commands = list(dict.fromkeys(r["command"] for r in report["rows"].values()))
    modes = [m for m in MODES if any(m in r["modes"] for r in report["rows"].values())]
    if len(commands) > 1:  # rows run apart (in parallel, or added later): one command that redoes them all
        only = "" if len(modes) == len(MODES) else f" --modes {','.join(modes)}"
        commands = [f"python benchmarks/transfer.py --rows {','.join(report['rows'])} --limit {max(ns)}{only}"]
    lines = [
        "# Transfer at the visibility budget", "",
        *[f"`{c}`" for c in commands],
        *(["(rows were run apart, each with the command its JSON entry names; the protected photos are cached, so "
           "a rerun of these rows only judges)"] if len({r["command"] for r in report["rows"].values()}) > 1
          else []), "",
        f"({report['created']}, {report['environment']['threads']} torch thread). "
        f"{' or '.join(map(str, ns))} eval-split identities (the first of the protocol order; per row below), "
        f"{'both modes' if len(modes) == len(MODES) else ', '.join(modes) + ' only'}; "
        f"attack: {', '.join(p['attack_models'])}; "
        f"{judge_words(p)}: {', '.join(p['judges'])}. PSR = mean over judges, [Wilson 95 % interval over "
        "identities]; clean = the unprotected photo scored the same way; social = after resize to 1080 px + JPEG 75 "
        "(kept = social / PSR). Visibility on the saved photo over the face mask.", "",
        *[f"- {n}" for n in report.get("notes", [])], *([""] if report.get("notes") else []),
    ]
    for mode in MODES:
        if not any(mode in r["modes"] for r in report["rows"].values()):
            continue
        lines += [f"## {mode}", "",
                  "| row | what | n | PSR @1e-1 | PSR @1e-2 | clean @1e-2 | per judge @1e-2: PSR / clean | "
                  "social @1e-2 (kept) | dE2000 | visible | max colour shift | s/face |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in report["rows"].items():
            m = r["modes"].get(mode)
            if m is None:
                continue
            cells = []
            for far in FARS:
                lo, hi = m["interval"][far]
                cells.append(f"{m['mean'][far]:.1f} [{lo:.0f}, {hi:.0f}]")
            kept = m["kept"]["1e-2"]
            q = m["quality"]
            # the mean hides how unequal the judges are: a weak judge misses many unprotected photos already
            per_judge = "; ".join(f"{j} {v['1e-2']['protected']:.0f} / {v['1e-2']['clean']:.0f}"
                                  for j, v in m["judges"].items())
            lines.append(
                f"| {name} | {r['what']} | {r['n_identities']} | {cells[0]} | {cells[1]} | {m['clean']['1e-2']:.1f} | "
                f"{per_judge} | {m['social']['1e-2']:.1f} ({'–' if kept is None else f'{100 * kept:.0f} %'}) | "
                f"{q['delta_e_mean']:.2f} | {100 * q['visible']:.1f} % | {q['max_colour_shift']:.2f} | "
                f"{m['seconds_per_face']:.1f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
