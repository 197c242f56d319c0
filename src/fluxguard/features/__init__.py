"""Protected face templates for FR providers: AdvFace (adversarial templates that resist inversion).

>>> from fluxguard.features import AdvFace
>>> protected = AdvFace("mobileface").protect(templates)   # (N, 256) unit templates -> protected ones

Templates here are the FR models' L2-normalised embeddings (see :mod:`fluxguard.features.advface` for why).
:mod:`~fluxguard.features.templates` reads and writes template files; :mod:`~fluxguard.features.evaluate` measures
utility and privacy; :mod:`~fluxguard.features.training` (``scripts/train_advface.py``) trains the shadow decoders
shipped in ``fluxguard/weights/advface`` and the evaluation attackers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxguard.features.advface import AdvFace, AdvFaceConfig, ProtectionResult, gaussian_like
    from fluxguard.features.templates import TemplateSet, extract_templates

_LAZY = {
    "AdvFace": "fluxguard.features.advface",
    "AdvFaceConfig": "fluxguard.features.advface",
    "ProtectionResult": "fluxguard.features.advface",
    "gaussian_like": "fluxguard.features.advface",
    "TemplateSet": "fluxguard.features.templates",
    "extract_templates": "fluxguard.features.templates",
}


def __getattr__(name: str) -> object:
    # lazy: `import fluxguard.features` must not import torch
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fluxguard.features' has no attribute {name!r}")


def shadow_models() -> list[str]:
    """FR models with a shipped AdvFace shadow decoder."""
    from fluxguard.features.decoders import WEIGHTS_DIR

    return sorted(p.name[len("shadow-"):-len(".safetensors")] for p in WEIGHTS_DIR.glob("shadow-*.safetensors"))


__all__ = ["AdvFace", "AdvFaceConfig", "ProtectionResult", "TemplateSet", "extract_templates", "gaussian_like",
           "shadow_models"]
