"""Time the face pipeline around an edit: detect -> align to 256 px -> paste back, at 512, 1024 and 4000 px.

The photo is ``skimage.data.astronaut()`` (one real face) resized to each size, so the run needs no data files.
Every step is timed separately (median of ``--repeat`` runs after one warm-up); "paste-back" pastes a crop that
differs from the aligned one, so the whole inverse warp and blend is exercised.

    PYTHONPATH=src python benchmarks/faces.py [--sizes 512,1024,4000] [--repeat 5] [--detector mtcnn]

Writes ``benchmarks/results/faces.json`` and ``faces.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024,4000")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import cv2
    import skimage.data
    import torch

    from fluxguard.faces.align import align_faces, paste_back
    from fluxguard.faces.detect import detect_faces

    torch.set_num_threads(args.threads)
    base = skimage.data.astronaut()
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        photo = cv2.resize(base, (size, size), interpolation=cv2.INTER_AREA if size < 512 else cv2.INTER_CUBIC)
        times: dict[str, list[float]] = {"detect": [], "to_tensor": [], "align": [], "paste_back": [], "total": []}
        n_faces = 0
        for rep in range(args.repeat + 1):
            t0 = time.perf_counter()
            faces = detect_faces(photo, detector=args.detector)
            t1 = time.perf_counter()
            tensor = torch.from_numpy(photo).permute(2, 0, 1).float().div_(255)
            t2 = time.perf_counter()
            aligned = align_faces(tensor, [f.landmarks for f in faces], args.crop)
            t3 = time.perf_counter()
            edited = [(a.crop + 0.02).clamp(0, 1) for a in aligned]
            t4 = time.perf_counter()
            out = paste_back(tensor, aligned, edited)
            t5 = time.perf_counter()
            if rep == 0:  # warm-up (weights, kernels)
                n_faces = len(faces)
                assert out.shape == tensor.shape
                continue
            times["detect"].append(t1 - t0)
            times["to_tensor"].append(t2 - t1)
            times["align"].append(t3 - t2)
            times["paste_back"].append(t5 - t4)
            times["total"].append((t1 - t0) + (t3 - t1) + (t5 - t4))
        row = {"size": size, "faces": n_faces, **{k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)

    out = {
        "command": "PYTHONPATH=src python benchmarks/faces.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {args.threads}",
        "torch": torch.__version__,
        "detector": args.detector,
        "crop": args.crop,
        "repeat": args.repeat,
        "ms": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faces.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        "# Face pipeline: detect + align + paste-back (ms, median)",
        "",
        f"`{out['command']}` ({out['machine']}; torch {out['torch']}; detector {args.detector}; "
        f"crop {args.crop} px; astronaut resized; median of {args.repeat}).",
        "",
        "| photo px | faces | detect | to tensor | align | paste-back | total |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [f"| {r['size']} | {r['faces']} | {r['detect']} | {r['to_tensor']} | {r['align']} | {r['paste_back']} | "
           f"{r['total']} |" for r in rows]
    (args.out / "faces.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
