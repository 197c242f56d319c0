"""MTCNN face detector (Zhang et al. 2016) with the five ArcFace landmarks, in plain PyTorch + NumPy.

The three networks and the cascade follow facenet-pytorch 2.6.0 (MIT), whose weights we ship converted to
``fluxguard/weights/mtcnn.safetensors`` by ``scripts/convert_mtcnn.py``. With ``max_side=None, pad=0`` the output
matches facenet-pytorch's ``MTCNN.detect`` (checked in ``tests/test_faces_detect.py``), including its quirks: the
MATLAB-style 1-based box arithmetic, the ``+1`` widths of ``bbreg``, boxes clipped (not zero-padded) to the image
before the R-/O-Net crops, and the final "Min" NMS. Three options serve real photos:

* ``max_side``: P-Net (the expensive stage) and R-Net run on a copy downscaled so its longer side is at most
  ``max_side``; O-Net then cuts its 48 px crops from the *full-resolution* photo, so landmarks keep full-resolution
  accuracy. Faces smaller than about ``20 * longer_side / max_side`` px are not searched for.
* ``clip=False``: R-/O-Net crops that reach past the photo's edge are filled (black, as in the original MTCNN)
  instead of clipped. facenet-pytorch clips them, which stretches the crop of a face at the border and misplaces its
  landmarks badly (median error 26% of the inter-ocular distance when 10% of the face box is cut off, against 3%
  unclipped and black-filled; ``benchmarks/detect_border.py``).
* ``pad``: the photo is placed on a larger black canvas (``pad`` times its shorter side on each side), so P-Net can
  also propose windows that reach past the edge: faces filling a tightly aligned crop, or cut by the border. The
  canvas is virtual for the full-resolution crops: nothing the size of a big photo is copied.

Landmark order is the ArcFace order of :class:`fluxguard.faces.Face`: eye on the viewer's left, eye on the viewer's
right, nose tip, mouth corner on the viewer's left, mouth corner on the viewer's right.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fluxguard.faces.detect import FaceDetector
from fluxguard.faces.types import Face

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


def _bins(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Start/end (exclusive) of torch's adaptive-average-pool bins (what ``F.interpolate(mode="area")`` uses)."""
    i = np.arange(n_out)
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def _row_cumsum(image: np.ndarray) -> np.ndarray:
    """(h + 1, w, c) float64 cumulative sums down the rows, with a leading zero row."""
    cum = np.zeros((image.shape[0] + 1, *image.shape[1:]), dtype=np.float64)
    np.cumsum(image, axis=0, dtype=np.float64, out=cum[1:])
    return cum


def _area_from_rows(cum: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-resize the image whose :func:`_row_cumsum` is ``cum`` to ``size`` = (oh, ow); float32 (oh, ow, c)."""
    (oh, ow), h, w = size, cum.shape[0] - 1, cum.shape[1]
    a0, a1 = _bins(h, oh)
    b0, b1 = _bins(w, ow)
    rows = (cum[a1] - cum[a0]) / (a1 - a0)[:, None, None]
    cum_c = np.zeros((oh, w + 1, cum.shape[2]), dtype=np.float64)
    np.cumsum(rows, axis=1, out=cum_c[:, 1:])
    return ((cum_c[:, b1] - cum_c[:, b0]) / (b1 - b0)[None, :, None]).astype(np.float32)


def area_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(mode="area")`` of an (h, w, c) array to (oh, ow, c) float32, via per-axis cumulative sums.

    Same bins as torch (results agree to float rounding, ~1e-5), but one pass over the input instead of torch's
    slow CPU adaptive pooling (~20 ns per input value: 25 ms for one 600 px face crop).
    """
    return _area_from_rows(_row_cumsum(image), size)


def _normalise(images: np.ndarray) -> torch.Tensor:
    """(N, h, w, 3) float pixels -> (N, 3, h, w) network input (a channels-last view, no copy)."""
    return ((torch.from_numpy(images) - 127.5) * 0.0078125).permute(0, 3, 1, 2)


# Above this many pixels a canvas does not keep a whole-image integral (float64, 24 bytes per pixel).
_INTEGRAL_MAX_PIXELS = 1 << 22


@dataclass
class _Canvas:
    """A photo, virtually padded by ``pad`` px on every side (canvas coords = photo coords + ``pad``).

    Pixels outside the photo repeat its border (``fill=None``) or take the value ``fill``. Crops are cut without
    copying the padded photo.
    """

    image: np.ndarray  # (H, W, 3) uint8
    pad: int = 0
    fill: int | None = None
    clip: bool = True  # clip crops to the canvas (facenet-pytorch) instead of filling past its edge
    _integral: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def width(self) -> int:
        return self.image.shape[1] + 2 * self.pad

    @property
    def height(self) -> int:
        return self.image.shape[0] + 2 * self.pad

    def crops(self, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, np.ndarray]:
        """Cut the boxes (canvas coords) and area-resize each to ``size`` px.

        Returns the network input (K, 3, size, size) and the indices of the boxes that have a non-empty crop.
        """
        # facenet-pytorch ``pad``: truncate to int, clip to [1, W] x [1, H] (1-based), slice [y - 1, ey)
        b = boxes[:, :4].trunc().int().numpy()
        x, y, ex, ey = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
        if self.clip:
            x, y = np.maximum(x, 1), np.maximum(y, 1)
            ex, ey = np.minimum(ex, self.width), np.minimum(ey, self.height)
        valid = np.flatnonzero((ey > y - 1) & (ex > x - 1))
        h, w = self.image.shape[:2]
        out = np.empty((len(valid), size, size, 3), dtype=np.float32)
        for n, k in enumerate(valid):
            r0, r1, c0, c1 = y[k] - 1 - self.pad, ey[k] - self.pad, x[k] - 1 - self.pad, ex[k] - self.pad
            if r0 >= 0 and c0 >= 0 and r1 <= h and c1 <= w:
                integral = self._whole_integral()
                if integral is not None:
                    out[n] = _integral_crop(integral, r0, r1, c0, c1, size)
                else:
                    out[n] = area_resize(self.image[r0:r1, c0:c1], (size, size))
            elif self.fill is None:  # repeat the border: rows/cols clipped into the photo
                rows = np.clip(np.arange(r0, r1), 0, h - 1)
                cols = np.clip(np.arange(c0, c1), 0, w - 1)
                out[n] = area_resize(self.image[np.ix_(rows, cols)], (size, size))
            else:
                patch = np.full((r1 - r0, c1 - c0, 3), self.fill, dtype=np.uint8)
                i0, i1, j0, j1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
                if i1 > i0 and j1 > j0:
                    patch[i0 - r0 : i1 - r0, j0 - c0 : j1 - c0] = self.image[i0:i1, j0:j1]
                out[n] = area_resize(patch, (size, size))
        return _normalise(out), valid

    def _whole_integral(self) -> np.ndarray | None:
        if self._integral is None and self.image.shape[0] * self.image.shape[1] <= _INTEGRAL_MAX_PIXELS:
            import cv2

            self._integral = cv2.integral(np.ascontiguousarray(self.image), sdepth=cv2.CV_64F)
        return self._integral


def _integral_crop(integral: np.ndarray, r0: int, r1: int, c0: int, c1: int, size: int) -> np.ndarray:
    """Area-resize image[r0:r1, c0:c1] to (size, size) from the image's (H+1, W+1, 3) integral."""
    a0, a1 = _bins(r1 - r0, size)
    b0, b1 = _bins(c1 - c0, size)
    a0, a1, b0, b1 = a0 + r0, a1 + r0, b0 + c0, b1 + c0
    s = integral[np.ix_(a1, b1)] - integral[np.ix_(a0, b1)] - integral[np.ix_(a1, b0)] + integral[np.ix_(a0, b0)]
    return (s / ((a1 - a0)[:, None, None] * (b1 - b0)[None, :, None])).astype(np.float32)


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
        fill: int | None = 0,
        clip: bool = True,
    ) -> Detections:
        """Run the cascade on one (H, W, 3) uint8 RGB image.

        Args:
            image: the photo.
            min_face_size: smallest face (box side, px of ``image``) searched for.
            thresholds: P-Net, R-Net, O-Net score thresholds.
            factor: pyramid scale step.
            max_side: run P-Net and R-Net on a copy whose longer side (padding included) is at most this
                (None: full resolution). O-Net always sees the full-resolution photo.
            pad: pad the canvas by this fraction of the shorter side on every side (0: none).
            fill: value of the padding and of crop pixels past the photo's edge (None: repeat the border).
            clip: clip R-/O-Net crops to the canvas as facenet-pytorch does (a face at the edge then gets a
                stretched crop and misplaced landmarks); False fills past the edge instead, as the original MTCNN.
        """
        import cv2

        h, w = image.shape[:2]
        full = _Canvas(image, int(round(pad * min(h, w))), fill, clip)
        scale = 1.0 if max_side is None else min(1.0, max_side / max(full.width, full.height))
        if scale < 1.0:
            small_img = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                                   interpolation=cv2.INTER_AREA)
            # never search below 20 px in the small copy (that would just upsample it again)
            min_face_size = max(min_face_size * scale, min(min_face_size, 20.0))
        else:
            small_img = image
        sx, sy = small_img.shape[1] / w, small_img.shape[0] / h
        pad_s = int(round(full.pad * min(sx, sy)))
        if pad_s:
            border = (cv2.BORDER_REPLICATE, None) if fill is None else (cv2.BORDER_CONSTANT, (fill, fill, fill))
            small_img = cv2.copyMakeBorder(small_img, pad_s, pad_s, pad_s, pad_s, border[0], value=border[1])
        small = _Canvas(small_img, 0, fill, clip) if scale < 1.0 or pad_s else full

        boxes = self._propose(small, min_face_size, thresholds[0], factor)
        if len(boxes):
            boxes = self._refine(small, boxes, thresholds[1])
        if len(boxes) and scale < 1.0:
            # small-canvas -> full-resolution canvas coords, squared again (sx and sy differ by rounding)
            boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad_s) / sx + full.pad
            boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad_s) / sy + full.pad
            boxes = _square(boxes)
        points = torch.zeros(0, 5, 2)
        if len(boxes):
            boxes, points = self._output(full, boxes, thresholds[2])
        boxes_np = boxes[:, :4].double().numpy() - full.pad
        return Detections(boxes_np, boxes[:, 4].double().numpy(), points.double().numpy() - full.pad)

    def _propose(self, canvas: _Canvas, min_face_size: float, threshold: float, factor: float) -> torch.Tensor:
        """Stage 1: P-Net over an image pyramid -> square candidate boxes (N, 5) in canvas coords."""
        img = canvas.image
        sh, sw = img.shape[:2]
        m = 12.0 / min_face_size
        minl = min(sh, sw) * m
        scales = []
        s = m
        while minl >= 12:
            scales.append(s)
            s *= factor
            minl *= factor

        cum = _row_cumsum(img) if scales else None  # shared by all pyramid levels
        found = []
        for s in scales:
            level = _area_from_rows(cum, (int(sh * s + 1), int(sw * s + 1)))
            reg, prob = self.pnet(_normalise(level[None]))
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
        return _square(out)

    def _refine(self, canvas: _Canvas, boxes: torch.Tensor, threshold: float) -> torch.Tensor:
        """Stage 2: R-Net re-scores and regresses the candidates."""
        crops, idx = canvas.crops(boxes, 24)
        boxes = boxes[torch.from_numpy(idx)]
        reg, prob = self.rnet(crops)
        ok = prob > threshold
        boxes = torch.cat([boxes[ok, :4], prob[ok, None]], dim=1)
        reg = reg[ok]
        keep = torch.from_numpy(nms(boxes[:, :4].numpy(), boxes[:, 4].numpy(), 0.7))
        return _square(_regress(boxes[keep], reg[keep]))

    def _output(self, canvas: _Canvas, boxes: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3: O-Net scores, regresses and places the landmarks; final "Min" NMS."""
        crops, idx = canvas.crops(boxes, 48)
        boxes = boxes[torch.from_numpy(idx)]
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


class MTCNNDetector(FaceDetector):
    """:class:`MTCNN` behind the :class:`~fluxguard.faces.detect.FaceDetector` interface, tuned for real photos.

    * P-Net and R-Net run at most at ``max_side`` px (longer side); O-Net crops come from the full-resolution
      photo, so landmarks keep full-resolution accuracy.
    * R-/O-Net crops are not clipped to the photo but filled with black past its edge (``clip=False, fill=0``): a
      face at the border keeps an undistorted crop and well-placed landmarks.
    * When nothing is found, the photo is searched again on a canvas padded by ``retry_pad`` (tightly aligned crops
      whose face fills the frame, faces cut by the border), then turned by 90, 270 and 180 degrees (MTCNN itself
      copes with about +-60 degrees of roll).
    * ``threshold`` is the O-Net score a face needs; P-/R-Net keep facenet-pytorch's 0.6 / 0.7.
    """

    name = "mtcnn"
    version = "1"
    default_threshold = 0.9
    max_side = 1600
    pad = 0.0
    retry_pad = 0.25
    rotations = (1, 3, 2)  # quarter turns (np.rot90) tried, in order, when nothing is found upright

    def __init__(self) -> None:
        self.net = MTCNN()

    def detect(self, image: np.ndarray, *, min_face_size: int, threshold: float) -> list[Face]:
        d = self._run(image, min_face_size, threshold, self.pad)
        if not len(d) and self.retry_pad:
            d = self._run(image, min_face_size, threshold, self.retry_pad)
        if len(d):
            return _faces(d)
        h, w = image.shape[:2]
        for k in self.rotations:
            d = self._run(np.ascontiguousarray(np.rot90(image, k)), min_face_size, threshold, self.pad)
            if len(d):
                return _faces(d, _unrotate(k, h, w))
        return []

    def _run(self, image: np.ndarray, min_face_size: int, threshold: float, pad: float) -> Detections:
        thresholds = (THRESHOLDS[0], THRESHOLDS[1], threshold)
        return self.net.detect(image, min_face_size=min_face_size, thresholds=thresholds, max_side=self.max_side,
                               pad=pad, clip=False)


def _unrotate(k: int, h: int, w: int) -> np.ndarray:
    """(2, 3) affine map from ``np.rot90(image, k)`` pixel coords back to the (h, w) image's."""
    return {
        1: np.array([[0.0, -1.0, w - 1.0], [1.0, 0.0, 0.0]]),
        2: np.array([[-1.0, 0.0, w - 1.0], [0.0, -1.0, h - 1.0]]),
        3: np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, h - 1.0]]),
    }[k]


def _faces(d: Detections, m: np.ndarray | None = None) -> list[Face]:
    out = []
    for box, score, lm in zip(d.boxes, d.scores, d.landmarks, strict=True):
        if m is not None:
            lm = lm @ m[:, :2].T + m[:, 2]
            corners = np.array([[box[0], box[1]], [box[2], box[3]]]) @ m[:, :2].T + m[:, 2]
            box = np.concatenate([corners.min(0), corners.max(0)])
        out.append(Face(box=box, landmarks=lm, score=float(score)))
    return out
