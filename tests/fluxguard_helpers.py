"""Shared helpers for the Flux-Guard tests: a tiny frozen random FR net and a real aligned face (astronaut)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fluxguard.faces.align import ARCFACE_112
from fluxguard.recognition.base import CropSpec, FaceRecognizer, RecognizerSpec


class RandomConvFR(FaceRecognizer):
    """A small frozen random conv net standing in for a real FR model (112 px ArcFace crop, 64-d)."""

    spec = RecognizerSpec(
        name="random_conv", family="test", embedding_size=64, input="112x112 RGB, (x-0.5)/0.5",
        crop=CropSpec(112, tuple(map(tuple, ARCFACE_112.tolist()))), source="random", source_sha256="",
        license="n/a", weights_file=None)

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 64))
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=g) * (1.0 / np.sqrt(max(1, p[0].numel())))
        # random ReLU features share one dominant direction; removing the embedding of a flat grey crop makes
        # cosines between different faces spread out like a real FR model's
        with torch.no_grad():
            self.register_buffer("center", self.net(torch.zeros(1, 3, 112, 112)))
        self.freeze()

    @classmethod
    def from_file(cls, path):  # noqa: ANN001, ANN206 - random weights have no file
        raise NotImplementedError("RandomConvFR has random weights")

    def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
        return self.net(crop * 2 - 1) - self.center


def astronaut_crop(size: int) -> torch.Tensor:
    """(1, 3, size, size) aligned portrait crop of the astronaut (skimage's public-domain photo), RGB [0, 1]."""
    from fluxguard.data import package_faces
    from fluxguard.faces.align import align_faces

    f = package_faces()[0]
    photo = torch.from_numpy(f.rgb).permute(2, 0, 1).float() / 255
    return align_faces(photo, f.landmarks, size)[0].crop[None]
