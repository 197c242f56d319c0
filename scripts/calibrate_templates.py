#!/usr/bin/env python
"""Fit the crop templates of dlib-resnet (150 chip) and FaceRes (loose 224 crop) to ArcFace landmarks.

A template is the five ArcFace points in a model's input frame. For each real face we know the reference crop
transform M (photo -> model input) and the ArcFace landmarks L from the landmark source; the template is the mean
of M(L) over faces. The fit error is how far the similarity S fitted from L to the template lands from M, averaged
over a 16x16 grid of the crop, in crop pixels.

* dlib: M is ``dlib.get_face_chip_details(shape5, 150, padding=0.25)`` mapped like dlib's ``get_mapping_to_chip``
  (dlib's own HOG box + 5-point shape, as the face_recognition library runs it); checked against the pixels of
  ``dlib.get_face_chip``.
* FaceRes: M is a square crop centred on the detector box, side 1.4x the box's longer side, resized to 224.

usage: python scripts/calibrate_templates.py --dlib-json DLIB.json [--landmarks LM.json] [--data DIR] [--split calib]
                                           [--write]
  DLIB.json: scripts/dlib_landmarks.py output (box, ArcFace landmarks from 68 points, dlib shape5 per face).
  LM.json: {key: [{"box", "landmarks"}, ...]} from the project detector (default: the ArcFace points of DLIB.json);
  its faces are matched to dlib's by eye position.
  --write puts the fitted templates into src/fluxguard/recognition/{dlib_resnet,faceres}.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fluxguard.data import find_faces_dir, list_photos, split_of  # noqa: E402
from fluxguard.faces.align import estimate_similarity  # noqa: E402
from fluxguard.recognition.calibration import main_face, read_rgb  # noqa: E402

LOOSE_FACTOR = 1.4


def dlib_chip_matrix(shape5: list[list[float]], box: list[float], size: int = 150,
                     padding: float = 0.25) -> np.ndarray:
    """(2, 3) photo -> chip map of ``dlib.get_face_chip(img, shape5, size, padding)``."""
    import dlib

    rect = dlib.rectangle(*[int(round(v)) for v in box])
    det = dlib.full_object_detection(rect, [dlib.point(int(x), int(y)) for x, y in shape5])
    d = dlib.get_face_chip_details(det, size, padding)
    r = d.rect
    c = np.array([(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2])
    rot = np.array([[np.cos(d.angle), -np.sin(d.angle)], [np.sin(d.angle), np.cos(d.angle)]])
    corners = np.array([[r.left(), r.top()], [r.right(), r.top()], [r.right(), r.bottom()]])
    src = (corners - c) @ rot.T + c
    dst = np.array([[0, 0], [d.cols - 1, 0], [d.cols - 1, d.rows - 1]], dtype=np.float64)
    return estimate_similarity(src, dst).numpy()


def loose_matrix(box: list[float], size: int = 224, factor: float = LOOSE_FACTOR) -> np.ndarray:
    x0, y0, x1, y1 = box
    side = factor * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    s = size / side
    # pixel centres on integers: crop pixel u covers photo x with u = s * (x - cx) + size / 2 - 0.5
    return np.array([[s, 0, size / 2 - 0.5 - s * cx], [0, s, size / 2 - 0.5 - s * cy]])


def apply(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ m[:, :2].T + m[:, 2]


def fit(pairs: list[tuple[np.ndarray, np.ndarray]], size: int) -> tuple[np.ndarray, dict]:
    """Template = mean of M(L); error of the similarity fit over a 16x16 grid of the crop, in crop pixels."""
    tpl = np.mean([apply(m, lm) for m, lm in pairs], axis=0)
    g = np.linspace(0, size - 1, 16)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    errs = []
    for m, lm in pairs:
        s = estimate_similarity(lm, tpl).numpy()
        a = np.vstack([m, [0, 0, 1]])
        photo = apply(np.linalg.inv(a)[:2], grid)
        errs.append(np.linalg.norm(apply(s, photo) - grid, axis=1).mean())
    e = np.array(errs)
    return tpl, {"faces": len(e), "mean_px": round(float(e.mean()), 3), "median_px": round(float(np.median(e)), 3),
                 "p90_px": round(float(np.quantile(e, 0.9)), 3), "crop_px": size}


def check_dlib_pixels(root: Path, key: str, face: dict) -> float:
    """Mean |cv2 warp with our chip matrix - dlib.get_face_chip| (0-255 scale) on one photo."""
    import cv2
    import dlib

    rgb = read_rgb(root / key)
    rect = dlib.rectangle(*[int(round(v)) for v in face["box"]])
    det = dlib.full_object_detection(rect, [dlib.point(int(x), int(y)) for x, y in face["shape5"]])
    chip = dlib.get_face_chip(rgb, det, 150, 0.25).astype(np.float64)
    ours = cv2.warpAffine(rgb, dlib_chip_matrix(face["shape5"], face["box"]), (150, 150),
                          flags=cv2.INTER_LINEAR).astype(np.float64)
    return float(np.abs(chip - ours).mean())


SRC = Path(__file__).resolve().parents[1] / "src" / "fluxguard" / "recognition"


def write_template(path: Path, var: str, tpl: np.ndarray, faces: int) -> None:
    """Replace the ``var = (...)`` tuple (and the face count in its comment) in a model file."""
    s = path.read_text()
    a = s.index(f"{var} = (")
    b = s.index("\n)\n", a) + 2
    body = "".join(f"    ({x}, {y}),\n" for x, y in np.round(tpl, 2).tolist())
    s = s[:a] + f"{var} = (\n{body})" + s[b:]
    path.write_text(re.sub(r"on \d+ calib-split faces", f"on {faces} calib-split faces", s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dlib-json", required=True)
    ap.add_argument("--landmarks", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--split", default="calib")
    ap.add_argument("--write", action="store_true", help="update the templates in the model files")
    args = ap.parse_args()
    root = Path(args.data) if args.data else find_faces_dir()
    dl = json.loads(Path(args.dlib_json).read_text())
    lmk = json.loads(Path(args.landmarks).read_text()) if args.landmarks else None
    keys = {ph.path.relative_to(root).as_posix() for ph in list_photos(root)
            if ph.identity and split_of(ph.identity) == args.split}
    dlib_pairs, loose_pairs, pix = [], [], []
    for key in sorted(keys & set(dl)):
        if not dl[key]:
            continue
        main = main_face(dl[key], read_rgb(root / key).shape)  # one face per photo: the labelled person
        if main is None:
            continue
        for face in [f for f in dl[key] if np.allclose(f["landmarks"], main)]:
            lm = np.asarray(face["landmarks"], dtype=np.float64)
            box = face["box"]
            if lmk is not None:
                # the project detector's face nearest to this dlib face (eye midpoint within 1/3 eye distance)
                cands = [f for f in (lmk.get(key) or []) if f]
                if not cands:
                    continue
                eye = lm[:2].mean(0)
                d = [np.linalg.norm(np.asarray(f["landmarks"])[:2].mean(0) - eye) for f in cands]
                j = int(np.argmin(d))
                if d[j] > np.linalg.norm(lm[1] - lm[0]) / 3:
                    continue
                lm, box = np.asarray(cands[j]["landmarks"], dtype=np.float64), cands[j]["box"]
            dlib_pairs.append((dlib_chip_matrix(face["shape5"], face["box"]), lm))
            loose_pairs.append((loose_matrix(box), lm))
            if len(pix) < 20:
                pix.append(check_dlib_pixels(root, key, face))
    dlib_tpl, dlib_err = fit(dlib_pairs, 150)
    loose_tpl, loose_err = fit(loose_pairs, 224)
    if args.write:
        write_template(SRC / "dlib_resnet.py", "DLIB_CHIP_150", dlib_tpl, dlib_err["faces"])
        write_template(SRC / "faceres.py", "LOOSE_224", loose_tpl, loose_err["faces"])
    print(json.dumps({
        "landmarks": args.landmarks or f"{args.dlib_json} (dlib 68-point ArcFace points)",
        "dlib_chip_150": {"template": np.round(dlib_tpl, 2).tolist(), "fit": dlib_err,
                          "pixel_check_mean_abs_0_255": round(float(np.mean(pix)), 3)},
        "faceres_loose_224": {"template": np.round(loose_tpl, 2).tolist(), "fit": loose_err,
                              "factor": LOOSE_FACTOR},
    }, indent=1))


if __name__ == "__main__":
    main()
