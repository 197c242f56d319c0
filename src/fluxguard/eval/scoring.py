"""Scoring through saved photos: re-detect the face in a derived image (protected, transformed, purified), embed
it with each judge (cached by content) and take the cosine to a reference embedding.

A face the detector no longer finds is embedded at the original landmarks, so a lost detection never counts as
protection by itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxguard.eval.cache import EmbeddingCache, FaceCache
from fluxguard.eval.files import png_bytes, read_rgb, sha1_file, write_atomic
from fluxguard.eval.protocol import Subject, Target
from fluxguard.eval.purification import Purifier
from fluxguard.eval.zoo import ModelSet
from fluxguard.faces.types import Face


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / area) if area > 0 else 0.0


def match_face(faces: Sequence[Face], box: np.ndarray, src_shape: tuple[int, ...], shape: tuple[int, ...],
               min_iou: float = 0.3) -> Face | None:
    """The face in a (possibly resized or centre-cropped) copy of a photo that is the face at ``box`` of the
    original: best IoU with the box mapped both ways (scaled with the image, or shifted by a centre crop)."""
    if not faces:
        return None
    box = np.asarray(box, dtype=np.float64)
    sh, sw = src_shape[:2]
    h, w = shape[:2]
    scaled = box * np.array([w / sw, h / sh, w / sw, h / sh])
    dx, dy = (sw - w) // 2, (sh - h) // 2
    shifted = box - np.array([dx, dy, dx, dy], dtype=np.float64)
    best, best_iou = None, min_iou
    for f in faces:
        b = np.asarray(f.box, dtype=np.float64)
        iou = max(_iou(b, scaled), _iou(b, shifted))
        if iou >= best_iou:
            best, best_iou = f, iou
    return best


def map_landmarks(lm: np.ndarray, src_shape: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Original landmarks in a resized copy (same size: unchanged)."""
    sh, sw = src_shape[:2]
    h, w = shape[:2]
    return np.asarray(lm, dtype=np.float64) * np.array([w / sw, h / sh])


def lazy(fn: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """Decode (or transform) an image only when a cache misses, and only once."""
    box: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not box:
            box.append(fn())
        return box[0]

    return get


class Scorer:
    """Embeds images with the judges of ``models`` and scores re-detected faces against reference embeddings;
    detections and embeddings go through the caches, purified photos are kept under ``purified``."""

    def __init__(self, models: ModelSet, faces: FaceCache, embs: EmbeddingCache, purified: Path, device: str) -> None:
        self.models = models
        self.faces = faces
        self.embs = embs
        self.purified = purified
        self.device = device

    def embed(self, judge: str, key: str, rgb: Callable[[], np.ndarray], landmarks: np.ndarray) -> np.ndarray:
        tag = self.models.tag(judge)
        cached = self.embs.get(tag, key)
        if cached is not None:
            return cached
        from fluxguard.api import to_tensor

        x = to_tensor(rgb(), self.device)[None]
        with torch.no_grad():
            e = self.models.model(judge)(x, np.asarray(landmarks, dtype=np.float64)[None])[0].float().cpu().numpy()
        self.embs.put(tag, key, e)
        return e

    def embed_file(self, judge: str, path: Path, face: Face) -> np.ndarray:
        return self.embed(judge, "file-" + sha1_file(path), lambda: read_rgb(path), face.landmarks)

    def references(self, subjects: Sequence[Subject], targets: Sequence[Target],
                   impersonate: bool) -> dict[str, dict[str, np.ndarray]]:
        """Per :func:`~fluxguard.eval.protocol.reference_key` the reference embeddings of every judge."""
        judges = self.models.judges
        refs: dict[str, dict[str, np.ndarray]] = {}
        for s in subjects:
            refs[f"ref:{s.identity}"] = {j: self.embed_file(j, s.reference, s.reference_face) for j in judges}
        if impersonate:
            for t in targets:
                refs[f"tgt:{t.index}"] = {j: self.embed_file(j, t.test, t.test_face) for j in judges}
        return refs

    def score_image(self, judges: Iterable[str], key: str, rgb: Callable[[], np.ndarray], src_shape: tuple[int, ...],
                    box: np.ndarray, fallback: np.ndarray, ref: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Re-detect the face at ``box`` in a derived image and score it with each judge against ``ref``.

        A face the detector no longer finds is embedded at the original landmarks (``fallback``, only valid when
        the image kept its size), so a lost detection never counts as protection by itself.
        """
        faces, shape = self.faces.faces(key, rgb)
        face = match_face(faces, box, src_shape, shape)
        lm = face.landmarks if face is not None else map_landmarks(fallback, src_shape, shape)
        out: dict[str, Any] = {"redetected": face is not None}
        ekey = key if face is not None else key + "-fallback"
        for j in judges:
            out[j] = float(np.dot(self.embed(j, ekey, rgb, lm), ref[j]))
        return out

    def score_transforms(self, judges: Sequence[str], sha: str, rgb: Callable[[], np.ndarray],
                         shape: tuple[int, ...], face: Face, ref: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Robustness: :meth:`score_image` after every :data:`~fluxguard.eval.robustness.TRANSFORMS` entry."""
        from fluxguard.eval.robustness import TRANSFORMS

        return {
            name: self.score_image(judges, f"{sha}-{name}", lazy(lambda f=fn, g=rgb: f(g())), shape, face.box,
                                   face.landmarks, ref)
            for name, fn in TRANSFORMS.items()
        }

    def score_purified(self, judges: Sequence[str], path: Path, sha: str, shape: tuple[int, ...], face: Face,
                       ref: Mapping[str, np.ndarray], purifier: Purifier) -> dict[str, Any]:
        """Align the face found in the photo, purify the crop, paste it back, save it, re-detect and score."""
        pkey = f"{sha}-purify-{purifier.tag}"
        ppath = self.purified / pkey[:2] / f"{pkey}.png"
        if not ppath.is_file():
            rgb = read_rgb(path)
            faces, pshape = self.faces.faces("file-" + sha, lambda: rgb)
            found = match_face(faces, face.box, shape, pshape)
            lm = found.landmarks if found is not None else face.landmarks
            write_atomic(ppath, png_bytes(purifier(rgb, lm)))
        return self.score_image(judges, pkey, lazy(lambda: read_rgb(ppath)), shape, face.box, face.landmarks, ref)
