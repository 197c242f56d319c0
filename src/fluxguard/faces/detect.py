"""Face detection with five ArcFace landmarks: one entry point, a registry of detectors, and a result cache.

>>> from fluxguard.faces.detect import detect_faces
>>> faces = detect_faces(rgb)  # (H, W, 3) uint8 -> list[Face], best score first

Adding a detector is one file with a :class:`FaceDetector` subclass plus one line in :data:`DETECTORS`.

:func:`detect_cached` keeps results on disk keyed by the file's SHA-1 (plus detector, its version and the
settings), so evaluation over thousands of photos only pays for detection once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from fluxguard.errors import ConfigError, ImageError
from fluxguard.faces.types import Face
from fluxguard.registry import Registry

logger = logging.getLogger(__name__)


class FaceDetector(ABC):
    """A face detector returning boxes, scores and the five ArcFace landmarks.

    Subclasses set ``name``, ``version`` (change it whenever outputs change: it is part of the cache key) and
    ``default_threshold`` (the score a face needs when the caller passes no threshold), and implement
    :meth:`detect`. Instances are created once per process by :func:`get_detector` and must be reusable.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    default_threshold: ClassVar[float]

    @abstractmethod
    def detect(self, image: np.ndarray, *, min_face_size: int, threshold: float) -> list[Face]:
        """Faces in a (H, W, 3) uint8 RGB image, in any order; scores are on the detector's own scale."""


DETECTORS: Registry[type[FaceDetector]] = Registry(
    "face detector",
    {
        "mtcnn": "fluxguard.faces.mtcnn:MTCNNDetector",
        "dlib-hog": "fluxguard.faces.dlib_hog:DlibHogDetector",
    },
)
DEFAULT_DETECTOR = "mtcnn"


@functools.cache
def get_detector(name: str = DEFAULT_DETECTOR) -> FaceDetector:
    """The shared instance of a registered detector (weights load once)."""
    return DETECTORS[name]()


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Accept (H, W, 3) RGB, (H, W, 4) RGBA (alpha dropped) or (H, W) grey uint8; return C-contiguous (H, W, 3)."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"expected an (H, W, 3) RGB image, got shape {tuple(np.shape(image))}")
    return np.ascontiguousarray(arr)


def detect_faces(
    image: np.ndarray,
    *,
    min_face_size: int = 20,
    threshold: float | None = None,
    detector: str = DEFAULT_DETECTOR,
) -> list[Face]:
    """Find the faces in an RGB photo.

    Args:
        image: (H, W, 3) uint8 RGB (grey (H, W) and RGBA are accepted too).
        min_face_size: smallest face searched for, in px of ``image``: faces whose box is smaller on both sides
            are dropped. Very large photos are searched at a reduced resolution (see the detector), which raises
            this floor for them.
        threshold: minimum detection score; None uses the detector's default (MTCNN: probability in [0, 1]).
        detector: a name in :data:`DETECTORS`.

    Returns:
        Zero or more faces, highest score first. Boxes and landmarks are in ``image`` pixel coordinates (pixel
        centres on integers) and may extend past the image for faces cut by its border.
    """
    if min_face_size < 1:
        raise ConfigError(f"min_face_size must be >= 1, got {min_face_size}")
    rgb = as_rgb_uint8(image)
    det = get_detector(detector)
    thr = det.default_threshold if threshold is None else float(threshold)
    if rgb.shape[0] < 2 or rgb.shape[1] < 2:
        return []
    faces = det.detect(rgb, min_face_size=int(min_face_size), threshold=thr)
    faces = [f for f in faces if max(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= min_face_size]
    return sorted(faces, key=lambda f: -f.score)


def primary_face(faces: list[Face]) -> Face | None:
    """The face a portrait or identity photo is about: the one with the largest box (None for no face).

    Use this rather than ``faces[0]``: faces are sorted by score, and a sharp background face can outscore the
    subject's (seen on LFW and CelebA photos).
    """
    if not faces:
        return None
    return max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))


# --- detection cache -------------------------------------------------------------------------------------------


def detection_cache_dir() -> Path:
    """``$FLUXGUARD_CACHE/detections``, else ``$XDG_CACHE_HOME/fluxguard/detections`` (default ``~/.cache``)."""
    root = os.environ.get("FLUXGUARD_CACHE")
    if root:
        return Path(root).expanduser() / "detections"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fluxguard" / "detections"


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB with its EXIF orientation applied."""
    try:
        from fluxguard.io import load_image
    except ImportError:
        load_image = None
    if load_image is not None:
        return load_image(path).rgb
    # TEMPORARY minimal loader until fluxguard.io (load_image) lands on main; remove this branch then.
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ImageError(f"cannot read image ({e})", path=path) from None


def detect_cached(
    path: str | os.PathLike[str],
    *,
    min_face_size: int = 20,
    threshold: float | None = None,
    detector: str = DEFAULT_DETECTOR,
    cache_dir: str | os.PathLike[str] | None = None,
    image: np.ndarray | None = None,
) -> list[Face]:
    """:func:`detect_faces` on an image file, with results cached on disk.

    The cache entry is keyed by the SHA-1 of the file's bytes (so renamed or copied files hit, edited ones miss)
    and by the detector name, its version and the settings. Entries are small JSON files written atomically, so
    parallel workers can share a cache.

    Args:
        path: image file.
        cache_dir: default :func:`detection_cache_dir`.
        image: the already-decoded RGB pixels of ``path``, to skip decoding it again on a miss.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError("file not found", path=path)
    det = get_detector(detector)
    thr = det.default_threshold if threshold is None else float(threshold)
    digest = _sha1(path)
    settings = f"{det.name}-{det.version}-min{int(min_face_size)}-thr{thr:g}"
    root = Path(cache_dir) if cache_dir is not None else detection_cache_dir()
    entry = root / settings / digest[:2] / f"{digest}.json"
    if entry.is_file():
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
            return [
                Face(box=np.asarray(f["box"], dtype=np.float64),
                     landmarks=np.asarray(f["landmarks"], dtype=np.float64), score=float(f["score"]))
                for f in data["faces"]
            ]
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a corrupt detection cache entry %s", entry)
    rgb = load_rgb(path) if image is None else image
    faces = detect_faces(rgb, min_face_size=min_face_size, threshold=thr, detector=detector)
    entry.parent.mkdir(parents=True, exist_ok=True)
    payload = {"sha1": digest, "settings": settings, "shape": list(np.shape(rgb)[:2]),
               "faces": [_face_json(f) for f in faces]}
    fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, entry)
    return faces


def _face_json(face: Face) -> dict:
    # full precision (Face.to_dict rounds for display): a cache hit must equal a fresh detection
    return {"box": [float(v) for v in face.box], "landmarks": np.asarray(face.landmarks, dtype=np.float64).tolist(),
            "score": float(face.score)}
