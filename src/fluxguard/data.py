"""Where the real face photos live (never shipped): ``$FLUXGUARD_DATA`` or ``../shared/faces``.

The folder is laid out like ``../shared/faces``: ``identities/<name>/<n>.jpg``, ``portraits/<set>/<file>`` and a
``MANIFEST.tsv`` with columns path, identity, source_repo, source_path, license, width, height.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fluxguard.errors import FluxguardError

if TYPE_CHECKING:
    import torch

_REPO_ROOT = Path(__file__).resolve().parents[2]


def find_faces_dir() -> Path | None:
    """Return the face-photo folder, or None when it is not present on this machine."""
    env = os.environ.get("FLUXGUARD_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / ".." / "shared" / "faces", _REPO_ROOT / ".." / "shared" / "faces"]
    for c in candidates:
        if (c / "identities").is_dir() or (c / "MANIFEST.tsv").is_file():
            return c.resolve()
    return None


@dataclass(frozen=True)
class Photo:
    path: Path
    identity: str | None  # None for unlabeled portraits
    source: str  # source repository, used to keep impostor pairs within one label space

    @property
    def key(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def list_photos(root: str | Path) -> list[Photo]:
    """All photos under ``root``: from MANIFEST.tsv when present, else from the folder layout."""
    root = Path(root)
    if not root.is_dir():
        raise FluxguardError("data folder not found", path=root)
    manifest = root / "MANIFEST.tsv"
    photos: list[Photo] = []
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                p = root / row["path"]
                if p.is_file():
                    ident = row.get("identity") or "-"
                    photos.append(Photo(p, None if ident == "-" else ident, row.get("source_repo", "")))
        return photos
    for p in sorted((root / "identities").glob("*/*")):
        if p.is_file():
            photos.append(Photo(p, p.parent.name, p.parent.name))
    for p in sorted((root / "portraits").glob("*/*")):
        if p.is_file():
            photos.append(Photo(p, None, p.parent.name))
    return photos


def identity_groups(photos: list[Photo], min_photos: int = 2) -> dict[str, list[Photo]]:
    """Identities with at least ``min_photos`` photos, sorted by name for determinism."""
    groups: dict[str, list[Photo]] = {}
    for ph in photos:
        if ph.identity is not None:
            groups.setdefault(ph.identity, []).append(ph)
    return {k: sorted(v, key=lambda p: p.path.name) for k, v in sorted(groups.items()) if len(v) >= min_photos}


# Identities are split by a stable hash of their name, so every tool agrees on who is held out: thresholds are
# calibrated on "calib", methods are evaluated on "eval", and our small models are trained on "train" (plus the
# unlabeled portraits).
SPLITS = ("calib", "eval", "train")


def split_of(identity: str) -> str:
    """``"calib"`` (40 %), ``"eval"`` (30 %) or ``"train"`` (30 %) for an identity name; unlabeled photos train."""
    import hashlib

    if not identity:
        return "train"
    bucket = int(hashlib.sha1(identity.encode("utf-8")).hexdigest(), 16) % 10
    return "calib" if bucket < 4 else "eval" if bucket < 7 else "train"


def photos_in_split(photos: list[Photo], split: str) -> list[Photo]:
    """Photos of one split; unlabeled portraits belong to ``train``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [p for p in photos if (split_of(p.identity) if p.identity else "train") == split]


@dataclass(frozen=True)
class SampleFace:
    """A real face photo that ships inside an installed package, with its five ArcFace landmarks."""

    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    landmarks: np.ndarray  # (5, 2) ArcFace order, photo pixels

    @property
    def image(self) -> torch.Tensor:
        """(1, 3, H, W) float in [0, 1]."""
        import torch

        return torch.from_numpy(self.rgb).permute(2, 0, 1)[None].float() / 255.0


# ArcFace 5 points measured once with dlib's 68-point predictor (eye centres, nose tip 30, mouth corners 48/54).
_SAMPLE_LANDMARKS = {
    "astronaut": [[203.17, 101.5], [246.5, 104.17], [225.0, 127.0], [201.0, 139.0], [246.0, 141.0]],
    "grace_hopper": [[223.67, 192.33], [305.33, 189.17], [267.0, 238.0], [233.0, 281.0], [300.0, 277.0]],
}


def package_faces(mirrored: bool = False) -> list[SampleFace]:
    """Public-domain faces shipped by scikit-image (astronaut Eileen Collins) and matplotlib (Grace Hopper).

    Data-free tests and demos use them. With ``mirrored`` each is also returned flipped left-right (a different
    input with known landmarks).
    """
    import matplotlib.cbook
    import skimage.data
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.array(Image.open(f).convert("RGB"))
    faces = [SampleFace("astronaut", skimage.data.astronaut(), np.array(_SAMPLE_LANDMARKS["astronaut"])),
             SampleFace("grace_hopper", hopper, np.array(_SAMPLE_LANDMARKS["grace_hopper"]))]
    if mirrored:
        for f in list(faces):
            lm = f.landmarks.copy()
            lm[:, 0] = f.rgb.shape[1] - 1 - lm[:, 0]
            faces.append(SampleFace(f"{f.name}_mirrored", np.ascontiguousarray(f.rgb[:, ::-1]), lm[[1, 0, 2, 4, 3]]))
    return faces
