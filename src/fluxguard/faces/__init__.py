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
from fluxguard.faces.types import Face

__all__ = [
    "ARCFACE_112",
    "AlignedFace",
    "Face",
    "align_faces",
    "crop_template",
    "estimate_similarity",
    "paste_back",
    "portrait_template",
    "warp_affine",
]
