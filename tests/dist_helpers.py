"""Picklable stand-ins for the Ray tests; Ray workers import this module (tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxguard.api import Protector

# The real pixel path, kept fast: PGD with 2 steps against (and judged by) one small FR model.
make_protector = functools.partial(Protector, "pgd", fr_models=["mobilefacenet"], judges=["mobilefacenet"], steps=2)


class CrashOnce:
    """A protector whose worker process dies (as if OOM-killed) the first time it meets the photo named ``victim``."""

    def __init__(self, marker: str, victim: str) -> None:
        self.inner = make_protector()
        self.marker, self.victim = Path(marker), victim

    def params(self) -> dict[str, Any]:
        return self.inner.params()

    def protect(self, image: Any, **kw: Any) -> Any:
        if Path(image.source).stem == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)  # no cleanup, no exception: the process is gone
        return self.inner.protect(image, **kw)


def make_crash_once(marker: str, victim: str) -> CrashOnce:
    return CrashOnce(marker, victim)


def gaussian_templates(templates: np.ndarray, generator: torch.Generator, sigma: float = 0.05) -> np.ndarray:
    """Placeholder template protection (until AdvFace is on main): unit rows plus seeded Gaussian noise,
    renormalised."""
    z = torch.from_numpy(np.asarray(templates, np.float32))
    noisy = z + sigma * torch.randn(z.shape, generator=generator)
    return torch.nn.functional.normalize(noisy, dim=1).numpy()


def make_gaussian(sigma: float = 0.05) -> Any:
    return functools.partial(gaussian_templates, sigma=sigma)
