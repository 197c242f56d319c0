"""Face masks: the part of an aligned crop a protection may change (skin, brows, eyes, nose, mouth).

The mask is the FaceMesh silhouette (MediaPipe ``FACE_OVAL``, chin to the upper forehead) of the face in the crop,
filled, and feathered *inside* the outline: 1 in the face, a smooth ramp to 0 over ``feather`` inter-ocular
distances before the outline, exactly 0 on and outside it. Hair, ears, neck, background and clothes are never in
it, so a protected photo equals its original there, bit for bit.

When the mesh finds no face in the crop (a strong profile, a mask, a tiny face), an ellipse placed by the five
alignment landmarks stands in for the silhouette.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import cv2
import numpy as np
import torch

from fluxguard.errors import FluxguardError

log = logging.getLogger(__name__)

FEATHER = 0.3  # width of the inner ramp, in inter-ocular distances (about 12 px on a 256 px portrait crop)
# Fallback ellipse around the eye-mouth centre, in inter-ocular distances (fitted to FaceMesh ovals of aligned crops)
ELLIPSE_HALF_WIDTH = 1.05
ELLIPSE_HALF_HEIGHT = 1.45
ELLIPSE_RAISE = 0.2  # the ellipse centre sits this far above the eye-mouth centre (the forehead is in the face)


@lru_cache(maxsize=1)
def _mesh():  # noqa: ANN202 (FaceMesh or None)
    from fluxguard.faces.facemesh import FaceMesh

    try:
        return FaceMesh.load(download=False)
    except FluxguardError as e:
        log.warning("FaceMesh unavailable (%s): face masks fall back to an ellipse from the landmarks", e)
        return None


def face_outline(crop: torch.Tensor, landmarks: np.ndarray) -> tuple[np.ndarray, str]:
    """The face silhouette polygon ((N, 2) crop px) of the face at ``landmarks`` (5 ArcFace points) and its source
    (``"facemesh"`` or ``"ellipse"``)."""
    from fluxguard.faces.facemesh import FACE_OVAL, FaceMesh

    mesh = _mesh()
    if mesh is not None:
        try:
            pts = mesh(crop.detach().float().cpu(), FaceMesh.box_from_landmarks(landmarks))
            return pts[list(FACE_OVAL), :2], "facemesh"
        except FluxguardError as e:
            log.info("face mask: %s; using the landmark ellipse", e)
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    eyes, mouth = lm[:2].mean(0), lm[3:].mean(0)
    iod = float(np.linalg.norm(lm[1] - lm[0]))
    up = eyes - mouth
    up /= np.linalg.norm(up) + 1e-9
    centre = (eyes + mouth) / 2 + up * ELLIPSE_RAISE * iod
    angle = np.degrees(np.arctan2(-up[0], up[1]))  # rotation of the face's vertical axis
    poly = cv2.ellipse2Poly((int(round(centre[0])), int(round(centre[1]))),
                            (int(round(ELLIPSE_HALF_WIDTH * iod)), int(round(ELLIPSE_HALF_HEIGHT * iod))),
                            int(round(angle)), 0, 360, 5)
    return poly.astype(np.float64), "ellipse"


def feathered_mask(outline: np.ndarray, size: int, feather_px: float) -> np.ndarray:
    """(size, size) float32 mask: the filled polygon with a smooth (raised-cosine) inner ramp of ``feather_px``."""
    filled = np.zeros((size, size), np.uint8)
    cv2.fillPoly(filled, [np.round(outline).astype(np.int32).reshape(-1, 1, 2)], 1)
    if feather_px <= 0:
        return filled.astype(np.float32)
    # distance (px) of every inside pixel to the nearest outside pixel; 0 outside
    dist = cv2.distanceTransform(filled, cv2.DIST_L2, 5)
    r = np.clip((dist - 0.5) / feather_px, 0.0, 1.0)
    return ((0.5 - 0.5 * np.cos(np.pi * r)) * filled).astype(np.float32)


def face_mask(crop: torch.Tensor, landmarks: np.ndarray | None = None, feather: float = FEATHER,
              extra: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The protection mask of the face in an aligned crop.

    Args:
        crop: (3, S, S) RGB in [0, 1] (an aligned portrait crop).
        landmarks: the face's 5 ArcFace points in crop px (default: the portrait template, right for aligned crops).
        feather: inner ramp width in inter-ocular distances.
        extra: optional (S, S) mask in [0, 1] of regions an edit asks for (e.g. hair); added (maximum) to the face.

    Returns:
        (1, S, S) float32 mask in [0, 1] and ``{"source": "facemesh" | "ellipse", "area": share of the crop}``.
    """
    from fluxguard.faces.align import portrait_template

    size = int(crop.shape[-1])
    lm = portrait_template(size) if landmarks is None else np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    outline, source = face_outline(crop, lm)
    iod = float(np.linalg.norm(lm[1] - lm[0]))
    m = torch.from_numpy(feathered_mask(outline, size, feather * iod))
    if extra is not None:
        m = torch.maximum(m, extra.detach().float().cpu().reshape(size, size).clamp(0, 1))
    return m[None], {"source": source, "area": round(float(m.mean()), 4)}


__all__ = ["FEATHER", "face_mask", "face_outline", "feathered_mask"]
