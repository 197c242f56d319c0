"""Face detectors on the real photos of ../shared/faces: how often exactly the expected face is found, and speed.

Every identity photo shows one labelled person, so the expected result is exactly one face. For each detector we
report the share of photos with exactly one face, with at least one, with none and with more than one, the
milliseconds per photo (decoding excluded; detectors interleaved photo by photo so machine load hits both alike),
and, where both detectors find exactly one face, how far apart their five landmarks are (mean distance over the 5
points / inter-ocular distance of the first detector).

    PYTHONPATH=src python benchmarks/detectors.py                      # all identity photos, mtcnn vs dlib-hog
    PYTHONPATH=src python benchmarks/detectors.py --limit 200 --records /tmp/det.json

Writes ``benchmarks/results/detectors.json`` and ``detectors.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def size_class(shape: tuple[int, int]) -> str:
    h, w = shape
    if max(h, w) <= 160:
        return "aligned chips <=160 px"
    if (h, w) == (250, 250):
        return "LFW 250 px"
    if (h, w) == (256, 256):
        return "CelebA-HQ aligned 256 px"
    return "other (in the wild, portraits)"


def summarise(counts: list[int], ms: list[float]) -> dict:
    n = len(counts)
    c = np.asarray(counts)
    t = np.asarray(ms)
    return {
        "photos": n,
        "exactly_one": round(float((c == 1).mean()), 4) if n else None,
        "at_least_one": round(float((c >= 1).mean()), 4) if n else None,
        "none": int((c == 0).sum()),
        "more_than_one": int((c > 1).sum()),
        "ms_median": round(float(np.median(t)), 1) if n else None,
        "ms_mean": round(float(t.mean()), 1) if n else None,
        "ms_p90": round(float(np.percentile(t, 90)), 1) if n else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detectors", default="mtcnn,dlib-hog")
    ap.add_argument("--limit", type=int, default=0, help="only the first N identity photos (0: all)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--records", type=Path, help="also write every photo's detections to this JSON file")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import torch

    from fluxguard.data import find_faces_dir, list_photos
    from fluxguard.faces.detect import detect_faces, get_detector, load_rgb

    torch.set_num_threads(args.threads)
    root = find_faces_dir()
    if root is None:
        sys.exit("face photos not found: set FLUXGUARD_DATA or put them in ../shared/faces")
    photos = [p for p in list_photos(root) if p.identity is not None]
    if args.limit:
        photos = photos[: args.limit]
    names = args.detectors.split(",")
    warm = np.zeros((64, 64, 3), np.uint8)
    for name in names:
        get_detector(name)
        detect_faces(warm, detector=name)

    records = []
    for i, ph in enumerate(photos):
        rgb = load_rgb(ph.path)
        rec: dict = {"path": str(ph.path.relative_to(root)), "source": ph.source, "shape": list(rgb.shape[:2])}
        for name in names:
            t0 = time.perf_counter()
            faces = detect_faces(rgb, detector=name)
            rec[name] = {"ms": (time.perf_counter() - t0) * 1000, "faces": [f.to_dict() for f in faces]}
        records.append(rec)
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{len(photos)}", file=sys.stderr, flush=True)

    summary: dict = {"overall": {}, "by_size": defaultdict(dict), "by_source": defaultdict(dict)}
    for name in names:
        counts = [len(r[name]["faces"]) for r in records]
        ms = [r[name]["ms"] for r in records]
        summary["overall"][name] = summarise(counts, ms)
        groups: dict[str, list[int]] = defaultdict(list)
        sources: dict[str, list[int]] = defaultdict(list)
        for k, r in enumerate(records):
            groups[size_class(tuple(r["shape"]))].append(k)
            sources[r["source"]].append(k)
        for g, idx in sorted(groups.items()):
            summary["by_size"][g][name] = summarise([counts[k] for k in idx], [ms[k] for k in idx])
        for g, idx in sorted(sources.items()):
            summary["by_source"][g][name] = summarise([counts[k] for k in idx], [ms[k] for k in idx])

    agreement = {}
    if len(names) >= 2:
        a, b = names[0], names[1]
        nme = []
        for r in records:
            fa, fb = r[a]["faces"], r[b]["faces"]
            if len(fa) == 1 and len(fb) == 1:
                la, lb = np.asarray(fa[0]["landmarks"]), np.asarray(fb[0]["landmarks"])
                iod = np.linalg.norm(la[1] - la[0])
                nme.append(float(np.linalg.norm(la - lb, axis=1).mean() / max(iod, 1e-6)))
        if nme:
            agreement = {
                "pair": f"{b} vs {a}",
                "photos": len(nme),
                "nme_median": round(float(np.median(nme)), 4),
                "nme_p90": round(float(np.percentile(nme, 90)), 4),
                "share_nme_below_0.1": round(float((np.asarray(nme) < 0.1).mean()), 4),
            }
    out = {
        "command": "PYTHONPATH=src python benchmarks/detectors.py " + " ".join(sys.argv[1:]),
        "data": str(root),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch threads {args.threads}",
        "torch": torch.__version__,
        "detectors": {n: {"version": get_detector(n).version, "default_threshold": get_detector(n).default_threshold}
                      for n in names},
        "summary": summary,
        "landmark_agreement": agreement,
        "face_count_histogram": {n: dict(sorted(Counter(len(r[n]["faces"]) for r in records).items()))
                                 for n in names},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detectors.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "detectors.md").write_text(markdown(out, names))
    if args.records:
        args.records.write_text(json.dumps(records))
    print(markdown(out, names))


def markdown(out: dict, names: list[str]) -> str:
    lines = [
        "# Face detectors on ../shared/faces identity photos",
        "",
        f"`{out['command']}` ({out['machine']}; torch {out['torch']}). Expected: exactly one face per photo.",
        "",
        "| subset | detector | photos | exactly one | at least one | none | >1 | ms median | ms mean | ms p90 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("all", out["summary"]["overall"])] + sorted(out["summary"]["by_size"].items())
    for subset, per in rows:
        for n in names:
            s = per.get(n)
            if s:
                lines.append(
                    f"| {subset} | {n} | {s['photos']} | {s['exactly_one']:.1%} | {s['at_least_one']:.1%} | "
                    f"{s['none']} | {s['more_than_one']} | {s['ms_median']} | {s['ms_mean']} | {s['ms_p90']} |"
                )
    ag = out.get("landmark_agreement")
    if ag:
        lines += ["", f"Landmarks, {ag['pair']} on {ag['photos']} photos where both find exactly one face: "
                  f"NME (mean point distance / inter-ocular distance) median {ag['nme_median']}, "
                  f"90th percentile {ag['nme_p90']}, below 0.1 for {ag['share_nme_below_0.1']:.1%}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
