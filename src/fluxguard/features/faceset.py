"""Aligned face sets for template inversion: photos of one split, their main face, portrait crops, targets.

Every face is first cut once to a *portrait crop* (``PORTRAIT_SIZE`` px, the ArcFace box widened 2x, see
:func:`fluxguard.faces.align.portrait_template`) with its five landmarks in crop coordinates. FR models cut their own
input crops from it (as they would from the photo), and the reconstruction target is the ArcFace-aligned face at
``RECON_SIZE`` px (the ArcFace 112 template scaled down), which is what the shadow and attacker decoders produce.

The ``train`` split is cut into two halves with disjoint identities: the *shadow* half trains the defender's shadow
decoders, the *attacker* half trains the evaluation attacker. Unlabeled portraits count as their own identity.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fluxguard.data import list_photos, split_of
from fluxguard.faces.align import crop_template, estimate_similarity, portrait_template, warp_affine

log = logging.getLogger(__name__)

PORTRAIT_SIZE = 256
RECON_SIZE = 64
HALVES = ("shadow", "attacker")

# landmarks of the main face of a photo file (None: no face)
LandmarkSource = Callable[[Path], "np.ndarray | None"]


@dataclass(frozen=True)
class FaceItem:
    """One photo's main face."""

    key: str  # path relative to the data folder
    path: Path
    identity: str | None  # None: unlabeled portrait
    source: str
    landmarks: np.ndarray  # (5, 2) in photo pixels

    @property
    def group(self) -> str:
        """The identity, or the file for an unlabeled portrait (its own identity)."""
        return self.identity if self.identity is not None else f"portrait:{self.key}"


def half_of(group: str) -> str:
    """``"shadow"`` or ``"attacker"`` for an identity of the train split (stable hash, about half each)."""
    h = int.from_bytes(hashlib.sha1(f"advface-half:{group}".encode()).digest()[:4], "big")
    return HALVES[h % 2]


def detector_landmarks(cache_dir: Path | None = None) -> LandmarkSource:
    """Landmarks from the project's detector (:func:`fluxguard.faces.detect.detect_cached`), main face."""
    from fluxguard.faces.detect import detect_cached, load_rgb
    from fluxguard.recognition.calibration import main_face

    def find(path: Path) -> np.ndarray | None:
        rgb = load_rgb(path)
        return main_face(detect_cached(path, image=rgb, cache_dir=cache_dir), rgb.shape)

    return find


def collect(root: str | Path, split: str, landmarks: LandmarkSource, *,
            portraits: bool | None = None, identities: Collection[str] | None = None) -> list[FaceItem]:
    """Faces of the photos of ``split`` identities (photos where no face is found are dropped).

    Args:
        root: data folder laid out like ``../shared/faces``.
        split: ``"calib"``, ``"eval"`` or ``"train"``.
        landmarks: the main face's landmarks of a photo file.
        portraits: include unlabeled portraits (default: only for ``train``, where :mod:`fluxguard.data` puts them).
        identities: only these identities (the others are not even run through the detector).
    """
    root = Path(root)
    with_portraits = split == "train" if portraits is None else portraits
    items, missed = [], 0
    for ph in list_photos(root):
        if ph.identity is None:
            if not with_portraits:
                continue
        elif split_of(ph.identity) != split or (identities is not None and ph.identity not in identities):
            continue
        lm = landmarks(ph.path)
        if lm is None:
            missed += 1
            continue
        items.append(FaceItem(ph.path.relative_to(root).as_posix(), ph.path, ph.identity, ph.source,
                              np.asarray(lm, dtype=np.float64)))
    log.info("%s split: %d faces (%d photos without a face)", split, len(items), missed)
    return items


def portrait_crop(rgb: np.ndarray, landmarks: np.ndarray, size: int = PORTRAIT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The portrait crop of one face: ((size, size, 3) uint8, (5, 2) landmarks in crop pixels)."""
    m = estimate_similarity(np.asarray(landmarks, dtype=np.float64), portrait_template(size))
    photo = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1)[None].float() / 255.0
    crop = warp_affine(photo, m[None], (size, size))[0].clamp(0, 1)
    lm = np.asarray(landmarks, dtype=np.float64) @ m[:, :2].numpy().T + m[:, 2].numpy()
    return (crop.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8), lm


def recon_landmarks(size: int = RECON_SIZE) -> np.ndarray:
    """The five landmarks of a reconstruction (the ArcFace 112 template scaled to ``size``)."""
    return crop_template(size, 1.0)


def recon_target(crops: torch.Tensor, landmarks: torch.Tensor | np.ndarray, size: int = RECON_SIZE) -> torch.Tensor:
    """ArcFace-aligned (B, 3, size, size) faces from (B, 3, H, W) [0, 1] crops and their (B, 5, 2) landmarks."""
    lm = torch.as_tensor(np.asarray(landmarks), dtype=torch.float64)
    m = estimate_similarity(lm, recon_landmarks(size))
    return warp_affine(crops, m, (size, size)).clamp(0, 1)


def to_tensor(crops: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def embed(model: torch.nn.Module, crops: np.ndarray | torch.Tensor, landmarks: np.ndarray,
          batch: int = 32) -> np.ndarray:
    """(N, D) unit templates of faces given as portrait crops ((N, H, W, 3) uint8 or (N, 3, H, W) float)."""
    out = []
    for i in range(0, len(crops), batch):
        x = crops[i:i + batch]
        x = to_tensor(x) if isinstance(x, np.ndarray) else x
        out.append(model(x, torch.tensor(np.asarray(landmarks[i:i + batch]))).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def flip(crops: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror (N, H, W, 3) crops left-right; landmarks follow (and swap sides, keeping the ArcFace order)."""
    w = crops.shape[2]
    lm = landmarks.copy()
    lm[..., 0] = w - 1 - lm[..., 0]
    return np.ascontiguousarray(crops[:, :, ::-1]), lm[:, [1, 0, 2, 4, 3]]


def jitter_landmarks(landmarks: np.ndarray, rng: np.random.Generator, rotate_deg: float = 4.0, scale: float = 0.04,
                     shift: float = 0.03) -> np.ndarray:
    """A random similarity of (N, 5, 2) landmarks about their centre: detector-like noise for training inputs.

    ``shift`` is a fraction of the eye-to-mouth distance.
    """
    out = np.empty_like(landmarks)
    for i, lm in enumerate(landmarks):
        c = lm.mean(0)
        size = np.linalg.norm(lm[:2].mean(0) - lm[3:].mean(0))
        a = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg))
        s = 1.0 + rng.uniform(-scale, scale)
        r = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        out[i] = (lm - c) @ r.T + c + rng.uniform(-shift, shift, size=2) * size
    return out


def photometric(crops: np.ndarray, rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    """Random brightness, contrast, saturation and gamma per image of (N, H, W, 3) uint8 crops."""
    x = crops.astype(np.float32) / 255.0
    n = len(x)
    b = rng.uniform(1 - strength, 1 + strength, (n, 1, 1, 1))
    c = rng.uniform(1 - strength, 1 + strength, (n, 1, 1, 1))
    s = rng.uniform(1 - strength, 1 + strength, (n, 1, 1, 1))
    g = rng.uniform(1 - strength, 1 + strength, (n, 1, 1, 1))
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * s
    mean = x.mean((1, 2, 3), keepdims=True)
    x = (x - mean) * c + mean
    x = np.clip(x * b, 0, 1) ** g
    return (np.clip(x, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def identity_pairs(items: Sequence[FaceItem]) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) ordered index pairs (gallery, probe): same identity (different photos) / different
    identities of the same source. Both orders of every pair are kept, since gallery and probe are treated
    differently (protected gallery, clean probe)."""
    from fluxguard.recognition.calibration import FaceRecord, pair_indices

    recs = [FaceRecord(it.key, it.path, it.group, it.source, it.landmarks) for it in items]
    gen, imp = pair_indices(recs)
    return np.concatenate([gen, gen[:, ::-1]]), np.concatenate([imp, imp[:, ::-1]])
