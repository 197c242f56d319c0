"""The contract every face-recognition model of the zoo fulfils.

A recognizer takes a photo (or any crop) plus the five ArcFace landmarks of each face in that image's pixel
coordinates, builds its *own* input crop with a differentiable similarity warp to its own template, normalises
the pixels as its training did, and returns L2-normalised embeddings. One perturbation of the photo therefore
serves every model, each seeing the face the way it was trained to.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fluxguard.errors import FluxguardError
from fluxguard.faces.align import estimate_similarity, warp_affine

FARS = ("1e-1", "1e-2", "1e-3")
THRESHOLDS_FILE = Path(__file__).with_name("thresholds.json")


@dataclass(frozen=True)
class CropSpec:
    """How a model's input crop is cut: ``size`` px square, the five landmarks mapped onto ``template``."""

    size: int
    template: tuple[tuple[float, float], ...]

    def points(self) -> np.ndarray:
        return np.asarray(self.template, dtype=np.float64)


@dataclass(frozen=True)
class RecognizerSpec:
    name: str
    family: str
    embedding_size: int
    input: str  # human-readable: size, colour order, normalisation
    crop: CropSpec
    source: str  # registry package + version + file the weights come from
    source_sha256: str
    license: str
    weights_file: str | None  # file in fluxguard/weights; None when not shipped (converted on the fly)
    notes: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)  # FAR ("1e-1", ...) -> cosine threshold

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "embedding_size": self.embedding_size,
            "input": self.input,
            "crop_size": self.crop.size,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "licence": self.license,
            "shipped": self.weights_file is not None,
            "thresholds": self.thresholds,
            "notes": self.notes,
        }


def load_thresholds(name: str) -> dict[str, float]:
    """Calibrated cosine thresholds of one model (empty when not calibrated yet)."""
    if not THRESHOLDS_FILE.is_file():
        return {}
    table = json.loads(THRESHOLDS_FILE.read_text())
    return {k: float(v) for k, v in table.get("models", {}).get(name, {}).get("thresholds", {}).items()}


class FaceRecognizer(nn.Module, ABC):
    """A frozen FR model in eval mode: ``forward(image, landmarks) -> (B, D)`` unit-norm embeddings."""

    spec: ClassVar[RecognizerSpec]

    def __init__(self) -> None:
        super().__init__()

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def calibrated_spec(cls) -> RecognizerSpec:
        """The spec with the thresholds of ``thresholds.json`` (works on the class: no weights are loaded)."""
        return replace(cls.spec, thresholds=load_thresholds(cls.spec.name) or dict(cls.spec.thresholds))

    def threshold(self, far: str = "1e-2") -> float:
        th = self.calibrated_spec().thresholds
        if far not in th:
            raise KeyError(f"{self.spec.name} has no calibrated threshold at FAR {far}; run `fluxguard calibrate`")
        return th[far]

    def crop(self, image: torch.Tensor, landmarks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """This model's input crop, (B, 3, S, S) in [0, 1], differentiable with respect to ``image``."""
        lm = torch.as_tensor(np.asarray(landmarks) if not torch.is_tensor(landmarks) else landmarks)
        if lm.dim() == 2:
            lm = lm[None]
        if lm.shape[0] == 1 and image.shape[0] > 1:
            lm = lm.expand(image.shape[0], 5, 2)
        m = estimate_similarity(lm.detach().cpu(), self.spec.crop.points())
        s = self.spec.crop.size
        return warp_affine(image, m, (s, s))

    def forward(self, image: torch.Tensor, landmarks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Embed the faces of ``image`` ((B, 3, H, W) RGB in [0, 1]) given their (B, 5, 2) landmarks."""
        return F.normalize(self.embed_crop(self.crop(image, landmarks)).float(), dim=-1)

    @abstractmethod
    def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
        """Raw embeddings of (B, 3, S, S) RGB [0, 1] crops already cut to ``spec.crop`` (normalisation inside)."""

    def freeze(self) -> FaceRecognizer:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def local_weights(cls) -> Path:
        """Where this model's safetensors lives: the shipped file, or (models we do not ship) the user cache."""
        from fluxguard.recognition.sources import WEIGHTS_DIR, cache_dir

        if cls.spec.weights_file is not None:
            return WEIGHTS_DIR / cls.spec.weights_file
        return cache_dir() / "weights" / f"{cls.spec.name}.safetensors"

    @classmethod
    def weights_path(cls, download: bool = True) -> Path:
        """The safetensors file to load; a model we do not ship is converted into the user cache on first use, from
        its registry package (fetched when ``download`` is set)."""
        path = cls.local_weights()
        if path.is_file():
            return path
        if cls.spec.weights_file is not None:
            raise FluxguardError(f"weights of FR model {cls.spec.name!r} are missing (reinstall fluxguard or run "
                                 "scripts/convert_fr_models.py)", path=path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        cls.convert(tmp, download=download)
        tmp.replace(path)
        return path

    @classmethod
    def convert(cls, dest: Path, download: bool = True) -> None:
        """Write this model's safetensors to ``dest`` from its registry package (models not shipped only)."""
        raise FluxguardError(f"FR model {cls.spec.name!r} has no converter")

    @classmethod
    def from_file(cls, path: Path) -> FaceRecognizer:
        """Build the model from a safetensors file written by scripts/convert_fr_models.py (models with weights)."""
        raise FluxguardError(f"FR model {cls.spec.name!r} cannot be loaded from a file", path=path)

    @classmethod
    def load(cls, device: str | torch.device = "cpu", download: bool = True) -> FaceRecognizer:
        """The model with its weights, frozen, in eval mode, on ``device``."""
        return cls.from_file(cls.weights_path(download=download)).freeze().to(device)

    @classmethod
    def is_available(cls) -> bool:
        """Whether the weights are on disk now (shipped, or already converted into the cache)."""
        return cls.local_weights().is_file()
