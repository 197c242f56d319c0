"""The evaluation every protection method is judged by (AMT-GAN protocol, methods.md §1; black-box by default).

Protocol
--------
* Faces: identities of the ``eval`` split (:func:`fluxguard.data.split_of`) with at least two photos, in a fixed
  order (SHA-1 of the name, which mixes the label spaces), so every method sees the same people and ``limit``
  takes a prefix. Thresholds were calibrated on the disjoint ``calib`` split. Per identity: a *source* photo (the
  one protected) and a *different* reference photo of the same person; the first two photos (by file name) in
  which the detector finds a face.
* Dodging: a protected face succeeds for a judge when its cosine to the reference photo is *below* the judge's
  threshold. Impersonation: the source is pushed towards one of the four protocol targets
  (:data:`PROTOCOL_TARGETS`, assigned round-robin); it succeeds when its cosine to the target's *test* photo (a
  different photo than the one the method saw) is *above* the threshold. PSR is reported at FAR 1e-1, 1e-2
  (main) and 1e-3, beside the clean rate (the unprotected source scored the same way).
* Black-box: each judged model ``j`` scores photos protected against the attack zoo minus ``j`` (minus every zoo
  model of ``j``'s family), rotating through every model of the zoo. A judge outside the zoo (a model we do not
  ship, e.g. ``faceplugin-mfn512``) is an extra held-out judge: it scores every rotation that excludes its family.
  White-box numbers (the whole zoo attacked, the judge in it) are an extra, labelled as such.
* Scoring goes through the saved 8-bit PNG: the face is re-detected (the detection overlapping the original box
  best; the original landmarks when it is lost, counted in ``redetect_lost``), embedded by the judge and compared
  with the reference photo's embedding.
* Quality (PSNR, SSIM, MS-SSIM) of the protected photo against the source, on the face box and the whole photo.
* Robustness: every :data:`fluxguard.eval.robustness.TRANSFORMS` entry applied to the saved photo, re-detected and
  re-scored; the PSR kept is PSR after / PSR before.
* Purification: the face re-detected in the protected photo is aligned, purified by an SD-style latent diffusion
  model (:func:`fluxguard.eval.purification.purify`), pasted back and re-scored.

Everything is cached under ``out_dir`` (protected photos, per-item records, detections and embeddings keyed by
file content), so an interrupted run resumes where it stopped and a larger ``limit`` only adds the new faces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxguard.errors import ConfigError, FluxguardError
from fluxguard.faces.types import Face

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------------ small helpers
def _sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _sha1_file(path: Path) -> str:
    return _sha1_bytes(Path(path).read_bytes())


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(_clean_json(obj), indent=1, allow_nan=False).encode())


def _clean_json(obj: Any) -> Any:
    """NaN / inf -> None, numpy scalars -> Python (results.json must be strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _read_rgb(path: Path) -> np.ndarray:
    from fluxguard.io import load_image

    return load_image(path).rgb


def _png_bytes(rgb: np.ndarray) -> bytes:
    from fluxguard.io import encode_image

    return encode_image(rgb, "PNG")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / area) if area > 0 else 0.0


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


def _face_json(face: Face) -> dict:
    return {"box": [float(v) for v in face.box], "landmarks": np.asarray(face.landmarks, float).tolist(),
            "score": float(face.score)}


def _face_from(d: Mapping[str, Any]) -> Face:
    return Face(box=np.asarray(d["box"], dtype=np.float64), landmarks=np.asarray(d["landmarks"], dtype=np.float64),
                score=float(d.get("score", 1.0)))


def model_tag(recognizer: Any) -> str:
    """``name-<hash>`` of what decides a model's embeddings: its crop (size, template), embedding size and weights
    file. Cached embeddings and protected photos are keyed by it, so a re-fitted template or new weights never
    reuse stale work."""
    spec = recognizer.spec
    h = hashlib.sha1(json.dumps([spec.name, spec.crop.size, np.asarray(spec.crop.template, float).round(4).tolist(),
                                 spec.embedding_size, type(recognizer).__qualname__]).encode())
    local = getattr(type(recognizer), "local_weights", None)
    weights = Path(local()) if local is not None else None
    if weights is not None and weights.is_file():
        h.update(_sha1_file(weights).encode())
    return f"{spec.name}-{h.hexdigest()[:8]}"


def family_key(recognizer: Any) -> str:
    """A model's family for leave-one-out: the family name before any parenthesis (two weight sets of one
    architecture and training set are one family, so neither is black-box to the other)."""
    return str(recognizer.spec.family).split(" (")[0].strip() or recognizer.name


# --------------------------------------------------------------------------------------------------- data model
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


@dataclass(frozen=True)
class Zoo:
    """One attack ensemble; ``tag`` names its folder (``full`` or ``minus-<models>``)."""

    models: tuple[str, ...]
    excluded: tuple[str, ...]

    @property
    def tag(self) -> str:
        return "full" if not self.excluded else "minus-" + "+".join(self.excluded)


@dataclass
class JudgePlan:
    name: str
    zoos: list[Zoo]  # black-box rotations this judge scores
    extra: bool  # outside the attack zoo (held out entirely)
    white_box: Zoo | None = None


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


# ------------------------------------------------------------------------------------------------------ caches
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
                hit = ([_face_from(d) for d in data["faces"]], (int(data["shape"][0]), int(data["shape"][1])))
                self._mem[key] = hit
                return hit
            except (ValueError, KeyError, TypeError, IndexError):
                log.warning("ignoring a corrupt detection entry %s", path)
        img = rgb()
        faces = self._detect(img)
        shape = (int(img.shape[0]), int(img.shape[1]))
        _write_json(path, {"shape": list(shape), "faces": [_face_json(f) for f in faces]})
        self._mem[key] = (faces, shape)
        return faces, shape

    def file_faces(self, path: Path) -> tuple[list[Face], tuple[int, int]]:
        return self.faces("file-" + _sha1_file(path), lambda: _read_rgb(path))


class EmbeddingCache:
    """Unit embeddings per (judge's :func:`model_tag`, image key); one small .npy each, written atomically."""

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
        import io

        buf = io.BytesIO()
        np.save(buf, emb.astype(np.float32))
        _write_atomic(self._path(judge, key), buf.getvalue())


# ----------------------------------------------------------------------------------------------------- runner
class Evaluation:
    """Runs the protocol of the module docstring; :func:`evaluate` is the one-call entry point."""

    def __init__(
        self,
        config: EvalConfig,
        *,
        judges: Sequence[str] | None = None,
        attack_models: Sequence[str] | None = None,
        models: Mapping[str, Any] | None = None,
        detector: Detector | None = None,
        targets: Sequence[tuple[str, str]] = PROTOCOL_TARGETS,
        progress: ProgressFn | None = None,
    ) -> None:
        self.cfg = config
        self.out = Path(config.out_dir)
        self.data = Path(config.data_dir)
        if not self.data.is_dir():
            raise FluxguardError("data folder not found", path=self.data)
        for m in config.modes:
            if m not in MODES:
                raise ConfigError(f"mode must be dodge, impersonate or both, got {m!r}")
        self.progress = progress or (lambda s, k, n: None)
        self.target_paths = list(targets)
        # detections (and the embeddings cut at them) depend on the detector: one cache per detector version
        cache = self.out / "cache" / _detector_tag(detector)
        self.faces = FaceCache(cache / "faces", detector)
        self.embs = EmbeddingCache(cache / "embeddings")
        self.notes: list[str] = []
        self._models: dict[str, Any] = {}
        self._tags: dict[str, str] = {}
        self._model_source = models
        self.attack_models = list(attack_models) if attack_models is not None else self._default_attack_models()
        judge_names = list(judges) if judges is not None else self._default_judges()
        for name in dict.fromkeys([*self.attack_models, *judge_names]):
            self._load(name, required=name in self.attack_models or judges is not None)
        self.judges = [j for j in judge_names if j in self._models]
        self.plans = self._plan()

    # ---- models
    def _default_attack_models(self) -> list[str]:
        if self._model_source is not None:
            return list(self._model_source)
        from fluxguard.recognition import shipped_models

        return shipped_models()

    def _default_judges(self) -> list[str]:
        if self._model_source is not None:
            return list(self._model_source)
        from fluxguard.recognition import available_models

        return list(dict.fromkeys([*self.attack_models, *available_models()]))

    def _load(self, name: str, required: bool) -> None:
        try:
            if self._model_source is not None:
                if name not in self._model_source:
                    raise ConfigError(f"FR model {name!r} is not among the given models {list(self._model_source)}")
                self._models[name] = self._model_source[name]
            else:
                from fluxguard.api import recognizers

                self._models[name] = recognizers([name], self.cfg.device)[0]
        except FluxguardError as e:
            if required:
                raise
            self.notes.append(f"judge {name} skipped: {e}")

    def model(self, name: str) -> Any:
        return self._models[name]

    def tag(self, name: str) -> str:
        if name not in self._tags:
            self._tags[name] = model_tag(self.model(name))
        return self._tags[name]

    def thresholds(self, name: str) -> dict[str, float]:
        return dict(self.model(name).calibrated_spec().thresholds)

    def _plan(self) -> dict[str, JudgePlan]:
        """Which attack zoo(s) each judge scores: the zoo minus the judge's family (black-box)."""
        fam = {n: family_key(self.model(n)) for n in self._models}
        plans: dict[str, JudgePlan] = {}
        rotations: dict[str, Zoo] = {}
        for m in self.attack_models:  # one rotation per attack model's family
            excluded = tuple(a for a in self.attack_models if fam[a] == fam[m])
            models = tuple(a for a in self.attack_models if a not in excluded)
            if not models:
                raise ConfigError(f"no model left to attack once {m!r} (and its family) is held out")
            rotations.setdefault(fam[m], Zoo(models, excluded))
        full = Zoo(tuple(self.attack_models), ())
        for j in self.judges:
            if fam[j] in rotations:
                zoos = [rotations[fam[j]]]
                extra = j not in self.attack_models
            else:
                zoos = list(rotations.values())
                extra = True
            wb = full if (self.cfg.white_box and j in self.attack_models) else None
            plans[j] = JudgePlan(j, zoos, extra, wb)
        return plans

    def zoos(self) -> list[Zoo]:
        """Every attack zoo a protected photo is needed for (black-box rotations first, then the full zoo)."""
        out: dict[str, Zoo] = {}
        for p in self.plans.values():
            for z in p.zoos:
                out.setdefault(z.tag, z)
        for p in self.plans.values():
            if p.white_box is not None:
                out.setdefault(p.white_box.tag, p.white_box)
        return list(out.values())

    def judges_of(self, zoo: Zoo) -> list[tuple[str, bool]]:
        """(judge, white_box) pairs that score photos protected against ``zoo``."""
        out = [(j, False) for j, p in self.plans.items() if any(z.tag == zoo.tag for z in p.zoos)]
        out += [(j, True) for j, p in self.plans.items() if p.white_box is not None and p.white_box.tag == zoo.tag]
        return out

    # ---- data
    def subjects(self) -> list[Subject]:
        """The evaluated identities in protocol order, up to ``limit`` with two usable photos."""
        from fluxguard.data import identity_groups, list_photos, photos_in_split

        groups = identity_groups(photos_in_split(list_photos(self.data), "eval"), min_photos=2)
        order = sorted(groups, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
        out: list[Subject] = []
        limit = self.cfg.limit
        for name in order:
            if limit is not None and len(out) >= limit:
                break
            found: list[tuple[Path, Face]] = []
            for ph in groups[name]:
                face = main_face(*self.faces.file_faces(ph.path))
                if face is not None:
                    found.append((ph.path, face))
                if len(found) == 2:
                    break
            if len(found) < 2:
                self.notes.append(f"identity {name} skipped: a face in fewer than two photos")
                continue
            out.append(Subject(name, found[0][0], found[1][0], found[0][1], found[1][1], len(out)))
        if not out:
            raise FluxguardError("no eval-split identity with two photos showing a face", path=self.data)
        return out

    def targets(self) -> list[Target]:
        out = []
        for i, (photo, test) in enumerate(self.target_paths):
            pp, tp = self.data / photo, self.data / test
            for p in (pp, tp):
                if not p.is_file():
                    raise FluxguardError("impersonation target photo missing (see ../shared/faces/README.md)",
                                         path=p)
            fp = main_face(*self.faces.file_faces(pp))
            ft = main_face(*self.faces.file_faces(tp))
            if fp is None or ft is None:
                raise FluxguardError("no face found in a target photo", path=pp if fp is None else tp)
            out.append(Target(i, pp, tp, fp, ft))
        if not out:
            raise ConfigError("impersonation needs at least one target pair")
        return out

    # ---- embeddings
    def embed(self, judge: str, key: str, rgb: Callable[[], np.ndarray], landmarks: np.ndarray) -> np.ndarray:
        cached = self.embs.get(self.tag(judge), key)
        if cached is not None:
            return cached
        from fluxguard.api import to_tensor

        x = to_tensor(rgb(), self.cfg.device)[None]
        with torch.no_grad():
            e = self.model(judge)(x, np.asarray(landmarks, dtype=np.float64)[None])[0].float().cpu().numpy()
        self.embs.put(self.tag(judge), key, e)
        return e

    def embed_file(self, judge: str, path: Path, face: Face) -> np.ndarray:
        return self.embed(judge, "file-" + _sha1_file(path), lambda: _read_rgb(path), face.landmarks)

    def score_image(self, judges: Iterable[str], key: str, rgb: Callable[[], np.ndarray], src_shape: tuple[int, ...],
                    box: np.ndarray, fallback: np.ndarray, ref: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Re-detect the face at ``box`` in a derived image and score it with each judge against ``ref``.

        A face the detector no longer finds is embedded at the original landmarks (``fallback``, only valid when
        the image kept its size), so a lost detection never counts as protection by itself.
        """
        faces, shape = self.faces.faces(key, rgb)
        face = match_face(faces, box, src_shape, shape)
        lm = face.landmarks if face is not None else _map_landmarks(fallback, src_shape, shape)
        out: dict[str, Any] = {"redetected": face is not None}
        ekey = key if face is not None else key + "-fallback"
        for j in judges:
            out[j] = float(np.dot(self.embed(j, ekey, rgb, lm), ref[j]))
        return out

    # ---- protection
    def item_dir(self, mode: str, zoo: Zoo) -> Path:
        return self.out / "items" / mode / zoo.tag

    def protect_all(self, subjects: Sequence[Subject], targets: Sequence[Target]) -> None:
        """Protect every (mode, zoo, subject) not done yet; one method instance alive at a time."""
        from fluxguard.api import Protector
        from fluxguard.eval.quality import quality_report
        from fluxguard.io import load_image

        work = [(m, z) for m in self.cfg.modes for z in self.zoos()]
        total = len(work) * len(subjects)
        done = 0
        for mode, zoo in work:
            protector = None
            folder = self.item_dir(mode, zoo)
            for s in subjects:
                done += 1
                meta_p, png_p = folder / f"{_safe(s.identity)}.json", folder / f"{_safe(s.identity)}.png"
                if meta_p.is_file() and png_p.is_file():
                    continue
                if protector is None:
                    protector = Protector(
                        self.cfg.method, mode=mode, fr_models=[self.model(n) for n in zoo.models], judges=[],
                        strength=self.cfg.strength, device=self.cfg.device, **self.cfg.params,
                    )
                self.progress(f"protect {mode} {zoo.tag}: {s.identity}", done, total)
                source = load_image(s.source)
                tgt = targets[s.index % len(targets)] if mode == "impersonate" else None
                t0 = time.perf_counter()
                res = protector.protect(
                    source, target=None if tgt is None else load_image(tgt.photo), seed=self.cfg.seed,
                    faces=[s.source_face], target_face=None if tgt is None else tgt.face,
                )
                seconds = time.perf_counter() - t0
                png = _png_bytes(res.image)
                _write_atomic(png_p, png)
                q = quality_report(source.rgb, res.image, box=s.source_face.box)
                meta = {
                    "identity": s.identity, "mode": mode, "zoo": list(zoo.models), "zoo_tag": zoo.tag,
                    "source": self._rel(s.source), "reference": self._rel(s.reference),
                    "target": None if tgt is None else {"index": tgt.index, "photo": self._rel(tgt.photo),
                                                        "test": self._rel(tgt.test)},
                    "face": _face_json(s.source_face), "png_sha1": _sha1_bytes(png), "quality": q,
                    "seconds": {"method": res.timings.get("method", seconds), "total": seconds},
                    "method_params": protector.params(), "final_loss": (res.faces[0].history or [{}])[-1].get("loss"),
                }
                _write_json(meta_p, meta)
                log.info("protected %s (%s, %s) in %.1fs", s.identity, mode, zoo.tag, seconds)
            del protector

    def _rel(self, p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(self.data.resolve()))
        except ValueError:
            return str(p)

    # ---- scoring
    def references(self, subjects: Sequence[Subject], targets: Sequence[Target]) -> dict[str, dict[str, np.ndarray]]:
        """Per (kind, key) the reference embeddings per judge: ``ref:<identity>`` and ``tgt:<index>``."""
        refs: dict[str, dict[str, np.ndarray]] = {}
        for s in subjects:
            refs[f"ref:{s.identity}"] = {j: self.embed_file(j, s.reference, s.reference_face) for j in self.judges}
        if "impersonate" in self.cfg.modes:
            for t in targets:
                refs[f"tgt:{t.index}"] = {j: self.embed_file(j, t.test, t.test_face) for j in self.judges}
        return refs

    def ref_key(self, mode: str, s: Subject, targets: Sequence[Target]) -> str:
        return f"ref:{s.identity}" if mode == "dodge" else f"tgt:{targets[s.index % len(targets)].index}"

    def score_clean(self, subjects: Sequence[Subject], targets: Sequence[Target],
                    refs: Mapping[str, Mapping[str, np.ndarray]], purifier: Any) -> dict[str, dict[str, Any]]:
        """Cosines of the unprotected sources (as they are, transformed, purified) to every reference."""
        from fluxguard.eval.robustness import TRANSFORMS

        out: dict[str, dict[str, Any]] = {}
        for k, s in enumerate(subjects):
            self.progress(f"score clean: {s.identity}", k + 1, len(subjects))
            sha = _sha1_file(s.source)
            shape = self.faces.file_faces(s.source)[1]
            rec: dict[str, Any] = {}
            for mode in self.cfg.modes:
                ref = refs[self.ref_key(mode, s, targets)]
                r: dict[str, Any] = {"plain": {j: float(np.dot(self.embed_file(j, s.source, s.source_face), ref[j]))
                                               for j in self.judges}}
                if self.cfg.robustness:
                    src = _lazy(lambda p=s.source: _read_rgb(p))
                    r["transforms"] = {
                        name: self.score_image(self.judges, f"{sha}-{name}", _lazy(lambda f=fn, g=src: f(g())), shape,
                                               s.source_face.box, s.source_face.landmarks, ref)
                        for name, fn in TRANSFORMS.items()
                    }
                if purifier is not None:
                    r["purified"] = self._score_purified(self.judges, s.source, sha, shape, s.source_face, ref,
                                                         purifier)
                rec[mode] = r
            out[s.identity] = rec
        return out

    def score_protected(self, subjects: Sequence[Subject], targets: Sequence[Target],
                        refs: Mapping[str, Mapping[str, np.ndarray]], purifier: Any) -> list[dict[str, Any]]:
        from fluxguard.eval.robustness import TRANSFORMS

        items = []
        work = [(m, z) for m in self.cfg.modes for z in self.zoos()]
        total, done = len(work) * len(subjects), 0
        for mode, zoo in work:
            judges = self.judges_of(zoo)
            names = [j for j, _ in judges]
            for s in subjects:
                done += 1
                folder = self.item_dir(mode, zoo)
                meta = json.loads((folder / f"{_safe(s.identity)}.json").read_text())
                png = folder / f"{_safe(s.identity)}.png"
                sha = meta["png_sha1"]
                self.progress(f"score {mode} {zoo.tag}: {s.identity}", done, total)
                ref = refs[self.ref_key(mode, s, targets)]
                shape = self.faces.file_faces(s.source)[1]
                box, lm = s.source_face.box, s.source_face.landmarks
                prot = _lazy(lambda p=png: _read_rgb(p))
                scores: dict[str, Any] = {"protected": self.score_image(names, "file-" + sha, prot, shape, box, lm,
                                                                        ref)}
                if self.cfg.robustness:
                    scores["transforms"] = {
                        name: self.score_image(names, f"{sha}-{name}", _lazy(lambda f=fn, g=prot: f(g())), shape,
                                               box, lm, ref)
                        for name, fn in TRANSFORMS.items()
                    }
                if purifier is not None:
                    scores["purified"] = self._score_purified(names, png, sha, shape, s.source_face, ref, purifier)
                items.append({**meta, "judges": {j: {"white_box": wb} for j, wb in judges}, "scores": scores})
        return items

    def _score_purified(self, judges: Sequence[str], path: Path, sha: str, shape: tuple[int, ...], face: Face,
                        ref: Mapping[str, np.ndarray], purifier: Purifier) -> dict[str, Any]:
        """Align the face found in the photo, purify the crop, paste it back, save it, re-detect and score."""
        pkey = f"{sha}-purify-{purifier.tag}"
        ppath = self.out / "cache" / "purified" / pkey[:2] / f"{pkey}.png"
        if not ppath.is_file():
            rgb = _read_rgb(path)
            faces, pshape = self.faces.faces("file-" + sha, lambda: rgb)
            found = match_face(faces, face.box, shape, pshape)
            lm = found.landmarks if found is not None else face.landmarks
            _write_atomic(ppath, _png_bytes(purifier(rgb, lm)))
        return self.score_image(judges, pkey, _lazy(lambda: _read_rgb(ppath)), shape, face.box, face.landmarks, ref)

    # ---- the whole run
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_run_file()
        subjects = self.subjects()
        targets = self.targets() if "impersonate" in self.cfg.modes else []
        t0 = time.perf_counter()
        self.protect_all(subjects, targets)
        purifier = make_purifier(self.cfg.purification, self.cfg.seed, self.cfg.device, self.notes)
        refs = self.references(subjects, targets)
        clean = self.score_clean(subjects, targets, refs, purifier)
        items = self.score_protected(subjects, targets, refs, purifier)
        results = summarise(self, subjects, targets, clean, items, purifier)
        results["wall_seconds_this_run"] = round(time.perf_counter() - t0, 1)
        return results

    def _run_fingerprint(self) -> dict[str, Any]:
        return {"method": self.cfg.method, "params": self.cfg.params, "strength": self.cfg.strength,
                "seed": self.cfg.seed, "attack_models": [self.tag(m) for m in self.attack_models],
                "targets": self.target_paths,
                "schema": SCHEMA}

    def _check_run_file(self) -> None:
        """A resumed run must use the settings that made the cached photos."""
        p = self.out / "run.json"
        fp = _clean_json(json.loads(json.dumps(self._run_fingerprint(), default=str)))
        if p.is_file():
            old = json.loads(p.read_text())
            if old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise ConfigError(f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                                  "use another --out or delete it")
        else:
            _write_json(p, fp)


def _detector_tag(detector: Detector | None) -> str:
    if detector is not None:
        return "custom-" + _safe(getattr(detector, "tag", type(detector).__name__))
    try:
        from fluxguard.faces.detect import get_detector
    except ImportError:
        return "no-detector"
    d = get_detector()
    return f"{d.name}-v{d.version}"


def _lazy(fn: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """Decode (or transform) an image only when a cache misses, and only once."""
    box: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not box:
            box.append(fn())
        return box[0]

    return get


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _map_landmarks(lm: np.ndarray, src_shape: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Original landmarks in a resized copy (same size: unchanged)."""
    sh, sw = src_shape[:2]
    h, w = shape[:2]
    return np.asarray(lm, dtype=np.float64) * np.array([w / sw, h / sh])


# ------------------------------------------------------------------------------------------------ purification
@dataclass
class Purifier:
    """Purify the face of a photo: align a ``size`` crop, :func:`~fluxguard.eval.purification.purify` it with an
    SD-style backend, paste the change back."""

    backend: Any
    source: str
    size: int = 256
    strength: float = 0.2
    num_steps: int = 20
    seed: int = 0

    @property
    def tag(self) -> str:
        h = hashlib.sha1(f"{self.source}|{self.size}|{self.strength}|{self.num_steps}|{self.seed}".encode())
        return h.hexdigest()[:12]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.source, "crop": self.size, "strength": self.strength, "num_steps": self.num_steps,
                "seed": self.seed}

    def __call__(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        from fluxguard.api import to_tensor, to_uint8
        from fluxguard.eval.purification import PurificationConfig, purify
        from fluxguard.faces import align_faces, paste_back

        photo = to_tensor(rgb)
        aligned = align_faces(photo, [landmarks], self.size)
        cfg = PurificationConfig(strength=self.strength, num_steps=self.num_steps)
        out = purify(aligned[0].crop[None], self.backend, config=cfg,
                     generator=torch.Generator().manual_seed(self.seed))
        return to_uint8(paste_back(photo, aligned, [out[0]]))


def make_purifier(spec: Any, seed: int, device: str, notes: list[str]) -> Purifier | None:
    """``None``/``"none"``: skip; ``"auto"``: the lite SD model shipped with fluxguard when present; a folder or
    hub id: that SD model; an SDBackend: itself."""
    if spec is None or spec == "none" or spec is False:
        notes.append("purification check skipped (not requested)")
        return None
    from fluxguard.generators.sd import SDBackend, load_backend

    if isinstance(spec, Purifier):
        return spec
    if isinstance(spec, SDBackend):
        return Purifier(spec, spec.source, seed=seed)
    if spec == "auto":
        backend = _lite_sd_backend(notes)
        return None if backend is None else Purifier(backend, backend.source, seed=seed)
    try:
        backend = load_backend(str(spec), device=device)
    except FluxguardError as e:
        notes.append(f"purification check not run: {e}")
        return None
    return Purifier(backend, str(spec), seed=seed)


def _lite_sd_backend(notes: list[str]) -> Any:
    """The lite UNet + VAE shipped with fluxguard as an SDBackend, or None (with a note) when this install has none."""
    try:
        from fluxguard.generators.lite import load_lite_sd

        return load_lite_sd()
    except (ImportError, FluxguardError) as e:
        notes.append(f"purification check not run: no SD-style backend is available here ({e}; SD weights cannot "
                     "be downloaded); pass --purification FOLDER")
    return None


# ------------------------------------------------------------------------------------------------------ summary
def _psr(values: Sequence[float], th: float, mode: str) -> float:
    from fluxguard.eval.psr import psr

    return psr(values, th, mode)


def _mean(values: Iterable[float | None]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _rates(values: Sequence[float], thresholds: Mapping[str, float], mode: str) -> dict[str, float]:
    return {f: _psr(values, thresholds[f], mode) for f in FARS if f in thresholds}


def _block(per_judge: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean PSR over judges at every FAR."""
    return {f: _mean(r.get(f) for r in per_judge.values()) for f in FARS}


class _ModeSummary:
    """The tables of one mode (dodge or impersonate) from the per-item cosines."""

    def __init__(self, ev: Evaluation, mode: str, subjects: Sequence[Subject], clean: Mapping[str, Any],
                 items: Sequence[Mapping[str, Any]], th: Mapping[str, Mapping[str, float]]) -> None:
        self.ev, self.mode, self.subjects, self.clean, self.th = ev, mode, subjects, clean, th
        self.items = [it for it in items if it["mode"] == mode]

    def scored(self, j: str, white: bool) -> list[Mapping[str, Any]]:
        return [it for it in self.items if j in it["judges"] and it["judges"][j]["white_box"] == white]

    def clean_of(self, j: str, kind: str = "plain", sub: str | None = None) -> list[float]:
        out = []
        for s in self.subjects:
            r = self.clean[s.identity][self.mode]
            v = r[kind] if sub is None else r[kind][sub]
            if v.get(j) is not None:
                out.append(v[j])
        return out

    def psr(self) -> dict[str, Any]:
        black, white = {}, {}
        for j, plan in self.ev.plans.items():
            its = self.scored(j, False)
            prot = [it["scores"]["protected"][j] for it in its]
            row = {
                "judge": j, "extra": plan.extra, "zoos": [z.tag for z in plan.zoos], "n": len(prot),
                "psr": _rates(prot, self.th[j], self.mode),
                "clean_psr": _rates(self.clean_of(j), self.th[j], self.mode),
                "mean_cos": _mean(prot), "clean_mean_cos": _mean(self.clean_of(j)), "thresholds": self.th[j],
                "redetect_lost": sum(not it["scores"]["protected"]["redetected"] for it in its),
            }
            black[j] = row
            if plan.white_box is not None:
                wits = self.scored(j, True)
                wprot = [it["scores"]["protected"][j] for it in wits]
                white[j] = {**row, "zoos": [plan.white_box.tag], "n": len(wprot),
                            "psr": _rates(wprot, self.th[j], self.mode), "mean_cos": _mean(wprot), "extra": False,
                            "redetect_lost": sum(not it["scores"]["protected"]["redetected"] for it in wits)}
        zoo_judges = [j for j in black if not black[j]["extra"]]
        return {
            "black_box": black,
            "mean": {"psr": _block({j: r["psr"] for j, r in black.items()}),
                     "clean_psr": _block({j: r["clean_psr"] for j, r in black.items()}), "judges": list(black)},
            "mean_zoo_rotation": {"psr": _block({j: black[j]["psr"] for j in zoo_judges}),
                                  "clean_psr": _block({j: black[j]["clean_psr"] for j in zoo_judges}),
                                  "judges": zoo_judges},
            "white_box": white,
        }

    def derived(self, kind: str, sub: str | None, before: Mapping[str, float]) -> dict[str, Any]:
        """PSR after a transform (``kind="transforms"``, ``sub`` its name) or purification, and the share kept."""
        judges, cleans = {}, {}
        for j in self.ev.plans:
            its = self.scored(j, False)
            vals = [(it["scores"][kind] if sub is None else it["scores"][kind][sub])[j] for it in its]
            judges[j] = _rates(vals, self.th[j], self.mode)
            cleans[j] = _rates(self.clean_of(j, kind, sub), self.th[j], self.mode)
        mean = _block(judges)
        kept = {f: (mean[f] / before[f]) if before.get(f) else float("nan") for f in FARS}
        return {"judges": judges, "mean": mean, "kept": kept, "clean_judges": cleans, "clean_mean": _block(cleans)}

    def quality(self) -> dict[str, Any]:
        bb = [it for it in self.items if any(not v["white_box"] for v in it["judges"].values())]
        return {
            "face": {k: _mean(it["quality"].get(f"face_{k}") for it in bb) for k in ("psnr", "ssim", "ms_ssim")},
            "photo": {k: _mean(it["quality"].get(k) for it in bb) for k in ("psnr", "ssim", "ms_ssim")},
            "n": len(bb),
        }


def summarise(ev: Evaluation, subjects: Sequence[Subject], targets: Sequence[Target],
              clean: Mapping[str, Any], items: Sequence[Mapping[str, Any]], purifier: Purifier | None) -> dict:
    """Aggregate per-item cosines into the tables of results.json."""
    import platform

    th = {j: ev.thresholds(j) for j in ev.judges}
    psr_out: dict[str, Any] = {}
    rob_out: dict[str, Any] = {}
    pur_out: dict[str, Any] = {}
    quality: dict[str, Any] = {}
    for mode in ev.cfg.modes:
        ms = _ModeSummary(ev, mode, subjects, clean, items, th)
        psr_out[mode] = ms.psr()
        before = psr_out[mode]["mean"]["psr"]
        if ev.cfg.robustness:
            from fluxguard.eval.robustness import TRANSFORMS

            rob_out[mode] = {t: ms.derived("transforms", t, before) for t in TRANSFORMS}
        if purifier is not None:
            pur_out[mode] = ms.derived("purified", None, before)
        quality[mode] = ms.quality()
    secs = [it["seconds"]["total"] for it in items]
    method_secs = [it["seconds"]["method"] for it in items]
    params = items[0]["method_params"] if items else {**ev.cfg.params}
    return {
        "schema": SCHEMA,
        "method": ev.cfg.method,
        "params": {k: v for k, v in params.items() if k not in ("fr_models", "mode")},
        "strength": ev.cfg.strength,
        "seed": ev.cfg.seed,
        "modes": list(ev.cfg.modes),
        "data_dir": str(ev.data),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": ev.cfg.device,
                        "machine": platform.machine(), "cpus": os.cpu_count()},
        "protocol": {
            "split": "eval",
            "n_identities": len(subjects),
            "identities": [{"identity": s.identity, "source": ev._rel(s.source), "reference": ev._rel(s.reference)}
                           for s in subjects],
            "targets": [{"index": t.index, "photo": ev._rel(t.photo), "test": ev._rel(t.test)} for t in targets],
            "attack_models": ev.attack_models,
            "judges": {j: {"zoos": [list(z.models) for z in p.zoos], "extra": p.extra,
                           "family": family_key(ev.model(j)), "thresholds": th[j]} for j, p in ev.plans.items()},
            "fars": list(FARS),
            "main_far": MAIN_FAR,
            "scoring": "saved 8-bit PNG, face re-detected (best IoU with the original box; original landmarks when "
                       "lost), cosine to the reference photo's embedding",
        },
        "psr": psr_out,
        "robustness": rob_out or None,
        "purification": ({"config": purifier.describe(), **pur_out} if purifier is not None else None),
        "quality": quality,
        "timing": {"seconds_per_face": _mean(secs), "method_seconds_per_face": _mean(method_secs),
                   "median_seconds_per_face": float(np.median(secs)) if secs else float("nan"), "n": len(secs),
                   "total_protect_seconds": float(np.sum(secs)) if secs else 0.0},
        "items": [{k: it[k] for k in ("identity", "mode", "zoo_tag", "source", "reference", "target", "quality",
                                      "seconds", "judges", "scores", "face")} for it in items],
        "clean": clean,
        "notes": ev.notes,
    }



# ---------------------------------------------------------------------------------------------------- entry point
def evaluate(
    method: str,
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "both",
    seed: int = 0,
    limit: int | None = None,
    judges: Sequence[str] | None = None,
    robustness: bool = True,
    purification: Any = "auto",
    white_box: bool = False,
    strength: str | None = None,
    device: str = "cpu",
    attack_models: Sequence[str] | None = None,
    models: Mapping[str, Any] | None = None,
    detector: Detector | None = None,
    targets: Sequence[tuple[str, str]] = PROTOCOL_TARGETS,
    progress: ProgressFn | None = None,
    write_report: bool = True,
    **params: Any,
) -> dict[str, Any]:
    """Evaluate a protection method on the eval identities of a face folder; see the module docstring.

    Args:
        method: a name in :data:`fluxguard.methods.METHODS`.
        data_dir: a folder laid out like ``../shared/faces`` (identities/, portraits/, MANIFEST.tsv).
        out_dir: results and caches (re-running with the same settings resumes).
        mode: ``"dodge"``, ``"impersonate"`` or ``"both"``.
        seed: seeds the method (every face uses it).
        limit: number of identities (protocol order); None = all.
        judges: FR models that score (default: every available model; shipped ones rotate out of the attack zoo).
        robustness: re-score after every :data:`~fluxguard.eval.robustness.TRANSFORMS` entry.
        purification: ``"auto"`` (the lite SD model when shipped), an SD folder / hub id, an SDBackend, or None.
        white_box: also attack with the whole zoo and score the attacked models (a labelled extra).
        strength: the method's preset.
        device: torch device of the method and the judges.
        attack_models: the attack zoo (default: every shipped FR model).
        models: name -> FaceRecognizer to use instead of loading (tests, custom zoos).
        detector: RGB -> faces (default: :func:`fluxguard.faces.detect.detect_faces`).
        targets: impersonation (target photo, test photo) pairs relative to ``data_dir``.
        progress: ``progress(stage, done, total)``.
        write_report: write results.json, results.md and report.html into ``out_dir`` (else only return them).
        **params: method parameters.

    Returns:
        The results dictionary (written to ``out_dir/results.json`` when ``write_report``).
    """
    modes = MODES if mode == "both" else (mode,)
    cfg = EvalConfig(method=method, data_dir=Path(data_dir), out_dir=Path(out_dir), modes=tuple(modes), seed=seed,
                     limit=limit, robustness=robustness, purification=purification, white_box=white_box,
                     strength=strength, device=device, params=dict(params))
    ev = Evaluation(cfg, judges=judges, attack_models=attack_models, models=models, detector=detector,
                    targets=targets, progress=progress)
    results = ev.run()
    if write_report:
        from fluxguard.eval.report import write_reports

        write_reports(results, cfg.out_dir)
    return results
