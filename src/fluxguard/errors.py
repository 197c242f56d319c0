"""The one error type users see, and its few subclasses.

Every failure a user can cause (a bad file, an unknown model name, no face in a photo) raises a
:class:`FluxguardError` whose message names the thing and the reason. The CLI prints the message without a
traceback and exits non-zero; library callers can catch the subclasses.
"""

from __future__ import annotations

from pathlib import Path


class FluxguardError(Exception):
    """Base class: a message fit to show a user, optionally tied to a file."""

    exit_code: int = 1

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class ImageError(FluxguardError):
    """A file cannot be read or written as an image (missing, not an image, too large, truncated, ...)."""

    exit_code = 2


class NoFaceError(FluxguardError):
    """A photo holds no detectable face."""

    exit_code = 3


class UnknownNameError(FluxguardError, KeyError):
    """A registry lookup (model, method, generator) used a name that does not exist."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class MissingDependencyError(FluxguardError):
    """An optional extra is needed for this feature."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        super().__init__(f"{feature} needs {package}: pip install 'fluxguard[{extra}]'")


class ConfigError(FluxguardError, ValueError):
    """Parameters that do not fit together, or a value out of range."""
