"""Faces cut by the photo's border: how MTCNN's crop handling and padding change detection and landmarks.

For the astronaut and ``--photos`` random identity photos of ../shared/faces (shorter side >= 300 px) in which MTCNN
finds exactly one face, the photo is cut through the face box (10-40 % of the box removed from the left, top, right
or bottom), and MTCNN runs again under each crop-handling mode. The truth is the uncut photo's landmarks, shifted.
Reported per cut fraction: share of cuts where the face is still found, median NME (mean landmark distance /
inter-ocular distance) and share with NME < 0.1.

Modes: ``clip`` (facenet-pytorch: R-/O-Net crops clipped to the photo), ``noclip-rep`` / ``noclip-zero`` (crops
reach past the edge, filled by repeating the border / with black), ``pad25-*`` (the photo also sits on a canvas
padded by 25 % of its shorter side, so P-Net can propose windows past the edge).

    PYTHONPATH=src python benchmarks/detect_border.py [--photos 25]

Writes ``benchmarks/results/detect_border.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "clip": {"clip": True},
    "noclip-rep": {"clip": False, "fill": None},
    "noclip-zero": {"clip": False, "fill": 0},
    "pad25-clip-rep": {"pad": 0.25, "clip": True, "fill": None},
    "pad25-rep": {"pad": 0.25, "clip": False, "fill": None},
    "pad25-zero": {"pad": 0.25, "clip": False, "fill": 0},
}
FRACTIONS = (0.1, 0.2, 0.3, 0.4)


def cut(image: np.ndarray, box: np.ndarray, side: str, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """The photo cut ``frac`` of the way into the face box from ``side``, and the offset of the kept part."""
    w, h = box[2] - box[0], box[3] - box[1]
    if side == "left":
        c = max(int(box[0] + frac * w), 0)
        return image[:, c:], np.array([c, 0])
    if side == "top":
        c = max(int(box[1] + frac * h), 0)
        return image[c:], np.array([0, c])
    if side == "right":
        return image[:, : int(box[2] - frac * w)], np.zeros(2)
    return image[: int(box[3] - frac * h)], np.zeros(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import skimage.data
    import torch

    from fluxguard.data import find_faces_dir, list_photos
    from fluxguard.faces.detect import load_rgb
    from fluxguard.faces.mtcnn import MTCNN

    torch.set_num_threads(args.threads)
    net = MTCNN()
    thresholds = (0.6, 0.7, 0.9)
    images = [skimage.data.astronaut()]
    root = find_faces_dir()
    if root is not None and args.photos:
        pool = [p for p in list_photos(root) if p.identity is not None]
        random.Random(args.seed).shuffle(pool)
        for p in pool:
            if len(images) > args.photos:
                break
            rgb = load_rgb(p.path)
            if min(rgb.shape[:2]) >= 300:
                images.append(rgb)

    errors: dict[str, dict[float, list[float]]] = {m: {f: [] for f in FRACTIONS} for m in MODES}
    used = 0
    for image in images:
        ref = net.detect(image, thresholds=thresholds, max_side=1024)
        if len(ref) != 1:
            continue
        used += 1
        box, lm = ref.boxes[0], ref.landmarks[0]
        iod = float(np.linalg.norm(lm[1] - lm[0]))
        for side in ("left", "top", "right", "bottom"):
            for frac in FRACTIONS:
                part, offset = cut(image, box, side, frac)
                part = np.ascontiguousarray(part)
                truth = lm - offset
                for mode, kw in MODES.items():
                    d = net.detect(part, thresholds=thresholds, max_side=1024, **kw)
                    if len(d):
                        j = int(np.argmin(np.linalg.norm(d.landmarks.mean(1) - truth.mean(0), axis=1)))
                        errors[mode][frac].append(float(np.linalg.norm(d.landmarks[j] - truth, axis=1).mean() / iod))
                    else:
                        errors[mode][frac].append(float("nan"))
        print(f"{used} faces done", file=sys.stderr, flush=True)

    table = {}
    for mode, per in errors.items():
        table[mode] = {}
        for frac, v in per.items():
            e = np.asarray(v)
            table[mode][str(frac)] = {
                "found": round(float(np.mean(~np.isnan(e))), 3),
                "nme_median": round(float(np.nanmedian(e)), 3) if np.any(~np.isnan(e)) else None,
                "nme_below_0.1": round(float(np.mean(np.nan_to_num(e, nan=np.inf) < 0.1)), 3),
            }
    out = {
        "command": "PYTHONPATH=src python benchmarks/detect_border.py " + " ".join(sys.argv[1:]),
        "faces": used,
        "cuts_per_fraction": used * 4,
        "results": table,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detect_border.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        "# MTCNN on faces cut by the border",
        "",
        f"`{out['command']}`: {used} faces x 4 sides per cut fraction. Cell: found / median NME / share NME < 0.1.",
        "",
        "| mode | " + " | ".join(f"{int(f * 100)} % cut" for f in FRACTIONS) + " |",
        "|---|" + "---|" * len(FRACTIONS),
    ]
    for mode, per in table.items():
        cells = [f"{c['found']:.0%} / {c['nme_median']} / {c['nme_below_0.1']:.0%}" for c in per.values()]
        md.append(f"| {mode} | " + " | ".join(cells) + " |")
    (args.out / "detect_border.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
