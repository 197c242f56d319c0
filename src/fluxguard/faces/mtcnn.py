"""MTCNN face detector (Zhang et al. 2016) with the five ArcFace landmarks, in plain PyTorch + NumPy.

The three networks and the cascade follow facenet-pytorch 2.6.0 (MIT), whose weights we ship converted to
``fluxguard/weights/mtcnn.safetensors`` by ``scripts/convert_mtcnn.py``. With ``max_side=None, pad=0`` the output
matches facenet-pytorch's ``MTCNN.detect`` (checked in ``tests/test_faces_detect.py``), including its quirks: the
MATLAB-style 1-based box arithmetic, the ``+1`` widths of ``bbreg``, boxes clipped (not zero-padded) to the image
before the R-/O-Net crops, and the final "Min" NMS. Two additions serve real photos:

* ``max_side``: the P-Net pyramid (the expensive stage) runs on a copy downscaled so its longer side is at most
  ``max_side``; R-Net and O-Net then cut their 24/48 px crops from the *full-resolution* photo, so landmarks keep
  full-resolution accuracy. Faces smaller than about ``20 * longer_side / max_side`` px are not searched for.
* ``pad``: the photo is placed on a larger canvas (``pad`` times its shorter side on each side, filled by
  replicating the border). A face that fills a tightly aligned crop, or is cut by the border, then gets a whole
  window in every stage instead of a clipped, stretched one. The canvas is virtual for R-/O-Net crops: nothing the
  size of a big photo is copied.

Landmark order is the ArcFace order of :class:`fluxguard.faces.Face`: eye on the viewer's left, eye on the viewer's
right, nose tip, mouth corner on the viewer's left, mouth corner on the viewer's right.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mtcnn.safetensors"
THRESHOLDS = (0.6, 0.7, 0.7)  # P-, R-, O-Net score thresholds (facenet-pytorch defaults)
FACTOR = 0.709  # pyramid step: each level is 0.709x the previous (area halves)


class PNet(nn.Module):
    """Proposal net: fully convolutional, one 12x12 window per output cell (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalised image -> box offsets (B, 4, h, w), face probability (B, h, w)."""
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)[:, 1]


def _flatten_transposed(x: torch.Tensor) -> torch.Tensor:
    # The original Caffe nets were trained on transposed (MATLAB column-major) images; the dense layers expect
    # the feature map flattened in (W, H, C) order.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 24, 24) -> box offsets (B, 4), face probability (B,)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_transposed(x)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net on 48x48 crops: final score, box offsets and the five landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, 48, 48) -> box offsets (B, 4), landmarks (B, 10: 5 x then 5 y, in [0, 1] of the box), prob (B,)."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_transposed(x)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    *,
    mode: str = "union",
    plus_one: bool = False,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first.

    Args:
        boxes: (N, 4) x0, y0, x1, y1.
        scores: (N,).
        threshold: a box is dropped when its overlap with a kept box is above this.
        mode: "union" (IoU) or "min" (intersection over the smaller area).
        plus_one: MATLAB-style areas ``(x1 - x0 + 1) * (y1 - y0 + 1)``.
        order: visiting order (best first); default a stable sort by descending score.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    # float32 like the boxes the cascade produces, so ties and borderline overlaps resolve the same way
    b = np.asarray(boxes, dtype=np.float32)
    one = np.float32(1.0 if plus_one else 0.0)
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = (x1 - x0 + one) * (y1 - y0 + one)
    remaining = np.argsort(-np.asarray(scores), kind="stable") if order is None else np.asarray(order)
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        while remaining.size:
            i, rest = remaining[0], remaining[1:]
            keep.append(i)
            w = np.maximum(np.float32(0), np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + one)
            h = np.maximum(np.float32(0), np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + one)
            inter = w * h
            denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
            remaining = rest[~(inter / denom > threshold)]  # NaN overlaps (empty boxes) suppress nothing
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (facenet-pytorch ``rerec``); in place on columns 0..3."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = torch.maximum(w, h)
    boxes[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side[:, None]
    return boxes


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply R-/O-Net box offsets (facenet-pytorch ``bbreg``: MATLAB ``+1`` widths); in place."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] = boxes[:, :4] + reg * torch.stack([w, h, w, h], dim=1)
    return boxes


@dataclass
class _Canvas:
    """The photo, virtually padded by ``pad`` px on every side (canvas coords = photo coords + pad)."""

    image: np.ndarray  # (H, W, 3) uint8, the full-resolution photo
    pad: int

    @property
    def width(self) -> int:
        return self.image.shape[1] + 2 * self.pad

    @property
    def height(self) -> int:
        return self.image.shape[0] + 2 * self.pad

    def crops(self, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut the boxes (canvas coords), clipped to the canvas, and area-resize each to ``size`` px.

        Returns the normalised crops (K, 3, size, size) and the indices of the boxes that have a non-empty crop.
        """
        # facenet-pytorch ``pad``: truncate to int, clip to [1, W] x [1, H] (1-based), slice [y - 1, ey)
        b = boxes[:, :4].trunc().int().numpy()
        x, y = np.maximum(b[:, 0], 1), np.maximum(b[:, 1], 1)
        ex, ey = np.minimum(b[:, 2], self.width), np.minimum(b[:, 3], self.height)
        valid = np.flatnonzero((ey > y - 1) & (ex > x - 1))
        h, w = self.image.shape[:2]
        out = []
        for k in valid:
            r0, r1, c0, c1 = y[k] - 1 - self.pad, ey[k] - self.pad, x[k] - 1 - self.pad, ex[k] - self.pad
            if r0 >= 0 and c0 >= 0 and r1 <= h and c1 <= w:
                patch = self.image[r0:r1, c0:c1]
            else:  # part of the crop lies on the padding: replicate the border (rows/cols clipped into the photo)
                rows = np.clip(np.arange(r0, r1), 0, h - 1)
                cols = np.clip(np.arange(c0, c1), 0, w - 1)
                patch = self.image[np.ix_(rows, cols)]
            t = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None].float()
            out.append(F.interpolate(t, size=(size, size), mode="area"))
        if not out:
            return torch.zeros(0, 3, size, size), torch.from_numpy(valid)
        return (torch.cat(out) - 127.5) * 0.0078125, torch.from_numpy(valid)


@dataclass
class Detections:
    """Raw MTCNN output in photo pixel coordinates, best score first."""

    boxes: np.ndarray  # (N, 4) x0, y0, x1, y1 (may extend past the photo)
    scores: np.ndarray  # (N,)
    landmarks: np.ndarray  # (N, 5, 2) ArcFace order

    def __len__(self) -> int:
        return len(self.scores)


class MTCNN(nn.Module):
    """The P-/R-/O-Net cascade. ``MTCNN().detect(rgb_uint8)`` -> :class:`Detections`.

    Args:
        weights: safetensors file with ``pnet.*``, ``rnet.*``, ``onet.*`` tensors (default: the shipped file).
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        from safetensors.torch import load_file

        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        state = load_file(str(weights or WEIGHTS))
        for name in ("pnet", "rnet", "onet"):
            sub = {k[len(name) + 1 :]: v.float() for k, v in state.items() if k.startswith(name + ".")}
            getattr(self, name).load_state_dict(sub)
        self.eval().requires_grad_(False)

    @torch.inference_mode()
    def detect(
        self,
        image: np.ndarray,
        *,
        min_face_size: float = 20,
        thresholds: tuple[float, float, float] = THRESHOLDS,
        factor: float = FACTOR,
        max_side: int | None = None,
        pad: float = 0.0,
    ) -> Detections:
        """Run the cascade on one (H, W, 3) uint8 RGB image.

        Args:
            image: the photo.
            min_face_size: smallest face (box side, px of ``image``) searched for.
            thresholds: P-Net, R-Net, O-Net score thresholds.
            factor: pyramid scale step.
            max_side: run P-Net on a copy whose longer side is at most this (None: full resolution).
            pad: pad the canvas by this fraction of the shorter side on every side (0: none).
        """
        h, w = image.shape[:2]
        canvas = _Canvas(image, int(round(pad * min(h, w))))
        boxes = self._propose(canvas, min_face_size, thresholds[0], factor, max_side)
        if len(boxes):
            boxes = self._refine(canvas, boxes, thresholds[1])
        points = torch.zeros(0, 5, 2)
        if len(boxes):
            boxes, points = self._output(canvas, boxes, thresholds[2])
        boxes_np = boxes[:, :4].double().numpy() - canvas.pad
        return Detections(boxes_np, boxes[:, 4].double().numpy(), points.double().numpy() - canvas.pad)

    def _propose(
        self, canvas: _Canvas, min_face_size: float, threshold: float, factor: float, max_side: int | None
    ) -> torch.Tensor:
        """Stage 1: P-Net over an image pyramid -> square candidate boxes (N, 5) in canvas coords."""
        import cv2

        image = canvas.image
        h, w = image.shape[:2]
        scale = 1.0 if max_side is None else min(1.0, max_side / (max(h, w) + 2 * canvas.pad))
        if scale < 1.0:
            small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
            # never search below 20 px in the small copy (that would just upsample it again)
            min_face_size = max(min_face_size * scale, min(min_face_size, 20.0))
        else:
            small = image
        sx, sy = small.shape[1] / w, small.shape[0] / h
        pad_s = int(round(canvas.pad * min(sx, sy)))
        if pad_s:
            small = cv2.copyMakeBorder(small, pad_s, pad_s, pad_s, pad_s, cv2.BORDER_REPLICATE)
        img = torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1)[None].float()
        sh, sw = img.shape[-2:]

        m = 12.0 / min_face_size
        minl = min(sh, sw) * m
        scales = []
        s = m
        while minl >= 12:
            scales.append(s)
            s *= factor
            minl *= factor

        found = []
        for s in scales:
            data = F.interpolate(img, size=(int(sh * s + 1), int(sw * s + 1)), mode="area")
            reg, prob = self.pnet((data - 127.5) * 0.0078125)
            boxes = _grid_boxes(reg[0], prob[0], s, threshold)
            keep = nms(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.5)
            found.append(boxes[torch.from_numpy(keep)])
        boxes = torch.cat(found) if found else torch.zeros(0, 9)
        if not len(boxes):
            return boxes[:, :5]
        boxes = boxes[torch.from_numpy(nms(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.7))]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        out = torch.stack(
            [boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
             boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh, boxes[:, 4]], dim=1,
        )
        if scale < 1.0:  # small-canvas -> full-resolution canvas coords
            out[:, [0, 2]] = (out[:, [0, 2]] - pad_s) / sx + canvas.pad
            out[:, [1, 3]] = (out[:, [1, 3]] - pad_s) / sy + canvas.pad
        return _square(out)

    def _refine(self, canvas: _Canvas, boxes: torch.Tensor, threshold: float) -> torch.Tensor:
        """Stage 2: R-Net re-scores and regresses the candidates."""
        crops, idx = canvas.crops(boxes, 24)
        boxes = boxes[idx]
        reg, prob = self.rnet(crops)
        ok = prob > threshold
        boxes = torch.cat([boxes[ok, :4], prob[ok, None]], dim=1)
        reg = reg[ok]
        keep = torch.from_numpy(nms(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.7))
        return _square(_regress(boxes[keep], reg[keep]))

    def _output(self, canvas: _Canvas, boxes: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3: O-Net scores, regresses and places the landmarks; final "Min" NMS."""
        crops, idx = canvas.crops(boxes, 48)
        boxes = boxes[idx]
        reg, pts, prob = self.onet(crops)
        ok = prob > threshold
        boxes = torch.cat([boxes[ok, :4], prob[ok, None]], dim=1)
        reg, pts = reg[ok], pts[ok]
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = torch.stack([bw * pts[:, :5] + boxes[:, :1] - 1, bh * pts[:, 5:] + boxes[:, 1:2] - 1], dim=2)
        boxes = _regress(boxes, reg)
        scores = boxes[:, 4].numpy()
        # facenet-pytorch visits by np.argsort (quicksort) order: kept so tied scores (1.0 is common) resolve alike
        keep = nms(boxes[:, :4].numpy(), scores, 0.7, mode="min", plus_one=True, order=np.argsort(scores)[::-1])
        keep_t = torch.from_numpy(keep)
        return boxes[keep_t], points[keep_t]


def _grid_boxes(reg: torch.Tensor, prob: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """P-Net cells above threshold -> (N, 9) boxes [x0, y0, x1, y1, score, 4 offsets] in pyramid-input coords."""
    stride, cell = 2, 12
    mask = prob >= threshold
    yx = mask.nonzero()
    score = prob[mask]
    offsets = reg[:, mask].T
    bb = yx.to(reg.dtype).flip(1)  # (x, y)
    q1 = ((stride * bb + 1) / scale).floor()
    q2 = ((stride * bb + cell) / scale).floor()
    return torch.cat([q1, q2, score[:, None], offsets], dim=1)
