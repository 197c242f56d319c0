"""The evaluation protocol's data model: modes, FARs, the impersonation targets, the evaluated identities and the
run's configuration (the protocol itself is described in :mod:`fluxguard.eval.runner`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fluxguard.errors import ConfigError, FluxguardError
from fluxguard.faces.types import Face

MODES = ("dodge", "impersonate")
FARS = ("1e-1", "1e-2", "1e-3")
MAIN_FAR = "1e-2"
SCHEMA = 1

# The four target identities of the common protocol (methods.md §1.3, ../shared/faces/README.md): the photo the
# method optimises towards, and a different photo of the same person used for scoring.
PROTOCOL_TARGETS: tuple[tuple[str, str], ...] = (
    ("portraits/wdp_targets/target_images_005869.jpg", "portraits/wdp_targets/test_images_008793.jpg"),
    ("portraits/clip2protect/085807.jpg", "portraits/clip2protect/047073.jpg"),
    ("portraits/wdp_targets/target_images_116481.jpg", "portraits/wdp_targets/test_images_055622.jpg"),
    ("portraits/wdp_targets/target_images_169284.jpg", "portraits/wdp_targets/test_images_166607.jpg"),
)

# A detector maps an (H, W, 3) uint8 RGB image to its faces.
Detector = Callable[[np.ndarray], list[Face]]
# progress(stage, done, total)
ProgressFn = Callable[[str, int, int], None]
# The faces of a photo file and its (H, W) (:meth:`fluxguard.eval.cache.FaceCache.file_faces`).
FileFaces = Callable[[Path], tuple[list[Face], tuple[int, int]]]


@dataclass(frozen=True)
class Subject:
    """One evaluated identity: the photo that is protected and a different photo of the same person."""

    identity: str
    source: Path
    reference: Path
    source_face: Face
    reference_face: Face
    index: int  # position in the protocol order (selects the impersonation target round-robin)


@dataclass(frozen=True)
class Target:
    """An impersonation target: the photo the method sees and the different photo used for scoring."""

    index: int
    photo: Path
    test: Path
    face: Face
    test_face: Face


@dataclass
class EvalConfig:
    method: str
    data_dir: Path
    out_dir: Path
    modes: tuple[str, ...]
    seed: int = 0
    limit: int | None = None
    robustness: bool = True
    purification: Any = "auto"
    white_box: bool = False
    strength: str | None = None
    device: str = "cpu"
    params: dict[str, Any] = field(default_factory=dict)


def main_face(faces: Sequence[Face], shape: tuple[int, ...]) -> Face | None:
    """The largest face whose centre lies inside the image (the person a single-subject photo shows)."""
    h, w = shape[:2]
    best, best_area = None, -1.0
    for f in faces:
        b = np.asarray(f.box, dtype=np.float64)
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        area = (b[2] - b[0]) * (b[3] - b[1])
        if 0 <= cx < w and 0 <= cy < h and area > best_area:
            best, best_area = f, area
    return best


def find_subjects(data: Path, limit: int | None, file_faces: FileFaces, notes: list[str]) -> list[Subject]:
    """The evaluated identities in protocol order, up to ``limit`` with two usable photos (skips go to ``notes``)."""
    from fluxguard.data import identity_groups, list_photos, photos_in_split

    groups = identity_groups(photos_in_split(list_photos(data), "eval"), min_photos=2)
    order = sorted(groups, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
    out: list[Subject] = []
    for name in order:
        if limit is not None and len(out) >= limit:
            break
        found: list[tuple[Path, Face]] = []
        for ph in groups[name]:
            face = main_face(*file_faces(ph.path))
            if face is not None:
                found.append((ph.path, face))
            if len(found) == 2:
                break
        if len(found) < 2:
            notes.append(f"identity {name} skipped: a face in fewer than two photos")
            continue
        out.append(Subject(name, found[0][0], found[1][0], found[0][1], found[1][1], len(out)))
    if not out:
        raise FluxguardError("no eval-split identity with two photos showing a face", path=data)
    return out


def find_targets(data: Path, pairs: Sequence[tuple[str, str]], file_faces: FileFaces) -> list[Target]:
    """The impersonation targets of (target photo, test photo) ``pairs`` relative to ``data``."""
    out = []
    for i, (photo, test) in enumerate(pairs):
        pp, tp = data / photo, data / test
        for p in (pp, tp):
            if not p.is_file():
                raise FluxguardError("impersonation target photo missing (see ../shared/faces/README.md)", path=p)
        fp = main_face(*file_faces(pp))
        ft = main_face(*file_faces(tp))
        if fp is None or ft is None:
            raise FluxguardError("no face found in a target photo", path=pp if fp is None else tp)
        out.append(Target(i, pp, tp, fp, ft))
    if not out:
        raise ConfigError("impersonation needs at least one target pair")
    return out


def reference_key(mode: str, subject: Subject, targets: Sequence[Target]) -> str:
    """What a protected ``subject`` is compared with: its own reference photo (dodging, ``ref:<identity>``) or its
    round-robin target's test photo (impersonation, ``tgt:<index>``)."""
    if mode == "dodge":
        return f"ref:{subject.identity}"
    return f"tgt:{targets[subject.index % len(targets)].index}"
