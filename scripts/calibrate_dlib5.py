"""Calibrate where dlib's 5 landmarks sit in the ArcFace 112 frame, using MTCNN's landmarks as the reference.

dlib's shape_predictor_5 marks four eye corners and the base of the nose; ArcFace alignment wants eye centres, nose
tip and mouth corners. ``fluxguard.faces.dlib_hog`` bridges them with ``DLIB5_IN_ARCFACE``: the mean position of
each dlib part after aligning the face to the ArcFace template with MTCNN's five points. This script measures that
mean on the photos where both detectors find exactly one face (from the per-photo records of
``benchmarks/detectors.py --records``) and reports how well each calibration reproduces MTCNN's points (NME: mean
point distance / inter-ocular distance).

    PYTHONPATH=src python benchmarks/detectors.py --records /tmp/detectors_records.json
    PYTHONPATH=src python scripts/calibrate_dlib5.py /tmp/detectors_records.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", type=Path)
    ap.add_argument("--reference", default="mtcnn")
    ap.add_argument("--detector", default="dlib-hog")
    args = ap.parse_args()

    import dlib
    import face_recognition_models

    from fluxguard.data import find_faces_dir
    from fluxguard.faces.align import ARCFACE_112, estimate_similarity
    from fluxguard.faces.detect import load_rgb
    from fluxguard.faces.dlib_hog import DLIB5_IN_ARCFACE, dlib5_to_arcface

    root = find_faces_dir()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    records = json.loads(args.records.read_text())
    parts_all, ref_all = [], []
    for r in records:
        fr, fd = r[args.reference]["faces"], r[args.detector]["faces"]
        if len(fr) != 1 or len(fd) != 1:
            continue
        rb, db = np.asarray(fr[0]["box"]), np.asarray(fd[0]["box"])
        inter = np.prod(np.clip(np.minimum(rb[2:], db[2:]) - np.maximum(rb[:2], db[:2]), 0, None))
        if inter < 0.3 * np.prod(db[2:] - db[:2]):  # not the same face
            continue
        rgb = load_rgb(root / r["path"])
        shape = predictor(rgb, dlib.rectangle(*(int(round(v)) for v in db)))
        parts_all.append([[shape.part(i).x, shape.part(i).y] for i in range(5)])
        ref_all.append(fr[0]["landmarks"])
    parts, ref = np.asarray(parts_all, dtype=np.float64), np.asarray(ref_all, dtype=np.float64)
    m = estimate_similarity(ref, ARCFACE_112).numpy()  # photo -> ArcFace frame, per face
    in_frame = np.einsum("nij,nkj->nki", m[:, :, :2], parts) + m[:, None, :, 2]
    calib = in_frame.mean(0)

    def nme(c: np.ndarray) -> np.ndarray:
        est = np.stack([dlib5_to_arcface(p, c) for p in parts])
        iod = np.linalg.norm(ref[:, 1] - ref[:, 0], axis=1)
        return np.linalg.norm(est - ref, axis=2).mean(1) / iod

    half = in_frame[::2].mean(0)  # fit on even-numbered faces, judge on odd-numbered ones (held out)
    odd = np.arange(len(parts)) % 2 == 1
    for name, c in (("current DLIB5_IN_ARCFACE", DLIB5_IN_ARCFACE), ("calibrated here", calib),
                    ("fit on even faces", half)):
        e = nme(c)
        print(f"{name}: NME vs {args.reference} median {np.median(e):.4f}, mean {e.mean():.4f}, "
              f"90th pct {np.percentile(e, 90):.4f}; on the odd faces median {np.median(e[odd]):.4f}")
    print(f"faces used: {len(parts)}; per-part spread (std, px of the 112 frame): {in_frame.std(0).round(2).tolist()}")
    print("DLIB5_IN_ARCFACE = " + json.dumps(calib.round(2).tolist()))


if __name__ == "__main__":
    main()
