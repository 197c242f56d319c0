"""facenet-pytorch's own MTCNN as a reference for parity tests (not a test module).

facenet-pytorch 2.6.0 pins torch<2.3 and imports torchvision, which would pull a multi-GB CUDA torch. So the wheel
is installed with ``--no-deps`` into a temporary folder and the only two torchvision functions it touches are
stubbed: ``ops.boxes.batched_nms`` (written here independently of ``fluxguard.faces.mtcnn.nms``, as an IoU-matrix
greedy loop with torchvision's semantics) and ``transforms.functional.to_tensor`` (unused by detection).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

WHEEL_GLOBS = ["/work/cache/pip/facenet_pytorch-2.6.0-py3-none-any.whl"]


def find_wheel() -> Path | None:
    env = os.environ.get("FLUXGUARD_FACENET_WHEEL")
    candidates = [env] if env else []
    for pattern in WHEEL_GLOBS:
        candidates += sorted(glob.glob(pattern))
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.batched_nms: per-index greedy IoU NMS, areas without +1, kept indices by descending score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    b = boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]  # torchvision's coordinate trick
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (area[:, None] + area[None, :] - inter)
    order = torch.sort(scores, descending=True, stable=True).indices
    suppressed = torch.zeros(len(b), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def _to_tensor(pic: object) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pic, dtype=np.float32)).permute(2, 0, 1) / 255.0


def load_reference(target: Path) -> type:
    """Install the wheel into ``target`` (no deps) and return facenet_pytorch's MTCNN class, with torchvision stubbed.

    Raises:
        FileNotFoundError: no wheel found (set FLUXGUARD_FACENET_WHEEL).
    """
    wheel = find_wheel()
    if wheel is None:
        raise FileNotFoundError(
            "facenet-pytorch 2.6.0 wheel not found: `pip download --no-deps facenet-pytorch==2.6.0` and set "
            "FLUXGUARD_FACENET_WHEEL to it"
        )
    if not (target / "facenet_pytorch").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(target),
             str(wheel)],
            check=True,
        )
    stubs = {
        "torchvision": types.ModuleType("torchvision"),
        "torchvision.ops": types.ModuleType("torchvision.ops"),
        "torchvision.ops.boxes": types.ModuleType("torchvision.ops.boxes"),
        "torchvision.transforms": types.ModuleType("torchvision.transforms"),
        "torchvision.transforms.functional": types.ModuleType("torchvision.transforms.functional"),
    }
    stubs["torchvision.ops.boxes"].batched_nms = _batched_nms  # type: ignore[attr-defined]
    stubs["torchvision.transforms.functional"].to_tensor = _to_tensor  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    sys.path.insert(0, str(target))
    try:
        from facenet_pytorch.models.mtcnn import MTCNN
    finally:
        sys.path.remove(str(target))
        # the stubs stay bound inside facenet_pytorch but leave sys.modules (other code probes for torchvision)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return MTCNN
