"""Attack-time access to the feature maps every FR model's convolutions read: model augmentation and taps.

An attack that has to fool many randomly thinned copies of each surrogate cannot lean on a few of its units, and
what it finds transfers better to models it never saw (DFANet: Zhong & Deng 2020, "Towards Transferable
Adversarial Attack against Deep Face Recognition", arXiv 2004.05790). The zoo's models call
:func:`feature_dropout` on each convolution's input feature map (inverted dropout where a layer reads its units; a
zero in a layer's raw output, ahead of a normalisation, would be an outlier rather than a dropped unit). It is the
identity unless an attack has entered :func:`model_augmentation`, so embeddings, thresholds and parity are
untouched everywhere else. The same hook lets an attack read the maps (:func:`record_feature_maps`) for
feature-level losses, which move a middle layer rather than only the embedding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_STATE: ContextVar[tuple[float, torch.Generator] | None] = ContextVar("fluxguard_feature_dropout", default=None)
_TAP: ContextVar[list[torch.Tensor] | None] = ContextVar("fluxguard_feature_tap", default=None)


@contextmanager
def model_augmentation(p: float, generator: torch.Generator) -> Iterator[None]:
    """Inside the block, each feature map a convolution of the zoo reads is dropped out with probability ``p``
    (kept units scaled by ``1 / (1 - p)``), the masks drawn from ``generator`` (same seed, same masks)."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    token = _STATE.set((p, generator) if p > 0 else None)
    try:
        yield
    finally:
        _STATE.reset(token)


@contextmanager
def record_feature_maps() -> Iterator[list[torch.Tensor]]:
    """Inside the block, every feature map a convolution of the zoo reads (after any dropout) is appended, in the
    order the model reads them, to the list the block gets."""
    maps: list[torch.Tensor] = []
    token = _TAP.set(maps)
    try:
        yield maps
    finally:
        _TAP.reset(token)


def feature_dropout(x: torch.Tensor) -> torch.Tensor:
    """``x`` with dropout applied when inside :func:`model_augmentation`, else ``x`` itself (recorded when inside
    :func:`record_feature_maps`)."""
    state = _STATE.get()
    if state is not None:
        p, gen = state
        # drawn on the CPU generator, then moved: the same masks whatever the device or thread count
        keep = torch.bernoulli(torch.full(x.shape, 1 - p), generator=gen).to(device=x.device, dtype=x.dtype)
        x = x * keep / (1 - p)
    tap = _TAP.get()
    if tap is not None:
        tap.append(x)
    return x


@torch.no_grad()
def calibrate_dropout(model: torch.nn.Module, images: torch.Tensor, landmarks: torch.Tensor, similarity: float,
                      seed: int = 0, draws: int = 2, steps: int = 7) -> float:
    """The dropout rate at which ``model``'s thinned copies keep a mean cosine of ``similarity`` to the model itself
    on ``images``.

    Architectures differ by an order of magnitude in how much one rate thins them (on a package face, dlib's ResNet
    keeps a cosine of 0.9 at about 8 %, the TF.js models of the zoo at under 1 %), so an attack sets how far each
    thinned copy may drift and each model gets the rate that gives it: bisection on log p over [1e-4, 0.5].
    """
    if not 0 < similarity < 1:
        raise ValueError(f"similarity must be in (0, 1), got {similarity}")
    clean = model(images, landmarks)
    lo, hi = math.log(1e-4), math.log(0.5)
    for _ in range(steps):
        mid = (lo + hi) / 2
        gen = torch.Generator().manual_seed(seed)
        cos = 0.0
        for _ in range(draws):
            with model_augmentation(math.exp(mid), gen):
                cos += float((model(images, landmarks) * clean).sum(-1).mean()) / draws
        lo, hi = (mid, hi) if cos >= similarity else (lo, mid)
    return math.exp(lo)
