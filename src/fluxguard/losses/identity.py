"""Identity loss over an ensemble of FR models, on aligned portrait crops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from fluxguard.faces.align import portrait_template
from fluxguard.recognition.augment import model_augmentation, record_feature_maps
from fluxguard.recognition.base import FaceRecognizer


class IdentityLoss(nn.Module):
    """Per-model identity terms the attack minimises, combined by mean (default) or sum over models.

    Per model m:

    * dodging: ``cos(F_m(x), F_m(source))``;
    * dodging with a ``guide`` identity (WDP's obfuscation loss,
      ``(1 - cos(x, guide)) - (1 - cos(x, source))``): ``cos(F_m(x), F_m(source)) - cos(F_m(x), F_m(guide))``;
    * impersonation: ``1 - cos(F_m(x), F_m(target))``.

    The reference embeddings are computed once, from the clean crops (and the target/guide crop), at construction.

    Args:
        recognizers: the attack ensemble.
        source: (B, 3, S, S) clean aligned portrait crops.
        target: (1 or B, 3, S, S) aligned portrait crop of the identity to impersonate, or None to dodge.
        reduction: ``"mean"`` over models (Flux-Guard, DiffAM) or ``"sum"`` (WDP, CLIP2Protect).
        guide: dodging only: (1 or B, 3, S, S) crop of an identity to move towards while moving away from the
            source.
        landmarks: (5, 2) or (B, 5, 2) ArcFace landmarks of the faces in ``source`` (and in the images the loss is
            evaluated on); default: the portrait template, right for aligned crops. Give them for images that are
            not aligned portrait crops (e.g. a whole photo resized to 512, the paper's protocol).
        target_landmarks: landmarks of ``target``; default: the portrait template at the target's size.
    """

    def __init__(
        self,
        recognizers: Sequence[FaceRecognizer],
        source: torch.Tensor,
        target: torch.Tensor | None = None,
        landmarks: torch.Tensor | None = None,
        target_landmarks: torch.Tensor | None = None,
        *,
        reduction: Literal["mean", "sum"] = "mean",
        guide: torch.Tensor | None = None,
        target_views: int = 1,
        source_weight: float = 0.0,
    ):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if target is not None and guide is not None:
            raise ValueError("a guide identity is for dodging; impersonation already has a target")
        self.recognizers = list(recognizers)
        self.reduction = reduction
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
            if target is None or target_views <= 1:
                self.refs = [r(ref, ref_lm).detach() for r in self.recognizers]
            else:
                self.refs = [_centroid(r, ref, ref_lm, target_views) for r in self.recognizers]
            self.guides = None if guide is None else [r(guide, self.landmarks).detach() for r in self.recognizers]
            # impersonation with source_weight > 0 also moves away from the source's own embedding
            self.sources = ([r(source, self.landmarks).detach() for r in self.recognizers]
                            if target is not None and source_weight > 0 else None)
        self.impersonate = target is not None
        self.source_weight = float(source_weight)
        self.augmentation: tuple[list[float], torch.Generator] | None = None

    def embeddings(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per model, the (B, D) unit embeddings of ``images``.

        ``landmarks`` ((B, 5, 2) in ``images`` coordinates) overrides the fixed template, e.g. for input diversity.
        """
        lm = self._landmarks(images, landmarks)
        return [self._embed_one(i, r, images, lm) for i, r in enumerate(self.recognizers)]

    def embeddings_and_features(self, images: torch.Tensor, landmarks: torch.Tensor | None, depth: float,
                                augment: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per model, the embeddings of ``images`` (as :meth:`embeddings`) and the (B, ...) feature map its
        convolution at relative ``depth`` (0: the first a convolution reads, 1: the last) reads on the way.
        ``augment=False`` evaluates the models themselves even when model augmentation is on."""
        if not 0 <= depth <= 1:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        lm = self._landmarks(images, landmarks)
        embs, feats = [], []
        for i, r in enumerate(self.recognizers):
            with record_feature_maps() as maps:
                embs.append(self._embed_one(i, r, images, lm, augment))
            if not maps:
                raise ValueError(f"{r.name} exposes no feature maps (its convolutions do not call "
                                 "recognition.augment.feature_dropout)")
            feats.append(maps[round(depth * (len(maps) - 1))])
        return embs, feats

    def _landmarks(self, images: torch.Tensor, landmarks: torch.Tensor | None) -> torch.Tensor:
        if landmarks is not None:
            return landmarks
        if int(images.shape[-1]) != self.size:
            raise ValueError(f"expected {self.size}px crops, got {tuple(images.shape)}")
        return self.landmarks

    def _embed_one(self, i: int, model: FaceRecognizer, images: torch.Tensor, landmarks: torch.Tensor,
                   augment: bool = True) -> torch.Tensor:
        """Model ``i``'s embeddings, as a thinned copy when model augmentation is on (and ``augment``)."""
        if self.augmentation is None or not augment:
            return model(images, landmarks)
        rates, gen = self.augmentation
        with model_augmentation(rates[i], gen):
            return model(images, landmarks)

    def augment_models(self, rates: Sequence[float] | None, generator: torch.Generator | None = None) -> None:
        """From now on, evaluate each model as a randomly thinned copy (dropout rate ``rates[m]`` on the feature maps
        its convolutions read, masks from ``generator``); ``None``: the models themselves (the default)."""
        self.augmentation = None if rates is None else (list(rates), generator or torch.Generator().manual_seed(0))

    def cosines(self, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """(M, B) cosine of precomputed embeddings to the reference identity (target, else source)."""
        return torch.stack([(e * ref).sum(-1) for e, ref in zip(embeddings, self.refs, strict=True)])

    def similarities(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per model, the (B,) cosine of ``images`` to the reference identity (target, else source)."""
        return list(self.cosines(self.embeddings(images, landmarks)))

    def terms(self, embeddings: Sequence[torch.Tensor]) -> torch.Tensor:
        """(M, B) loss terms of precomputed embeddings, one row per model."""
        cos = self.cosines(embeddings)
        if self.impersonate:
            if self.sources is not None:
                away = torch.stack([(e * s).sum(-1) for e, s in zip(embeddings, self.sources, strict=True)])
                return 1.0 - cos + self.source_weight * away
            return 1.0 - cos
        if self.guides is not None:
            return cos - torch.stack([(e * g).sum(-1) for e, g in zip(embeddings, self.guides, strict=True)])
        return cos

    def per_model(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(M, B) loss terms of ``images``, one row per model."""
        return self.terms(self.embeddings(images, landmarks))

    def forward(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) loss: the per-model terms combined by ``reduction``."""
        terms = self.per_model(images, landmarks)
        return terms.sum(0) if self.reduction == "sum" else terms.mean(0)

    def names(self) -> list[str]:
        return [r.name for r in self.recognizers]


def _centroid(model: FaceRecognizer, crops: torch.Tensor, landmarks: torch.Tensor, views: int) -> torch.Tensor:
    """(B, D) unit mean embedding of ``views`` views of target crops: the crop itself, its mirror image, and
    crops jittered by +-5 % scale and shift (fixed draws). A target's identity is what survives such changes, and an
    attack aimed at the centroid is aimed at the identity rather than at one photo's accidents."""
    size = int(crops.shape[-1])
    lm = torch.as_tensor(landmarks, dtype=torch.float64)
    lm = lm.expand(crops.shape[0], 5, 2) if lm.dim() == 2 else lm
    mirrored_lm = lm[:, [1, 0, 2, 4, 3]].clone()
    mirrored_lm[..., 0] = size - 1 - mirrored_lm[..., 0]
    embs = [model(crops, lm), model(crops.flip(-1), mirrored_lm)]
    g = torch.Generator().manual_seed(0)
    centre = lm.mean(1, keepdim=True)
    for _ in range(views - 2):
        r = torch.rand(4, generator=g, dtype=torch.float64) * 2 - 1
        jittered = (lm - centre) * (1 + 0.05 * r[0]) + centre + 0.05 * size * r[1:3]
        embs.append(model(crops, jittered))
    mean = torch.stack(embs[:views]).mean(0)
    return torch.nn.functional.normalize(mean, dim=-1).detach()
