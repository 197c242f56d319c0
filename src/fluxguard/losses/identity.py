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
    """

    def __init__(self, recognizers: Sequence[FaceRecognizer], source: torch.Tensor, target: torch.Tensor | None = None):
        super().__init__()
        self.recognizers = list(recognizers)
        self.size = int(source.shape[-1])
        self.landmarks = torch.as_tensor(portrait_template(self.size), dtype=torch.float64)
        with torch.no_grad():
            ref = source if target is None else target
            self.refs = [r(ref, self.landmarks).detach() for r in self.recognizers]
        self.impersonate = target is not None

    def similarities(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per model, the (B,) cosine of ``images`` to the reference identity.

        ``landmarks`` ((B, 5, 2) in ``images`` coordinates) overrides the fixed template, e.g. for input diversity.
        """
        if landmarks is None:
            if int(images.shape[-1]) != self.size:
                raise ValueError(f"expected {self.size}px crops, got {tuple(images.shape)}")
            landmarks = self.landmarks
        return [(r(images, landmarks) * ref).sum(-1) for r, ref in zip(self.recognizers, self.refs, strict=True)]

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) loss: mean cosine (dodging) or 1 - mean cosine (impersonation)."""
        cos = torch.stack(self.similarities(images, landmarks)).mean(0)
        return 1.0 - cos if self.impersonate else cos

    def names(self) -> list[str]:
        return [r.name for r in self.recognizers]

