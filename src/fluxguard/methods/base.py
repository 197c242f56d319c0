"""The contract every protection method fulfils (one base class, each method a small module).

A method receives aligned portrait crops (see :func:`fluxguard.faces.portrait_template`) with their face masks and
returns protected crops of the same size; detection, alignment, paste-back and file handling live outside, so every
method works on real photos the same way.

Natural by construction: :meth:`ProtectionMethod.protect` (what callers use) composes every method's output as the
original plus a change confined to the face mask, bounded per pixel by the visibility budget (a multiple of each
pixel's JND), without a colour cast, and scaled down until the budget's CIEDE2000 and visible-share caps hold
(:func:`fluxguard.losses.visibility.project_to_budget`). Methods optimise the same shaped change
(:meth:`ProtectionMethod.change_bound`, :func:`fluxguard.losses.visibility.shape_residual`), so the projection
rarely has to cut.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch

from fluxguard.errors import ConfigError
from fluxguard.losses.visibility import VisibilityBudget, calibrated_bound, get_budget, project_to_budget
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
    masks: torch.Tensor | None = None  # (B, 1, S, S) where the crops may differ from the input (face + edit regions)
    # (B, 3, S, S) the crops without the protection: the input, or the input plus a text edit's change; the
    # visibility budget bounds what the protection adds to it
    reference: torch.Tensor | None = None


# progress(stage, step, total): lets the CLI draw per-stage bars without the library importing rich.
ProgressFn = Callable[[str, int, int], None]

# Parameters every method takes besides its config's fields.
COMMON_PARAMETERS = ("budget",)


class ProtectionMethod(ABC):
    """Base class. Subclasses set ``name``, ``config_class`` and ``presets`` and implement :meth:`protect_faces`.

    The base class does the shared work: it builds ``self.config`` from ``config_class`` with keyword overrides
    (an unknown name is a :class:`~fluxguard.errors.ConfigError`, never ignored; ``validate()`` runs when the config
    has one), checks the mode and the target, and projects every output onto the visibility budget.

    * ``config_class``: the dataclass of the method's parameters; :meth:`parameter_names` lists its fields and
      :data:`COMMON_PARAMETERS`, so callers (the CLI, the web UI) refuse an unknown parameter before loading models.
    * ``presets``: strength name (``low``/``medium``/``high``) -> parameter overrides, applied under explicit
      parameters. Every preset names its visibility budget (:data:`fluxguard.losses.visibility.BUDGETS`), the same
      for every method; ``medium`` is the default.

    Args:
        recognizers: the attack ensemble (white-box FR models); black-box judges are never passed here.
        mode: dodging or impersonation.
        budget: visibility budget: a name, the object or its fields (default ``medium``).
        config: a ``config_class`` instance (default: its defaults); ``overrides`` are applied on top.
    """

    name: ClassVar[str]
    crop_size: int | None = 256
    # False: crops are aligned portrait crops (rotated and scaled to the template, what generators need). True: each
    # crop is a window of the photo around the face (no resampling on the way in or back; only for crop_size None),
    # and protect() gets the face's landmarks in it
    window_crops: bool = False
    config_class: ClassVar[type | None] = None
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, recognizers: Sequence[FaceRecognizer], *, mode: Mode | str = Mode.DODGE,
                 budget: str | VisibilityBudget | Mapping[str, Any] | None = None, config: Any = None,
                 **overrides: Any) -> None:
        if not recognizers:
            raise ValueError("a protection method needs at least one FR model to attack")
        self.recognizers = list(recognizers)
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise ConfigError(f"unknown mode {mode!r}; use dodge or impersonate") from None
        self.budget = get_budget(budget)
        if self.config_class is not None:
            valid = [f.name for f in dataclasses.fields(self.config_class)]
            unknown = sorted(set(overrides) - set(valid))
            if unknown:
                raise ConfigError(f"{self.name} has no parameter {unknown[0]!r}; valid: "
                                  f"{', '.join([*valid, *COMMON_PARAMETERS])}")
            self.config = dataclasses.replace(config or self.config_class(), **overrides)
            if hasattr(self.config, "validate"):
                self.config.validate()
        elif overrides:
            raise ConfigError(f"{self.name} takes no parameters, got {sorted(overrides)}")

    @classmethod
    def parameter_names(cls) -> list[str]:
        """The parameters the method accepts: fields of ``config_class`` and :data:`COMMON_PARAMETERS`."""
        own = [f.name for f in dataclasses.fields(cls.config_class)] if cls.config_class is not None else []
        return [*own, *COMMON_PARAMETERS]

    def check_target(self, target: torch.Tensor | None) -> None:
        """Impersonation needs a target crop; dodging takes none."""
        if self.mode is Mode.IMPERSONATE and target is None:
            raise ConfigError("impersonation needs a target face (--target PHOTO)")
        if self.mode is Mode.DODGE and target is not None:
            raise ConfigError("a target face was given but the mode is dodge; use --mode impersonate")

    def change_bound(self, crops: torch.Tensor, masks: torch.Tensor, luma_only: bool = True) -> torch.Tensor:
        """(B, 1, S, S) per-pixel bound on the change of each channel: ``budget.bound(x) x mask``, scaled so a change
        at the bound keeps the budget's CIEDE2000 cap (:func:`~fluxguard.losses.visibility.calibrated_bound`)."""
        return calibrated_bound(crops.detach().float(), masks, self.budget, luma_only=luma_only)

    def protect(
        self,
        crops: torch.Tensor,
        *,
        masks: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
        landmarks: torch.Tensor | None = None,
    ) -> MethodResult:
        """Protect (B, 3, S, S) aligned crops in [0, 1] inside their face ``masks`` ((B, 1, S, S) in [0, 1];
        default: the whole crop) and the visibility budget; returns the projected crops.

        ``landmarks`` ((B, 5, 2)) are the faces' points in ``crops`` when these are not aligned portrait crops
        (windows of the photo, :attr:`window_crops`); None: the portrait template.
        ``info["visibility"]`` holds, per face, the projection's scale and the mean CIEDE2000 and visible share
        measured on the crop.
        """
        self.check_target(target)
        if masks is None:
            masks = torch.ones_like(crops[:, :1])
        masks = masks.to(crops.device, torch.float32)
        res = self.protect_faces(crops, masks=masks, target=target, generator=generator, progress=progress,
                                 landmarks=landmarks)
        used = masks if res.masks is None else res.masks.to(masks)
        ref = crops if res.reference is None else res.reference
        ref = ref.detach().float().to(res.crops.device)
        res.crops, res.info["visibility"] = project_to_budget(ref, res.crops, used.to(ref.device), self.budget)
        res.masks = used
        return res

    @abstractmethod
    def protect_faces(
        self,
        crops: torch.Tensor,
        *,
        masks: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
        landmarks: torch.Tensor | None = None,
    ) -> MethodResult:
        """The method itself on (B, 3, S, S) aligned portrait crops in [0, 1] (S = ``self.crop_size``), or on crops
        whose faces are at ``landmarks`` ((B, 5, 2); a method that cannot take them raises ConfigError).

        ``masks`` ((B, 1, S, S), default the whole crop) says where the face may change; the output should already
        be ``crops + change`` with the change shaped by :func:`~fluxguard.losses.visibility.shape_residual` inside
        :meth:`change_bound`. ``target`` is the (1 or B, 3, S, S) aligned portrait crop of the identity to
        impersonate; required in impersonation mode, None when dodging. Callers use :meth:`protect`.
        """

    def params(self) -> dict[str, Any]:
        """The parameters this run used (for reports and the JSON summary)."""
        out: dict[str, Any] = {"method": self.name, "mode": self.mode.value,
                               "fr_models": [r.name for r in self.recognizers],
                               "budget": dataclasses.asdict(self.budget)}
        if self.config_class is not None:
            out.update({k: v for k, v in dataclasses.asdict(self.config).items() if k != "device"})
        return out
