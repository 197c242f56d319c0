"""Find faces, align them to canonical crops and paste edited crops back into the full photo."""

from fluxguard.faces.align import (
    ARCFACE_112,
    AlignedFace,
    align_faces,
    crop_template,
    estimate_similarity,
    paste_back,
    portrait_template,
    warp_affine,
)
from fluxguard.faces.detect import DETECTORS, FaceDetector, detect_cached, detect_faces, primary_face
from fluxguard.faces.types import Face

__all__ = [
    "ARCFACE_112",
    "DETECTORS",
    "AlignedFace",
    "Face",
    "FaceDetector",
    "align_faces",
    "crop_template",
    "detect_cached",
    "detect_faces",
    "estimate_similarity",
    "paste_back",
    "portrait_template",
    "primary_face",
    "warp_affine",
]
