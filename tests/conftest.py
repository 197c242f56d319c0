"""Shared fixtures: real-data discovery (skipped with a reason when absent) and tiny stand-in FR models."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

from fluxguard.data import find_faces_dir
from fluxguard.faces.align import ARCFACE_112
from fluxguard.recognition.base import CropSpec, FaceRecognizer, RecognizerSpec


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def load_script(relative: str, name: str) -> ModuleType:
    """A repository script (``benchmarks/x.py``, ``scripts/y.py``) imported as a module, for tests of its functions."""
    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    d = find_faces_dir()
    if d is None:
        pytest.skip("real face photos not found: set FLUXGUARD_DATA or place them in ../shared/faces")
    return d


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


class TinyRecognizer(FaceRecognizer):
    """A small frozen random conv net with the FaceRecognizer contract: a stand-in where real weights are not the
    point of the test (shapes, budgets, determinism)."""

    spec = RecognizerSpec(
        name="tiny",
        family="test",
        embedding_size=32,
        input="48x48 RGB",
        crop=CropSpec(48, tuple(map(tuple, (ARCFACE_112 * 48 / 112).tolist()))),
        source="random init (tests)",
        source_sha256="-",
        license="-",
        weights_file=None,
        thresholds={"1e-1": 0.5, "1e-2": 0.6, "1e-3": 0.7},
    )

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 32),
        )
        for p in self.net.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.freeze()

    def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
        return self.net(crop * 2 - 1)


@pytest.fixture
def tiny_recognizers() -> list[FaceRecognizer]:
    return [TinyRecognizer(0), TinyRecognizer(1)]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
