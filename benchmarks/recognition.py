"""FR model zoo: verification quality on the eval split, and CPU cost per face.

Verification: every model embeds the main face of each labelled photo of the *eval* identities (disjoint from the
calib identities the thresholds came from, see ``fluxguard.data.split_of``). Genuine pairs are photos of one identity;
impostor pairs are different identities within one source repository. Reported per model: TAR at the shipped
thresholds for FAR 1e-1 / 1e-2 / 1e-3 (with the FAR they really give on eval), ROC AUC and d'.

Timing: one face as the attacks use it, a 256 px portrait crop with its landmarks; ``model(crop, landmarks)``
(forward) and forward + backward to the pixels, torch CPU, median over repeats, batch 1.

    python benchmarks/recognition.py [--data DIR] [--landmarks FILE] [--models a,b] [--threads 2] [--skip-eval]
                                     [--dlib-json FILE]

Landmarks come from the project detector (cached) or a JSON file (--landmarks, as for ``fluxguard calibrate``).
Writes ``benchmarks/results/recognition.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxguard.data import find_faces_dir, package_faces  # noqa: E402
from fluxguard.faces.align import align_faces, portrait_template  # noqa: E402
from fluxguard.recognition import available_models, load_recognizer  # noqa: E402
from fluxguard.recognition.base import FARS, load_thresholds  # noqa: E402
from fluxguard.recognition.calibration import detection_cache_path, evaluate, gather_faces  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def time_model(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    face = package_faces()[1]
    crop = align_faces(face.image[0], [face.landmarks], 256)[0].crop[None]
    lm = torch.as_tensor(portrait_template(256))

    def fwd() -> None:
        with torch.no_grad():
            model(crop, lm)

    def fwd_bwd() -> None:
        x = crop.clone().requires_grad_(True)
        model(x, lm).sum().backward()

    out = {}
    for key, fn in (("forward_ms", fwd), ("forward_backward_ms", fwd_bwd)):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1000)
        out[key] = round(statistics.median(ts), 1)
    return out


def native_dlib(root: Path, dlib_json: Path) -> dict:
    """Reference row: dlib-bin on its own pipeline (HOG box + 5-point shape -> get_face_chip), not our crops.

    Uses the faces of ``scripts/dlib_landmarks.py`` (they carry dlib's 5-point shape); thresholds from the calib
    split of the same pipeline, metrics on the eval split.
    """
    import dlib
    import face_recognition_models as frm
    import numpy as np

    from fluxguard.data import list_photos, split_of
    from fluxguard.recognition.calibration import (
        FaceRecord,
        main_face,
        pair_indices,
        read_rgb,
        scores,
        thresholds_at,
        verification,
    )

    fr = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    table = json.loads(dlib_json.read_text())
    out = {}
    for split in ("calib", "eval"):
        recs, embs = [], []
        for ph in list_photos(root):
            key = ph.path.relative_to(root).as_posix()
            if not ph.identity or split_of(ph.identity) != split or not table.get(key):
                continue
            rgb = read_rgb(ph.path)
            lm = main_face(table[key], rgb.shape)
            if lm is None:
                continue
            face = next(f for f in table[key] if np.allclose(f["landmarks"], lm))
            rect = dlib.rectangle(*[int(round(v)) for v in face["box"]])
            det = dlib.full_object_detection(rect, [dlib.point(int(x), int(y)) for x, y in face["shape5"]])
            e = np.array(fr.compute_face_descriptor(dlib.get_face_chip(rgb, det, 150, 0.25)))
            recs.append(FaceRecord(key, ph.path, ph.identity, ph.source, lm))
            embs.append(e / np.linalg.norm(e))
        gen, imp = pair_indices(recs)
        g, i = scores(np.stack(embs), gen), scores(np.stack(embs), imp)
        if split == "calib":
            th = thresholds_at(i)
        else:
            out = verification(g, i, th)
    return out


def markdown(res: dict) -> str:
    lines = ["# FR model zoo", ""]
    if "eval" in res:
        d = res["eval"]["data"]
        lines += [f"Verification on the eval split: {d['photos']} photos of {d['identities']} identities, "
                  f"{d['genuine_pairs']} genuine / {d['impostor_pairs']} impostor pairs (impostors: different "
                  f"identities within one source). Thresholds: shipped `thresholds.json` (calib split). "
                  f"Landmarks: {res['landmarks']}.", "",
                  "| model | TAR @ FAR 1e-1 | TAR @ FAR 1e-2 | TAR @ FAR 1e-3 | eval FAR at the 1e-2 threshold "
                  "| AUC | d' |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in res["eval"]["models"].items():
            lines.append(f"| {name} | " + " | ".join(f"{m['tar'][f]:.3f}" for f in FARS)
                         + f" | {m['far']['1e-2']:.4f} | {m['auc']:.4f} | {m['dprime']:.2f} |")
        lines.append("")
    t = res["timing"]
    lines += [f"CPU time per face (256 px portrait crop, batch 1, {t['threads']} threads, median of {t['repeats']}; "
              f"{t['cpu']}):", "", "| model | forward ms | forward+backward ms |", "|---|---|---|"]
    for name, m in t["models"].items():
        lines.append(f"| {name} | {m['forward_ms']} | {m['forward_backward_ms']} |")
    lines += ["", f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--landmarks", default=None)
    ap.add_argument("--models", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--dlib-json", default=None, help="scripts/dlib_landmarks.py output: adds a dlib-bin row run on "
                    "dlib's own pipeline (reference for the dlib-resnet crop template)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else available_models()
    models = {n: load_recognizer(n) for n in names}  # an unknown name fails here, listing the valid ones
    res: dict = {"command": "python " + " ".join(sys.argv), "landmarks": args.landmarks or "fluxguard.faces.detect"}
    if not args.skip_eval:
        root = Path(args.data) if args.data else find_faces_dir()
        if root is None:
            raise SystemExit("no face data: pass --data or set FLUXGUARD_DATA")
        cache = None if args.landmarks else detection_cache_path(root, "detector")
        records = gather_faces(root, "eval", landmark_file=args.landmarks, cache=cache)
        thresholds = {n: load_thresholds(n) for n in names}
        missing = [n for n, t in thresholds.items() if not t]
        if missing:
            raise SystemExit(f"not calibrated: {missing}; run `fluxguard calibrate` first")
        res["eval"] = evaluate(models, records, thresholds)
        if args.dlib_json:
            res["eval"]["models"]["dlib-bin (own chip)"] = native_dlib(root, Path(args.dlib_json))
    res["timing"] = {"threads": args.threads, "repeats": args.repeats,
                     "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                     "models": {n: time_model(m, args.repeats) for n, m in models.items()}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "recognition.json").write_text(json.dumps(res, indent=1) + "\n")
    (OUT / "recognition.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
