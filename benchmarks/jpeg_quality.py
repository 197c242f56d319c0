"""Which JPEG quality keeps the protection? PGD dodging, saved as PNG and as JPEG at several qualities.

Each face is protected once with the CLI's defaults (``pgd`` at the medium visibility budget, 50 steps, the four
shipped FR models attacked), then the protected photo is encoded the way ``fluxguard protect`` writes it (Pillow,
4:4:4 chroma, optimised Huffman tables; one extra row with 4:2:0 chroma for comparison), decoded, and every judge
embeds the face at the landmarks found on the clean photo. Reported per encoding: the cosine similarity to the clean
face (lower = better protected; 1.0 = identical), the share of (face, judge) pairs below the judge's FAR 1e-2
threshold (no match), the file size and the PSNR to the clean photo. "White-box" judges are the attacked models;
"held-out" judges were not attacked (present when their weights are in the user cache).

The recommended quality (printed next to ``fluxguard.io.image.DEFAULT_JPEG_QUALITY``, which should not be lower): the
lowest quality from which every higher one has a mean white-box similarity within 0.02 of PNG's and a no-match share
not below PNG's minus 5 points.

    python benchmarks/jpeg_quality.py [--steps 50] [--data N] [--threads 1]

``--data N`` adds N photos of eval-split identities from the real face set (``$FLUXGUARD_DATA`` or
``../shared/faces``; read in place, never copied). Writes ``benchmarks/results/jpeg_quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxguard.api import Protector, recognizers, to_tensor  # noqa: E402
from fluxguard.data import package_faces  # noqa: E402
from fluxguard.io import encode_image, load_image  # noqa: E402
from fluxguard.io.image import DEFAULT_JPEG_QUALITY  # noqa: E402
from fluxguard.recognition import available_models, shipped_models  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
QUALITIES = (75, 85, 90, 95, 100)
SIM_TOLERANCE = 0.02
RATE_TOLERANCE = 0.05


def encodings() -> list[tuple[str, str, dict]]:
    rows = [("PNG", "PNG", {})]
    rows += [(f"JPEG q{q}", "JPEG", {"quality": q}) for q in QUALITIES]
    rows.append(("JPEG q95 4:2:0", "JPEG420", {"quality": 95}))
    return rows


def encode(rgb: np.ndarray, fmt: str, kw: dict) -> bytes:
    if fmt == "JPEG420":  # what most tools write by default: chroma at half resolution
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=kw["quality"], subsampling=2, optimize=True)
        return buf.getvalue()
    return encode_image(rgb, fmt, **kw)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def inputs(n_data: int) -> list[tuple[str, np.ndarray]]:
    photos = [(f.name, f.rgb) for f in package_faces(mirrored=True)]
    if n_data:
        from fluxguard.data import find_faces_dir, identity_groups, list_photos, photos_in_split

        root = find_faces_dir()
        if root is None:
            raise SystemExit("--data needs the real face photos ($FLUXGUARD_DATA or ../shared/faces)")
        groups = identity_groups(photos_in_split(list_photos(root), "eval"), min_photos=1)
        for name, group in list(groups.items())[:n_data]:  # one photo per identity, in name order
            photos.append((f"{name}/{group[0].path.name}", load_image(group[0].path).rgb))
    return photos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--data", type=int, default=0, help="add N eval-split photos of the real face set")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared machine more are slower)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    attacked = shipped_models()
    held_out = [m for m in available_models() if m not in attacked]
    judges = recognizers(attacked + held_out)
    thresholds = {r.name: r.calibrated_spec().thresholds["1e-2"] for r in judges}
    # its own report is not used: the judges below score every encoding (one cheap judge keeps it short)
    protector = Protector("pgd", fr_models=attacked, judges=attacked[-1:], steps=args.steps)

    rows = encodings()
    per_face = []
    t_start = time.perf_counter()
    for name, rgb in inputs(args.data):
        t0 = time.perf_counter()
        try:
            res = protector.protect(rgb, seed=0)
            protect_s = time.perf_counter() - t0
        except Exception as e:  # a photo without a detectable face is reported, not fatal
            print(f"{name}: skipped ({e})", flush=True)
            continue
        face = max(res.faces, key=lambda f: (f.face.box[2] - f.face.box[0]) * (f.face.box[3] - f.face.box[1]))
        lm = face.face.landmarks[None]
        with torch.no_grad():
            clean = {r.name: r(to_tensor(rgb)[None], lm)[0] for r in judges}
        entry = {"face": name, "size": [int(rgb.shape[1]), int(rgb.shape[0])], "protect_s": round(protect_s, 1),
                 "encodings": {}}
        for label, fmt, kw in rows:
            data = encode(res.image, fmt, kw)
            dec = load_image(data).rgb
            with torch.no_grad():
                x = to_tensor(dec)[None]
                sims = {r.name: round(float((r(x, lm)[0] * clean[r.name]).sum()), 4) for r in judges}
            entry["encodings"][label] = {"bytes": len(data), "psnr": round(psnr(dec, rgb), 2), "similarity": sims}
        per_face.append(entry)
        png = entry["encodings"]["PNG"]["similarity"]
        q75 = entry["encodings"]["JPEG q75"]["similarity"]
        print(f"{name}: {entry['protect_s']} s; PNG {png}; q75 {q75}", flush=True)

    def summarise(models: list[str]) -> dict[str, dict]:
        out = {}
        for label, _, _ in rows:
            vals = [(e["encodings"][label]["similarity"][m], thresholds[m]) for e in per_face for m in models]
            if not vals:
                continue
            out[label] = {
                "mean_similarity": round(float(np.mean([v for v, _ in vals])), 4),
                "no_match_rate": round(float(np.mean([v <= t for v, t in vals])), 4),
            }
        return out

    white, black = summarise(attacked), summarise(held_out)
    sizes = {label: round(float(np.mean([e["encodings"][label]["bytes"] for e in per_face])) / 1024, 1)
             for label, _, _ in rows}
    psnrs = {label: round(float(np.mean([e["encodings"][label]["psnr"] for e in per_face])), 2)
             for label, _, _ in rows}
    ref = white["PNG"]
    keeps = [q for q in QUALITIES
             if white[f"JPEG q{q}"]["mean_similarity"] <= ref["mean_similarity"] + SIM_TOLERANCE
             and white[f"JPEG q{q}"]["no_match_rate"] >= ref["no_match_rate"] - RATE_TOLERANCE]
    # the lowest quality from which every higher one keeps it too (one lucky low quality does not count)
    chosen = max(QUALITIES)
    for q in sorted(QUALITIES, reverse=True):
        if q not in keeps:
            break
        chosen = q
    result = {
        "benchmark": "jpeg_quality",
        "command": "python benchmarks/jpeg_quality.py " + " ".join(sys.argv[1:]),
        "method": "pgd",
        "params": protector.params(),
        "attacked": attacked,
        "held_out": held_out,
        "thresholds_far_1e-2": thresholds,
        "faces": len(per_face),
        "white_box": white,
        "held_out_summary": black,
        "mean_kib": sizes,
        "mean_psnr_db": psnrs,
        "rule": f"lowest q with mean white-box similarity <= PNG + {SIM_TOLERANCE} and no-match rate >= PNG - "
                f"{RATE_TOLERANCE}",
        "qualities_that_keep_protection": keeps,
        "recommended_default_quality": chosen,
        "code_default_quality": DEFAULT_JPEG_QUALITY,
        "per_face": per_face,
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "jpeg_quality.json").write_text(json.dumps(result, indent=2) + "\n")

    lines = [
        "# JPEG quality vs protection (PGD dodging)",
        "",
        f"{len(per_face)} faces ({', '.join(e['face'] for e in per_face)}); pgd, medium budget, {args.steps} steps, "
        f"attacking {', '.join(attacked)}. Similarity = cosine between the clean face and the saved protected face "
        "(same landmarks); no-match = share of (face, judge) pairs at or below the judge's FAR 1e-2 threshold. "
        "Unprotected, every similarity is 1.0 and the no-match share 0.",
        "",
        "| encoding | mean KiB | PSNR dB | white-box similarity | white-box no-match | held-out similarity | "
        "held-out no-match |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, _, _ in rows:
        w, b = white[label], black.get(label, {})
        lines.append(f"| {label} | {sizes[label]} | {psnrs[label]} | {w['mean_similarity']:.3f} | "
                     f"{w['no_match_rate']:.0%} | {b.get('mean_similarity', float('nan')):.3f} | "
                     f"{b.get('no_match_rate', float('nan')):.0%} |")
    lines += [
        "",
        f"Held-out judges (not attacked): {', '.join(held_out) or 'none available'}.",
        f"Rule: {result['rule']} (and every higher quality keeps it too). Qualities that keep it: {keeps}. "
        f"**Recommended: {chosen}**; the code's default is `fluxguard.io.image.DEFAULT_JPEG_QUALITY` = "
        f"{DEFAULT_JPEG_QUALITY}.",
        "",
        f"Command: `{result['command']}` ({result['seconds']} s, {result['machine']}).",
    ]
    (args.out / "jpeg_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
