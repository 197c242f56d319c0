"""The public Python API: protect every face in a photo with one call.

Example:
    >>> import fluxguard
    >>> result = fluxguard.protect("me.jpg", method="pgd")          # doctest: +SKIP
    >>> result.save("me_protected.jpg")                              # doctest: +SKIP
    >>> result.faces[0].similarity["mobilefacenet"]                  # doctest: +SKIP
    {'before': 1.0, 'after': 0.21, 'threshold_far_1e-2': 0.39, 'attacked': True}

A photo goes in, every face is found and aligned, the method changes the aligned crops, and only the change is
pasted back into the full-resolution photo.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxguard.defaults import DEFAULT_METHOD
from fluxguard.errors import ConfigError, NoFaceError
from fluxguard.faces.types import Face
from fluxguard.io import LoadedImage, load_image, save_image

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike[str] | bytes | np.ndarray | LoadedImage
# progress(stage, step, total): "face 1/2: attack", 3, 50
ProgressFn = Callable[[str, int, int], None]




def as_loaded(image: ImageInput, *, max_pixels: int | None = None) -> LoadedImage:
    """Accept a path, bytes, an (H, W, 3) uint8 array or a LoadedImage."""
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ConfigError(f"an image array must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        rgb = np.array(image[..., :3], dtype=np.uint8, order="C")  # a private, writable copy
        return LoadedImage(rgb=rgb, format="PNG", source="<array>")
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    return load_image(image, **kw)


def to_tensor(rgb: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
    arr = np.ascontiguousarray(rgb)
    if not arr.flags.writeable:  # e.g. skimage's cached samples; torch warns on read-only memory
        arr = arr.copy()
    return torch.from_numpy(arr).to(device).permute(2, 0, 1).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (rounded)."""
    return x.detach().clamp(0, 1).mul(255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@lru_cache(maxsize=16)
def _recognizer(name: str, device: str) -> Any:
    from fluxguard.recognition import load_recognizer

    return load_recognizer(name, device=device)


def recognizers(names: Sequence[Any] | None = None, device: str = "cpu") -> list:
    """Loaded FR models (cached per process); ``None`` = every model whose weights ship with fluxguard.

    Entries are model names or already-built :class:`~fluxguard.recognition.base.FaceRecognizer` objects (kept as
    they are: the evaluation passes its own instances, tests pass stand-in models).
    """
    from fluxguard.recognition import shipped_models

    chosen = list(names) if names is not None else shipped_models()
    return [_recognizer(n, str(device)) if isinstance(n, str) else n for n in chosen]


def resolve_device(device: str) -> str:
    """Check a device name (``auto`` picks CUDA, then Apple MPS, then the CPU) before any model is loaded.

    Raises:
        ConfigError: an unknown device name, or a device this machine does not have.
    """
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {device!r} asked for, but Apple MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}; use cpu, cuda, cuda:N, mps or auto")
    return str(dev)


def method_params(method: str, params: dict[str, Any] | None = None, *, model: str | None = None,
                  edit: str | None = None, mode: str = "dodge") -> dict[str, Any]:
    """Check parameters against a method before any model is loaded; map ``model``/``edit`` to its fields.

    Args:
        method: registry name.
        params: method parameters (``--param key=value``).
        model: generator weights (a Hugging Face id or a folder); only for methods with a generator.
        edit: a text edit; only for methods with an ``edit_prompt`` (Flux-Guard).
        mode: ``dodge`` or ``impersonate``.

    Raises:
        ConfigError: an unknown parameter, a flag the method does not support, or an unknown mode; never ignored.
    """
    from fluxguard.methods import METHODS

    cls = METHODS[method]
    if mode not in ("dodge", "impersonate"):
        raise ConfigError(f"unknown mode {mode!r}; use dodge or impersonate")
    out = dict(params or {})
    names = cls.parameter_names()
    if names:
        unknown = sorted(set(out) - set(names))
        if unknown:
            raise ConfigError(f"method {method!r} has no parameter {unknown[0]!r}; valid: {', '.join(names)}")
    if edit is not None:
        if "edit_prompt" not in names:
            raise ConfigError(f"method {method!r} does not support text edits (--edit); use --method fluxguard")
        out["edit_prompt"] = edit
        from fluxguard.generators.lite import is_lite

        if edit and is_lite(model or out.get("model") or "lite"):
            raise ConfigError("the built-in lite models have no text encoders, so --edit needs a FLUX model with "
                              "them: "
                              "add --model black-forest-labs/FLUX.1-dev (or a local FLUX folder)")
    if model is not None:
        if "model" not in names:
            raise ConfigError(f"method {method!r} has no generator, so --model does not apply; it selects the FLUX "
                              "weights of fluxguard or the Stable Diffusion weights of wdp")
        out["model"] = model
    return out


def largest_face(faces: Sequence[Face]) -> Face:
    return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))


@dataclass
class FaceResult:
    """One protected face: where it is, and what FR models say before and after."""

    face: Face
    # model -> {"before", "after", "threshold_far_1e-2", "attacked"}: cosine of the face to the reference identity
    # (the original face itself when dodging, the target when impersonating), before and after protection
    similarity: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    # how visible the change is, measured on the saved 8-bit photo over this face's mask (fluxguard.eval.quality)
    quality: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.face.to_dict(), "similarity": self.similarity, "quality": self.quality}


@dataclass
class ProtectionResult:
    """What :func:`protect` returns: the protected photo and how it was made."""

    image: np.ndarray  # (H, W, 3) uint8, same size as the input
    original: LoadedImage
    faces: list[FaceResult]
    method: str
    mode: str
    params: dict[str, Any]
    timings: dict[str, float]

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False, quality: int | None = None,
             fmt: str | None = None) -> Path:
        """Write the protected photo (atomic; no EXIF/GPS/XMP; never over the input)."""
        return save_image(path, self.image, like=self.original, fmt=fmt, quality=quality, overwrite=overwrite)

    def to_dict(self) -> dict:
        return {
            "source": self.original.source,
            "method": self.method,
            "mode": self.mode,
            "faces": [f.to_dict() for f in self.faces],
            "params": self.params,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


class Protector:
    """Models loaded once, applied to many photos (the batch CLI, the web UI and the evaluation use this).

    Args:
        method: registry name (``fluxguard.methods.METHODS``).
        mode: ``"dodge"`` or ``"impersonate"``.
        fr_models: the attack ensemble, names or FaceRecognizer objects (default: every shipped FR model).
        judges: FR models that report before/after similarity (default: every shipped FR model; ``[]``: none).
        strength: a preset of the method (``low``/``medium``/``high``); explicit ``params`` override it.
        device: ``"cpu"``, ``"cuda"``, ...
        params: method parameters (see each method's config).
    """

    def __init__(
        self,
        method: str = DEFAULT_METHOD,
        *,
        mode: str = "dodge",
        fr_models: Sequence[Any] | None = None,
        judges: Sequence[Any] | None = None,
        strength: str | None = None,
        device: str = "cpu",
        **params: Any,
    ) -> None:
        from fluxguard.methods import METHODS

        cls = METHODS[method]
        params = method_params(method, params, mode=mode)  # a wrong name fails here, before any model loads
        device = resolve_device(device)
        self.device = device
        self.attackers = recognizers(fr_models, device)
        self.judges = recognizers(judges, device)
        presets: dict[str, dict[str, Any]] = getattr(cls, "presets", {})
        if strength is not None and strength not in presets:
            raise ConfigError(f"method {method!r} has no strength {strength!r}; valid: {', '.join(presets) or 'none'}")
        merged = {**(presets.get(strength, {}) if strength else {}), **params}
        if "device" in cls.parameter_names() and "device" not in merged:
            merged["device"] = device  # the generator runs where the FR models run
        self.method = cls(self.attackers, mode=mode, **merged)
        self.method_name = method
        self.strength = strength

    @property
    def mode(self) -> str:
        return self.method.mode.value

    def params(self) -> dict[str, Any]:
        return {**self.method.params(), "strength": self.strength}

    def _similarities(self, photo: torch.Tensor, landmarks: np.ndarray) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {r.name: r(photo[None], landmarks[None]) for r in self.judges}

    def protect(
        self,
        image: ImageInput,
        *,
        target: ImageInput | None = None,
        seed: int = 0,
        progress: ProgressFn | None = None,
        max_pixels: int | None = None,
        faces: Sequence[Face] | None = None,
        target_face: Face | None = None,
    ) -> ProtectionResult:
        """Protect the faces of ``image`` (every detected face, or only ``faces`` when given).

        Args:
            image: the photo.
            target: photo of the identity to impersonate (impersonation only).
            seed: seeds the method's random choices.
            progress: ``progress(stage, step, total)`` callback.
            max_pixels: refuse larger photos (decompression-bomb guard of :func:`fluxguard.io.load_image`).
            faces: faces already found in ``image`` (e.g. from a detection cache, or a user's choice); skips
                detection and protects only these.
            target_face: the face to use in ``target`` (else the largest one detected there).
        """
        from fluxguard.faces import align_faces, paste_back

        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        loaded = as_loaded(image, max_pixels=max_pixels)
        if faces is None:
            from fluxguard.faces.detect import detect_faces

            faces = detect_faces(loaded.rgb)
        faces = list(faces)
        timings["detect"] = time.perf_counter() - t0
        if not faces:
            raise NoFaceError("no face found in the photo; nothing to protect", path=loaded.source)
        from fluxguard.faces.align import move_to, native_crop_size, window_face, window_size
        from fluxguard.faces.mask import face_mask

        photo = to_tensor(loaded.rgb, self.device)
        # a method without a fixed crop size (pgd) works at each face's own resolution: nothing is lost or invented
        # by resampling between the crop and the photo; one that takes windows gets one where the face fits
        windows = [window_size(f.landmarks) if self.method.window_crops else None for f in faces]
        sizes = [self.method.crop_size or w or native_crop_size(f.landmarks) for f, w in zip(faces, windows,
                                                                                           strict=True)]
        aligned = [align_faces(photo, [f.landmarks], s)[0] for f, s in zip(faces, sizes, strict=True)]
        # the protection mask is built on the aligned crop (FaceMesh expects an upright face), then moved into the
        # window, so it is the same mask in the photo either way
        masks = [face_mask(af.crop)[0] for af in aligned]
        crop_landmarks: list[torch.Tensor | None] = [None] * len(faces)
        for i, (f, w) in enumerate(zip(faces, windows, strict=True)):
            if w is not None:
                win = window_face(photo, f.landmarks, w)
                masks[i] = move_to(masks[i], aligned[i], win).clamp(0, 1)
                aligned[i], crop_landmarks[i] = win, torch.as_tensor(win.crop_landmarks)[None]

        target_crops: dict[int, torch.Tensor] = {}
        target_emb: dict[str, torch.Tensor] | None = None
        if self.method.mode.value == "impersonate":
            if target is None:
                raise ConfigError("impersonation needs a target photo (--target PHOTO)")
            tl = as_loaded(target, max_pixels=max_pixels)
            if target_face is None:
                from fluxguard.faces.detect import detect_faces

                tfaces = detect_faces(tl.rgb)
                if not tfaces:
                    raise NoFaceError("no face found in the target photo", path=tl.source)
                target_face = largest_face(tfaces)
            tface = target_face
            tphoto = to_tensor(tl.rgb, self.device)
            target_crops = {s: align_faces(tphoto, [tface.landmarks], s)[0].crop[None] for s in set(sizes)}
            target_emb = self._similarities(tphoto, tface.landmarks)
        elif target is not None:
            raise ConfigError("a target photo was given but the mode is dodge; use --mode impersonate")

        gen = torch.Generator(device="cpu").manual_seed(seed)
        edited, histories, used_masks = [], [], []
        t1 = time.perf_counter()
        for i, af in enumerate(aligned):
            stage = f"face {i + 1}/{len(aligned)}"
            cb = None if progress is None else (lambda s, k, n, _p=stage: progress(f"{_p}: {s}", k, n))
            res = self.method.protect(af.crop[None], masks=masks[i][None], target=target_crops.get(af.size),
                                      generator=gen, progress=cb, landmarks=crop_landmarks[i])
            edited.append(res.crops[0])
            used_masks.append(res.masks[0] if res.masks is not None else masks[i])
            histories.append(res.history)
        timings["method"] = time.perf_counter() - t1
        out = to_uint8(paste_back(photo, aligned, edited, used_masks))

        t2 = time.perf_counter()
        protected = to_tensor(out, self.device)
        attacked = {r.name for r in self.attackers}
        results = []
        for face, hist in zip(faces, histories, strict=True):
            before = self._similarities(photo, face.landmarks)
            after = self._similarities(protected, face.landmarks)
            ref = target_emb if target_emb is not None else before
            sims: dict[str, dict[str, Any]] = {}
            for r in self.judges:
                th = r.calibrated_spec().thresholds.get("1e-2")
                sims[r.name] = {
                    "before": round(float((before[r.name] * ref[r.name]).sum()), 4),
                    "after": round(float((after[r.name] * ref[r.name]).sum()), 4),
                    "threshold_far_1e-2": th,
                    "attacked": r.name in attacked,
                }
            results.append(FaceResult(face=face, similarity=sims, history=hist))
        from fluxguard.eval.quality import face_quality
        from fluxguard.faces.align import photo_mask

        per_face = [photo_mask(out.shape[:2], [af], [m]).numpy() for af, m in zip(aligned, used_masks, strict=True)]
        union = np.maximum.reduce(per_face)
        for r, m in zip(results, per_face, strict=True):
            r.quality = face_quality(loaded.rgb, out, m, outside=union)
        timings["score"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return ProtectionResult(
            image=out,
            original=loaded,
            faces=results,
            method=self.method_name,
            mode=self.mode,
            params={**self.params(), "seed": seed},
            timings=timings,
        )


def protect(
    image: ImageInput,
    *,
    method: str = DEFAULT_METHOD,
    mode: str = "dodge",
    target: ImageInput | None = None,
    fr_models: Sequence[str] | None = None,
    judges: Sequence[str] | None = None,
    strength: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: ProgressFn | None = None,
    **params: Any,
) -> ProtectionResult:
    """Protect every face in ``image`` with one call (models are cached between calls).

    Args:
        image: a path, encoded bytes, an (H, W, 3) uint8 RGB array or a :class:`~fluxguard.io.LoadedImage`.
        method: ``fluxguard``, ``wdp`` or ``pgd`` (``fluxguard.methods.METHODS``).
        mode: ``dodge`` (FR must not match the person) or ``impersonate`` (match ``target``).
        target: the photo of the identity to impersonate.
        fr_models: the attacked FR models (default: every shipped one).
        judges: the FR models that report similarity before/after (default: every shipped one).
        strength: ``low``, ``medium`` (the method's defaults) or ``high``; ``params`` override it.
        seed: seeds every random choice: the same seed gives the same pixels.
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
        progress: ``progress(stage, step, total)`` callback.
        **params: method parameters (e.g. ``steps=20`` for pgd); an unknown name raises ConfigError.

    Returns:
        The protected image (same size), per-face similarities before/after, the parameters and timings.

    Raises:
        ImageError: the photo cannot be read. NoFaceError: no face found. ConfigError: bad parameters.
    """
    p = Protector(method, mode=mode, fr_models=fr_models, judges=judges, strength=strength, device=device, **params)
    return p.protect(image, target=target, seed=seed, progress=progress)
