"""The evaluation's caches, keyed by file content: face detections and judges' embeddings (one small file each,
written atomically), so an interrupted run resumes and a larger ``limit`` only adds the new faces."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fluxguard.errors import FluxguardError
from fluxguard.eval.files import read_rgb, safe_name, sha1_file, write_atomic, write_json
from fluxguard.eval.protocol import Detector
from fluxguard.faces.types import Face

log = logging.getLogger(__name__)


def face_json(face: Face) -> dict:
    return {"box": [float(v) for v in face.box], "landmarks": np.asarray(face.landmarks, float).tolist(),
            "score": float(face.score)}


def face_from(d: Mapping[str, Any]) -> Face:
    return Face(box=np.asarray(d["box"], dtype=np.float64), landmarks=np.asarray(d["landmarks"], dtype=np.float64),
                score=float(d.get("score", 1.0)))


def detector_tag(detector: Detector | None) -> str:
    """Names the detector (and its version) whose detections a cache holds."""
    if detector is not None:
        return "custom-" + safe_name(getattr(detector, "tag", type(detector).__name__))
    try:
        from fluxguard.faces.detect import get_detector
    except ImportError:
        return "no-detector"
    d = get_detector()
    return f"{d.name}-v{d.version}"


class FaceCache:
    """Detections of images by content: original files (the detector's own disk cache when it has one) and
    derived images (protected, transformed, purified) under ``root``."""

    def __init__(self, root: Path, detector: Detector | None) -> None:
        self.root = root
        self.detector = detector
        self._mem: dict[str, tuple[list[Face], tuple[int, int]]] = {}

    def _detect(self, rgb: np.ndarray) -> list[Face]:
        if self.detector is not None:
            return list(self.detector(rgb))
        try:
            from fluxguard.faces.detect import detect_faces
        except ImportError as e:  # the detector module is not in this build
            raise FluxguardError("no face detector available (fluxguard.faces.detect)") from e
        return detect_faces(rgb)

    def faces(self, key: str, rgb: Callable[[], np.ndarray]) -> tuple[list[Face], tuple[int, int]]:
        """The faces of the image ``key`` (content hash + derivation) and its (H, W); ``rgb`` decodes it on a miss."""
        if key in self._mem:
            return self._mem[key]
        path = self.root / key[:2] / f"{key}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                hit = ([face_from(d) for d in data["faces"]], (int(data["shape"][0]), int(data["shape"][1])))
                self._mem[key] = hit
                return hit
            except (ValueError, KeyError, TypeError, IndexError):
                log.warning("ignoring a corrupt detection entry %s", path)
        img = rgb()
        faces = self._detect(img)
        shape = (int(img.shape[0]), int(img.shape[1]))
        write_json(path, {"shape": list(shape), "faces": [face_json(f) for f in faces]})
        self._mem[key] = (faces, shape)
        return faces, shape

    def file_faces(self, path: Path) -> tuple[list[Face], tuple[int, int]]:
        return self.faces("file-" + sha1_file(path), lambda: read_rgb(path))


class EmbeddingCache:
    """Unit embeddings per (judge's :func:`~fluxguard.eval.zoo.model_tag`, image key); one small .npy each, written
    atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, judge: str, key: str) -> Path:
        return self.root / judge / key[:2] / f"{key}.npy"

    def get(self, judge: str, key: str) -> np.ndarray | None:
        p = self._path(judge, key)
        if p.is_file():
            try:
                return np.load(p)
            except (ValueError, OSError):
                log.warning("ignoring a corrupt embedding %s", p)
        return None

    def put(self, judge: str, key: str, emb: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, emb.astype(np.float32))
        write_atomic(self._path(judge, key), buf.getvalue())
