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
