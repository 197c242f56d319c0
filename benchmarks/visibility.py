"""How visible each method is at each visibility budget: contact sheets and the quality table behind the presets.

Faces: skimage's astronaut, a multi-face photo (``portraits/vladmandic_human/group-4.jpg``, 5 faces, 1024 px) and
the first photo of the first ``--limit`` eval-split identities (protocol order, as the evaluation). Each is
protected (dodging, every shipped FR model attacked) by each method at each budget; per face the quality
instrument of :func:`fluxguard.eval.quality.face_quality` is measured on the saved 8-bit photo, and each (method,
budget) gets a contact sheet (original | protected | difference x10, at 100 %) in ``benchmarks/results/``.

    python benchmarks/visibility.py --methods pgd,fluxguard --budgets low,medium,high --limit 6
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GROUP_PHOTO = "portraits/vladmandic_human/group-4.jpg"
KEYS = ("delta_e_mean", "delta_e_p95", "visible", "dL", "da", "db", "psnr_mask", "ssim_mask", "psnr_outside",
        "changed_outside")


def photos(data: Path | None, limit: int) -> list[tuple[str, np.ndarray]]:
    from skimage import data as skdata

    out = [("astronaut", skdata.astronaut())]
    if data is None:
        return out
    from fluxguard.data import identity_groups, list_photos, photos_in_split
    from fluxguard.io import load_image

    out.append((Path(GROUP_PHOTO).stem, load_image(data / GROUP_PHOTO).rgb))
    groups = identity_groups(photos_in_split(list_photos(data), "eval"), min_photos=2)
    for name in sorted(groups, key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:limit]:
        out.append((name, load_image(groups[name][0].path).rgb))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="pgd,fluxguard")
    ap.add_argument("--budgets", default="low,medium,high")
    ap.add_argument("--limit", type=int, default=6, help="eval-split identities (besides astronaut and group)")
    ap.add_argument("--data", type=Path, default=None, help="face folder (default: $FLUXGUARD_DATA or ../shared)")
    ap.add_argument("--param", action="append", default=[], help="METHOD.key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="visibility", help="results file stem")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--append", action="store_true", help="keep the other (method, budget) entries of the results")
    args = ap.parse_args()

    import torch

    from fluxguard.api import Protector
    from fluxguard.data import find_faces_dir
    from fluxguard.eval.contact_sheet import SheetRow, caption, contact_sheet

    torch.set_num_threads(args.threads)
    data = args.data or find_faces_dir()
    todo = photos(data, args.limit)
    extra: dict[str, dict] = {}
    for p in args.param:
        key, _, val = p.partition("=")
        method, _, name = key.partition(".")
        try:
            extra.setdefault(method, {})[name] = json.loads(val)
        except json.JSONDecodeError:
            extra.setdefault(method, {})[name] = val
    rows, results = [], []
    for method in args.methods.split(","):
        for budget in args.budgets.split(","):
            prot = Protector(method, strength=budget, **extra.get(method, {}))
            sheet: list[SheetRow] = []
            per_face = []
            t0 = time.perf_counter()
            n_faces = 0
            for name, rgb in todo:
                res = prot.protect(rgb, seed=0)
                for i, f in enumerate(res.faces):
                    n_faces += 1
                    sims = {m: s["after"] for m, s in f.similarity.items()}
                    per_face.append({"photo": name, "face": i, **{k: f.quality.get(k) for k in KEYS},
                                     "similarity_after": sims})
                    if len(sheet) < 10 and (name != Path(GROUP_PHOTO).stem or i < 3):
                        sheet.append(SheetRow(rgb, res.image, f.face.box, caption(f.quality, f"{name}#{i + 1}")))
            secs = time.perf_counter() - t0
            fname = f"{args.name}_{method}_{budget}.jpg"
            img = contact_sheet(sheet, None, title=f"{method}, budget {budget}")
            from PIL import Image

            args.out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(args.out / fname, quality=90, subsampling=0, optimize=True)
            summ = {"method": method, "budget": budget, "faces": n_faces, "seconds_per_face": secs / max(n_faces, 1),
                    "sheet": fname, "params": {k: v for k, v in prot.params().items() if k != "fr_models"}}
            for k in ("delta_e_mean", "delta_e_p95", "visible", "psnr_mask", "ssim_mask"):
                summ[k] = float(np.mean([r[k] for r in per_face if r[k] is not None]))
            for k in ("dL", "da", "db"):
                summ[f"max_abs_{k}"] = float(np.max([abs(r[k]) for r in per_face]))
            summ["changed_outside"] = int(np.sum([r["changed_outside"] for r in per_face]))
            summ["mean_similarity_after"] = {m: float(np.mean([r["similarity_after"][m] for r in per_face]))
                                             for m in per_face[0]["similarity_after"]}
            results.append({**summ, "per_face": per_face})
            rows.append(summ)
            print(json.dumps({k: v for k, v in summ.items() if k != "params"}), flush=True)
    command = "python benchmarks/visibility.py " + " ".join(sys.argv[1:])
    for r in results:
        r["command"], r["photos"] = command, [n for n, _ in todo]
    path = args.out / f"{args.name}.json"
    if args.append and path.is_file():
        done = {(r["method"], r["budget"]) for r in results}
        old = [r for r in json.loads(path.read_text())["results"] if (r["method"], r["budget"]) not in done]
        results = old + results
        rows = [{k: v for k, v in r.items() if k != "per_face"} for r in results]
    report = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "threads": args.threads,
              "results": results}
    path.write_text(json.dumps(report, indent=1))
    commands = list(dict.fromkeys(r["command"] for r in results))
    all_photos = list(dict.fromkeys(p for r in results for p in r["photos"]))
    md = ["# Visibility of each method at each budget\n", *[f"`{c}`" for c in commands],
          f"\n({report['created']}, {args.threads} thread). Faces: {', '.join(all_photos)} (every face of each photo; "
          "each row's photos are in the JSON). Measured on the "
          "saved 8-bit photos over each face's mask (`fluxguard.eval.quality.face_quality`); white-box similarity "
          "= cosine of the protected face to the original, all shipped models attacked.\n",
          "| method | budget | faces | dE2000 mean | dE2000 p95 | visible | max abs dL*/da*/db* | changed outside | "
          "mean similarity after | s/face | sheet |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sims = ", ".join(f"{m} {v:.2f}" for m, v in r["mean_similarity_after"].items())
        shift = f"{r['max_abs_dL']:.2f} / {r['max_abs_da']:.2f} / {r['max_abs_db']:.2f}"
        md.append(f"| {r['method']} | {r['budget']} | {r['faces']} | {r['delta_e_mean']:.2f} | "
                  f"{r['delta_e_p95']:.2f} | {100 * r['visible']:.1f} % | {shift} | "
                  f"{r['changed_outside']} | {sims} | {r['seconds_per_face']:.1f} | [{r['sheet']}]({r['sheet']}) |")
    (args.out / f"{args.name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
