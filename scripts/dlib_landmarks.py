"""Temporary landmark source (dev only, until fluxguard.faces.detect lands): dlib HOG + 68 points -> ArcFace 5.

ArcFace order: eye centres (mean of 68-pt 36-41 and 42-47), nose tip (30), mouth corners (48, 54). Also returns
dlib's own 5-point shape, which ``dlib.get_face_chip`` needs. The 68-point predictor was trained on iBUG 300-W
(non-commercial terms), which is fine for calibrating offline but is why it never becomes a runtime dependency.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass
class DlibFace:
    box: np.ndarray  # x0, y0, x1, y1
    landmarks: np.ndarray  # (5, 2) ArcFace order
    shape5: object  # dlib.full_object_detection from the 5-point predictor
    score: float


@lru_cache(maxsize=1)
def _models():
    import dlib
    import face_recognition_models as frm

    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(frm.pose_predictor_model_location()),
            dlib.shape_predictor(frm.pose_predictor_five_point_model_location()))


def dlib_faces(rgb: np.ndarray, upsample: int = 1) -> list[DlibFace]:
    """Faces in an RGB uint8 image, largest first."""
    det, sp68, sp5 = _models()
    rects, scores, _ = det.run(rgb, upsample, 0.0)
    out = []
    for r, s in zip(rects, scores, strict=True):
        p = np.array([[pt.x, pt.y] for pt in sp68(rgb, r).parts()], dtype=np.float64)
        lm = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
        out.append(DlibFace(np.array([r.left(), r.top(), r.right(), r.bottom()], float), lm, sp5(rgb, r), float(s)))
    out.sort(key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    return out


def _detect_padded(rgb: np.ndarray) -> tuple[list[DlibFace], int]:
    """Detect; tight crops (aligned 112-256 px datasets) get a reflected border so HOG sees some context."""
    h, w = rgb.shape[:2]
    pad = int(0.5 * max(h, w)) if max(h, w) <= 400 else 0
    img = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="reflect") if pad else rgb
    faces = dlib_faces(img, upsample=1 if max(img.shape[:2]) <= 1200 else 0)
    for f in faces:
        f.box -= pad
        f.landmarks -= pad
    return faces, pad


def main() -> None:
    import argparse
    import json
    from pathlib import Path

    from PIL import Image, ImageOps

    from fluxguard.data import find_faces_dir, list_photos, split_of

    ap = argparse.ArgumentParser(description="cache dlib landmarks of labelled photos (calib + eval splits)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--splits", default="calib,eval")
    args = ap.parse_args()
    root = Path(args.data) if args.data else find_faces_dir()
    out = Path(args.out)
    cache = json.loads(out.read_text()) if out.is_file() else {}
    splits = set(args.splits.split(","))
    photos = [p for p in list_photos(root) if p.identity and split_of(p.identity) in splits]
    for i, ph in enumerate(photos):
        key = str(ph.path.relative_to(root))
        if key in cache:
            continue
        rgb = np.asarray(ImageOps.exif_transpose(Image.open(ph.path)).convert("RGB"))
        faces, pad = _detect_padded(rgb)
        cache[key] = [{"box": f.box.tolist(), "landmarks": f.landmarks.round(3).tolist(), "score": f.score,
                       "shape5": [[p.x - pad, p.y - pad] for p in f.shape5.parts()]} for f in faces]
        if i % 50 == 0:
            out.write_text(json.dumps(cache))
            print(i, len(photos), key, len(faces), flush=True)
    out.write_text(json.dumps(cache))


if __name__ == "__main__":
    main()
