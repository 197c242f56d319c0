"""fluxguard: protect faces in photos from unauthorised face recognition.

Nothing heavy is imported here; the public API (``fluxguard.protect`` and friends) loads torch and the models on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fluxguard._version import __version__

if TYPE_CHECKING:
    from fluxguard.api import ProtectionResult, protect

__all__ = ["__version__", "protect", "ProtectionResult"]


def __getattr__(name: str) -> Any:
    if name in ("protect", "ProtectionResult"):
        from fluxguard import api

        return getattr(api, name)
    raise AttributeError(f"module 'fluxguard' has no attribute {name!r}")
