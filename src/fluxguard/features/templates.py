"""Template files: FR embeddings of the faces in photos, with the model that made them and where they come from.

A ``.npz`` (no pickles) holding ``embeddings`` (N, D) float32 unit rows, one per face, ``sources`` (the photo's file
name), ``face_index`` (rank of the face in its photo by detection score), ``boxes`` and ``landmarks`` (photo
pixels), and the scalars ``model`` (zoo name), ``model_sha256`` (sha256 of the FR weights file),
``fluxguard_version``, ``format`` and ``protection`` (JSON, empty for clean templates). Templates of different FR
models, or of other weights of one model, never mix.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fluxguard.errors import FluxguardError, NoFaceError

log = logging.getLogger(__name__)

FORMAT = "fluxguard-templates/1"


@dataclass(frozen=True)
class TemplateSet:
    """FR templates of faces, tied to the FR model (and weights) that made them."""

    embeddings: np.ndarray  # (N, D) float32
    model: str
    model_sha256: str
    sources: np.ndarray  # (N,) str: photo file name
    face_index: np.ndarray  # (N,) int
    boxes: np.ndarray  # (N, 4)
    landmarks: np.ndarray  # (N, 5, 2)
    fluxguard_version: str = ""
    protection: dict | None = None  # None for clean templates

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def with_protection(self, embeddings: np.ndarray, protection: dict) -> TemplateSet:
        """The same faces with protected embeddings and a record of the protection."""
        if embeddings.shape != self.embeddings.shape:
            raise FluxguardError(f"protected templates {embeddings.shape} do not match {self.embeddings.shape}")
        return replace(self, embeddings=np.asarray(embeddings, np.float32), protection=dict(protection))

    def check_same_model(self, other: TemplateSet) -> None:
        """Raise unless ``other`` was made by the same FR model with the same weights."""
        if other.model != self.model:
            raise FluxguardError(f"templates of FR model {self.model!r} and {other.model!r} cannot be mixed "
                                 "(their embedding spaces are unrelated)")
        if other.model_sha256 != self.model_sha256:
            raise FluxguardError(f"{self.model} templates made with different weights (sha256 "
                                 f"{self.model_sha256[:12]} vs {other.model_sha256[:12]}) cannot be mixed")

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the set to ``path`` (.npz) atomically."""
        from fluxguard.io import write_bytes_atomic

        buf = io.BytesIO()
        np.savez(buf, format=np.str_(FORMAT), model=np.str_(self.model), model_sha256=np.str_(self.model_sha256),
                 fluxguard_version=np.str_(self.fluxguard_version),
                 protection=np.str_(json.dumps(self.protection) if self.protection else ""),
                 embeddings=np.asarray(self.embeddings, np.float32), sources=np.asarray(self.sources, dtype=str),
                 face_index=np.asarray(self.face_index, np.int64), boxes=np.asarray(self.boxes, np.float64),
                 landmarks=np.asarray(self.landmarks, np.float64))
        return write_bytes_atomic(path, buf.getvalue(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> TemplateSet:
        """Read a set written by :meth:`save`.

        Raises:
            FluxguardError: the file is missing or is not a fluxguard template file.
        """
        path = Path(path)
        if not path.is_file():
            raise FluxguardError("template file not found", path=path)
        try:
            with np.load(path, allow_pickle=False) as d:
                if "format" not in d or str(d["format"]) != FORMAT:
                    raise FluxguardError("not a fluxguard template file", path=path)
                prot = str(d["protection"])
                ts = cls(embeddings=d["embeddings"].astype(np.float32), model=str(d["model"]),
                         model_sha256=str(d["model_sha256"]), sources=d["sources"], face_index=d["face_index"],
                         boxes=d["boxes"], landmarks=d["landmarks"], fluxguard_version=str(d["fluxguard_version"]),
                         protection=json.loads(prot) if prot else None)
        except (OSError, ValueError, KeyError) as e:
            raise FluxguardError(f"cannot read template file ({e})", path=path) from None
        if ts.embeddings.ndim != 2 or len(ts.sources) != len(ts.embeddings):
            raise FluxguardError("template file is inconsistent (embeddings and sources differ in length)", path=path)
        return ts


def extract_templates(photos: Sequence[str | Path], model: str, *, all_faces: bool = True,
                      detect: Callable[[np.ndarray], list] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> tuple[TemplateSet, list[str]]:
    """Detect, align and embed the faces of ``photos`` with FR model ``model``.

    Args:
        photos: image files.
        model: FR model name of the zoo.
        all_faces: every face of a photo (by detection score), else only the best one.
        detect: RGB uint8 -> faces with ``box``, ``landmarks``, ``score`` (default: the project's detector).
        progress: called with (done, total) after each photo.

    Returns:
        The template set and the photos where no face was found.

    Raises:
        NoFaceError: no face in any of the photos.
    """
    import torch

    from fluxguard._version import __version__
    from fluxguard.features.decoders import fr_weights_sha256
    from fluxguard.io import load_image
    from fluxguard.recognition import FR_MODELS, load_recognizer

    cls = FR_MODELS[model]
    if detect is None:
        from fluxguard.faces.detect import detect_faces as detect
    fr = load_recognizer(model)
    emb, src, idx, boxes, lms, missed = [], [], [], [], [], []
    for n, p in enumerate(photos):
        img = load_image(p)
        faces = detect(img.rgb)
        if not faces:
            log.warning("%s: no face found", p)
            missed.append(str(p))
        faces = faces if all_faces else faces[:1]
        if faces:
            photo = torch.from_numpy(np.ascontiguousarray(img.rgb).copy()).permute(2, 0, 1)[None].float() / 255.0
            lm = np.stack([np.asarray(f.landmarks, np.float64) for f in faces])
            with torch.no_grad():
                e = fr(photo.expand(len(faces), -1, -1, -1), torch.from_numpy(lm))
            emb.append(e.numpy().astype(np.float32))
            src += [Path(p).name] * len(faces)
            idx += list(range(len(faces)))
            boxes.append(np.stack([np.asarray(f.box, np.float64) for f in faces]))
            lms.append(lm)
        if progress is not None:
            progress(n + 1, len(photos))
    if not emb:
        raise NoFaceError(f"no face found in any of the {len(photos)} photo(s)")
    ts = TemplateSet(embeddings=np.concatenate(emb), model=model, model_sha256=fr_weights_sha256(cls),
                     sources=np.array(src), face_index=np.array(idx), boxes=np.concatenate(boxes),
                     landmarks=np.concatenate(lms), fluxguard_version=__version__)
    return ts, missed
