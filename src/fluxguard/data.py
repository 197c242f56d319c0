"""Where the real face photos live (never shipped): ``$FLUXGUARD_DATA`` or ``../shared/faces``.

The folder is laid out like ``../shared/faces``: ``identities/<name>/<n>.jpg``, ``portraits/<set>/<file>`` and a
``MANIFEST.tsv`` with columns path, identity, source_repo, source_path, license, width, height.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from fluxguard.errors import FluxguardError

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
