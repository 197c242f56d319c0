"""Cosine thresholds at fixed false-accept rates, and verification quality, from labelled face photos.

Impostor pairs are different identities *within one source repository*: label spaces of different sources are not
reconciled (an anonymous CelebA label can be a named celebrity elsewhere), so cross-source "different person" pairs
may hide same-person pairs. Genuine pairs are all pairs of photos of one identity.

Only identities of one split (:func:`fluxguard.data.split_of`) are used: thresholds come from ``calib``,
verification quality is measured on ``eval``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fluxguard.data import list_photos, photos_in_split
from fluxguard.errors import FluxguardError
from fluxguard.recognition.base import FARS, FaceRecognizer

log = logging.getLogger(__name__)

# A landmark source maps an RGB uint8 photo to the (5, 2) ArcFace landmarks of its main face, or None.
LandmarkFn = Callable[[np.ndarray], "np.ndarray | None"]


@dataclass(frozen=True)
class FaceRecord:
    key: str  # path relative to the data folder
    path: Path
    identity: str
    source: str
    landmarks: np.ndarray  # (5, 2)


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (EXIF orientation applied; errors name the file)."""
    from fluxguard.io import load_image

    return load_image(path).rgb


def main_face(faces: Sequence[object], shape: tuple[int, ...]) -> np.ndarray | None:
    """Landmarks of the largest face whose centre lies inside the image (faces have ``box`` and ``landmarks``)."""
    h, w = shape[:2]
    best, best_area = None, -1.0
    for f in faces:
        box = np.asarray(f.box if hasattr(f, "box") else f["box"], dtype=np.float64)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        area = (box[2] - box[0]) * (box[3] - box[1])
        if 0 <= cx < w and 0 <= cy < h and area > best_area:
            lm = f.landmarks if hasattr(f, "landmarks") else f["landmarks"]
            best, best_area = np.asarray(lm, dtype=np.float64), area
    return best


def detector_landmarks(rgb: np.ndarray) -> np.ndarray | None:
    """The project's detector (:func:`fluxguard.faces.detect.detect_faces`), main face."""
    try:
        from fluxguard.faces.detect import detect_faces
    except ImportError as e:
        raise FluxguardError("no face detector available (fluxguard.faces.detect); pass a landmarks file") from e
    return main_face(detect_faces(rgb), rgb.shape)


def landmarks_from_file(path: str | Path) -> Callable[[str, Path], np.ndarray | None]:
    """Landmarks precomputed into a JSON file: ``{key: [[x, y] x5] | [{"box", "landmarks"}, ...] | null}``.

    For a list of faces the main face is chosen as :func:`main_face` does (the photo is read for its size).
    """
    table = json.loads(Path(path).read_text())

    def lookup(key: str, photo: Path) -> np.ndarray | None:
        v = table.get(key)
        if not v:
            return None
        if isinstance(v[0], dict):
            return main_face(v, read_rgb(photo).shape)
        return np.asarray(v, dtype=np.float64)

    return lookup


def gather_faces(root: str | Path, split: str, landmark_file: str | Path | None = None,
                 detect: LandmarkFn | None = None, cache: Path | None = None) -> list[FaceRecord]:
    """Labelled photos of ``split`` identities with the landmarks of their main face (photos without one dropped).

    Landmarks come from ``landmark_file`` when given, else from ``detect`` (default: the project's detector), cached
    in ``cache`` (JSON keyed by path, size and mtime) so that re-runs do not detect again.
    """
    root = Path(root)
    photos = [p for p in photos_in_split(list_photos(root), split) if p.identity is not None]
    lookup = landmarks_from_file(landmark_file) if landmark_file else None
    store: dict[str, list | None] = {}
    if lookup is None and cache is not None and cache.is_file():
        store = json.loads(cache.read_text())
    detect = detect or detector_landmarks
    out: list[FaceRecord] = []
    dirty = 0
    for ph in photos:
        key = ph.path.relative_to(root).as_posix()
        if lookup is not None:
            lm = lookup(key, ph.path)
        else:
            st = ph.path.stat()
            ck = f"{key}|{st.st_size}|{int(st.st_mtime)}"
            if ck not in store:
                found = detect(read_rgb(ph.path))
                store[ck] = None if found is None else np.round(found, 3).tolist()
                dirty += 1
                if cache is not None and dirty % 50 == 0:
                    _write_json(cache, store)
            lm = None if store[ck] is None else np.asarray(store[ck], dtype=np.float64)
        if lm is not None:
            out.append(FaceRecord(key, ph.path, ph.identity, ph.source, lm))
    if cache is not None and dirty:
        _write_json(cache, store)
    return out


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


def detection_cache_path(root: str | Path, detector: str) -> Path:
    """Per data folder and detector: ``<cache>/detections/<detector>-<sha1(abs path)[:12]>.json``."""
    from fluxguard.recognition.sources import cache_dir

    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "detections" / f"{detector}-{digest}.json"


@torch.no_grad()
def embed_records(model: FaceRecognizer, records: Sequence[FaceRecord], batch: int = 32,
                  images: Callable[[Path], torch.Tensor] | None = None) -> np.ndarray:
    """(N, D) unit embeddings of the records' main faces (crops are cut from the full photos)."""
    load = images or (lambda p: torch.from_numpy(read_rgb(p).copy()).permute(2, 0, 1)[None].float() / 255.0)
    out, crops = [], []
    for i, r in enumerate(records):
        crops.append(model.crop(load(r.path), r.landmarks))
        if len(crops) == batch or i == len(records) - 1:
            e = model.embed_crop(torch.cat(crops))
            out.append(torch.nn.functional.normalize(e.float(), dim=-1).numpy())
            crops = []
    return np.concatenate(out) if out else np.zeros((0, model.spec.embedding_size), np.float32)


def pair_indices(records: Sequence[FaceRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) index pairs, each (K, 2): same identity / different identities of the same source."""
    ident = np.array([r.identity for r in records])
    source = np.array([r.source for r in records])
    i, j = np.triu_indices(len(records), k=1)
    same = ident[i] == ident[j]
    same_src = source[i] == source[j]
    gen = np.stack([i[same], j[same]], 1)
    imp = np.stack([i[~same & same_src], j[~same & same_src]], 1)
    return gen, imp


def scores(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return np.einsum("kd,kd->k", emb[pairs[:, 0]], emb[pairs[:, 1]]) if len(pairs) else np.zeros(0)


def thresholds_at(impostor: np.ndarray, fars: Sequence[str] = FARS) -> dict[str, float]:
    """Cosine thresholds t with at most FAR of the impostor scores strictly above t."""
    s = np.sort(impostor)[::-1]
    out = {}
    for far in fars:
        k = int(np.floor(float(far) * len(s)))
        if k < 1:
            raise FluxguardError(f"{len(s)} impostor pairs are too few for FAR {far}")
        out[far] = float(s[k])  # exactly k scores lie strictly above s[k] when scores are distinct
    return out


def verification(genuine: np.ndarray, impostor: np.ndarray, thresholds: dict[str, float]) -> dict:
    """TAR and realised FAR at each threshold, ROC AUC and d' (mean separation over pooled std)."""
    order = np.argsort(np.concatenate([impostor, genuine]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    auc = (ranks[len(impostor):].sum() - len(genuine) * (len(genuine) + 1) / 2) / (len(genuine) * len(impostor))
    dprime = (genuine.mean() - impostor.mean()) / np.sqrt(0.5 * (genuine.var() + impostor.var()))
    return {
        "tar": {far: float((genuine > t).mean()) for far, t in thresholds.items()},
        "far": {far: float((impostor > t).mean()) for far, t in thresholds.items()},
        "auc": float(auc),
        "dprime": float(dprime),
        "genuine_pairs": int(len(genuine)),
        "impostor_pairs": int(len(impostor)),
    }


def describe_records(records: Sequence[FaceRecord]) -> dict:
    sources: dict[str, int] = {}
    for r in records:
        sources[r.source] = sources.get(r.source, 0) + 1
    return {"photos": len(records), "identities": len({r.identity for r in records}),
            "sources": dict(sorted(sources.items(), key=lambda kv: -kv[1]))}


def calibrate(models: dict[str, FaceRecognizer], records: Sequence[FaceRecord], *, data_note: str = "",
              landmark_source: str = "") -> dict:
    """Thresholds per model from ``records`` (one split), as written to ``thresholds.json``."""
    gen, imp = pair_indices(records)
    table: dict = {"models": {}, "data": {**describe_records(records), "genuine_pairs": int(len(gen)),
                                          "impostor_pairs": int(len(imp)), "note": data_note,
                                          "landmarks": landmark_source, "impostors": "different identities "
                                          "within one source repository", "date": time.strftime("%Y-%m-%d")}}
    for name, model in models.items():
        t0 = time.perf_counter()
        emb = embed_records(model, records)
        g, i = scores(emb, gen), scores(emb, imp)
        th = thresholds_at(i)
        table["models"][name] = {"thresholds": {k: round(v, 6) for k, v in th.items()},
                                 "calib": _rounded(verification(g, i, th))}
        log.info("%s: %s (%.0f s)", name, th, time.perf_counter() - t0)
    return table


def _rounded(d: dict) -> dict:
    return {k: (_rounded(v) if isinstance(v, dict) else round(v, 6) if isinstance(v, float) else v)
            for k, v in d.items()}


def evaluate(models: dict[str, FaceRecognizer], records: Sequence[FaceRecord],
             thresholds: dict[str, dict[str, float]]) -> dict:
    """Verification quality per model on ``records`` at the given (calibrated) thresholds."""
    gen, imp = pair_indices(records)
    out = {"data": {**describe_records(records), "genuine_pairs": int(len(gen)), "impostor_pairs": int(len(imp))},
           "models": {}}
    for name, model in models.items():
        emb = embed_records(model, records)
        out["models"][name] = _rounded(verification(scores(emb, gen), scores(emb, imp), thresholds[name]))
    return out
