"""Identity loss over an ensemble of FR models, on aligned portrait crops."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fluxguard.faces.align import portrait_template
from fluxguard.recognition.base import FaceRecognizer


class IdentityLoss(nn.Module):
    """Mean over models of the cosine that the attack wants to move.

    Dodging: minimise ``cos(F(x), F(source))``. Impersonation: minimise ``1 - cos(F(x), F(target))``.
    The reference embeddings are computed once, from the clean crops (and the target crop), at construction.

    Args:
        recognizers: the attack ensemble.
        source: (B, 3, S, S) clean aligned portrait crops.
        target: (1 or B, 3, S, S) aligned portrait crop of the identity to impersonate, or None to dodge.
        landmarks: (5, 2) or (B, 5, 2) ArcFace landmarks of the faces in ``source`` (and in the images the loss is
            evaluated on); default: the portrait template, right for aligned crops. Give them for images that are
            not aligned portrait crops (e.g. a whole photo resized to 512, the paper's protocol).
        target_landmarks: landmarks of ``target``; default: the portrait template at the target's size.
    """

    def __init__(self, recognizers: Sequence[FaceRecognizer], source: torch.Tensor, target: torch.Tensor | None = None,
                 landmarks: torch.Tensor | None = None, target_landmarks: torch.Tensor | None = None):
        super().__init__()
        self.recognizers = list(recognizers)
        self.size = int(source.shape[-1])
        tpl = torch.as_tensor(portrait_template(self.size), dtype=torch.float64)
        self.landmarks = tpl if landmarks is None else torch.as_tensor(landmarks, dtype=torch.float64)
        with torch.no_grad():
            if target is None:
                ref, ref_lm = source, self.landmarks
            else:
                ref = target
                if target_landmarks is not None:
                    ref_lm = torch.as_tensor(target_landmarks, dtype=torch.float64)
                else:
                    ref_lm = torch.as_tensor(portrait_template(int(target.shape[-1])), dtype=torch.float64)
            self.refs = [r(ref, ref_lm).detach() for r in self.recognizers]
        self.impersonate = target is not None

    def similarities(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per model, the (B,) cosine of ``images`` to the reference identity."""
        if int(images.shape[-1]) != self.size:
            raise ValueError(f"expected {self.size}px crops, got {tuple(images.shape)}")
        return [(r(images, self.landmarks) * ref).sum(-1) for r, ref in zip(self.recognizers, self.refs, strict=True)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) loss: mean cosine (dodging) or 1 - mean cosine (impersonation)."""
        cos = torch.stack(self.similarities(images)).mean(0)
        return 1.0 - cos if self.impersonate else cos

    def names(self) -> list[str]:
        return [r.name for r in self.recognizers]

