"""The contract every protection method fulfils (one base class, each method a small module).

A method receives aligned portrait crops (see :func:`fluxguard.faces.portrait_template`) and returns protected
crops of the same size; detection, alignment, paste-back and file handling live outside, so every method works on
real photos the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch

from fluxguard.errors import ConfigError
from fluxguard.recognition.base import FaceRecognizer


class Mode(str, Enum):  # noqa: UP042 (str mix-in: Mode("dodge") and plain-string comparisons, Python 3.11)
    """Dodging: no FR model should match the protected face to its person. Impersonation: match a chosen target."""

    DODGE = "dodge"
    IMPERSONATE = "impersonate"


@dataclass
class MethodResult:
    crops: torch.Tensor  # (B, 3, S, S) protected crops in [0, 1]
    history: list[dict[str, float]] = field(default_factory=list)  # per optimisation step: losses, weights
    info: dict[str, Any] = field(default_factory=dict)


# progress(stage, step, total): lets the CLI draw per-stage bars without the library importing rich.
ProgressFn = Callable[[str, int, int], None]


class ProtectionMethod(ABC):
    """Base class. Subclasses set ``name`` and ``crop_size`` and implement :meth:`protect_faces`.

    Class attributes a method may set besides those:

    * ``config_class``: the dataclass of its parameters; :meth:`parameter_names` lists its fields, so callers (the
      CLI, the web UI) can refuse an unknown parameter before any model is loaded.
    * ``presets``: strength name (``low``/``medium``/``high``) -> parameter overrides, applied under explicit
      parameters; ``medium`` is the method's defaults.

    Args:
        recognizers: the attack ensemble (white-box FR models); black-box judges are never passed here.
        mode: dodging or impersonation.
    """

    name: ClassVar[str]
    crop_size: int = 256
    config_class: ClassVar[type | None] = None
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, recognizers: Sequence[FaceRecognizer], *, mode: Mode | str = Mode.DODGE) -> None:
        if not recognizers:
            raise ValueError("a protection method needs at least one FR model to attack")
        self.recognizers = list(recognizers)
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise ConfigError(f"unknown mode {mode!r}; use dodge or impersonate") from None

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The parameters the method accepts (fields of ``config_class``; empty when it declares none)."""
        import dataclasses

        return [f.name for f in dataclasses.fields(cls.config_class)] if cls.config_class is not None else []

    @abstractmethod
    def protect_faces(
        self,
        crops: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
    ) -> MethodResult:
        """Protect (B, 3, S, S) aligned portrait crops in [0, 1] (S = ``self.crop_size``).

        ``target`` is the (1 or B, 3, S, S) aligned portrait crop of the identity to impersonate; required in
        impersonation mode, ignored (must be None) when dodging.
        """

    def params(self) -> dict[str, Any]:
        """The parameters this run used (for reports and the JSON summary)."""
        return {"method": self.name, "mode": self.mode.value, "fr_models": [r.name for r in self.recognizers]}
