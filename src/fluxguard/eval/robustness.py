"""What happens to a photo after it leaves the user: the transforms protection must survive.

Each transform maps an (H, W, 3) uint8 photo to another uint8 photo (possibly of another size); the evaluation
re-detects and re-scores the faces afterwards, as an FR system would.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

Transform = Callable[[np.ndarray], np.ndarray]


def jpeg(quality: int) -> Transform:
    def f(rgb: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=quality)  # default 4:2:0, as most services
        return np.asarray(Image.open(buf).convert("RGB"))

    return f


def resize_back(factor: float) -> Transform:
    def f(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        small = cv2.resize(rgb, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)

    return f


def gaussian_blur(sigma: float) -> Transform:
    def f(rgb: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)

    return f


def mean_filter(k: int) -> Transform:
    def f(rgb: np.ndarray) -> np.ndarray:
        return cv2.blur(rgb, (k, k), borderType=cv2.BORDER_REFLECT)

    return f


def center_crop(keep: float) -> Transform:
    def f(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return np.ascontiguousarray(rgb[y0 : y0 + ch, x0 : x0 + cw])

    return f


def social_network(long_side: int = 1080, quality: int = 75) -> Transform:
    """Resize so the longer side is at most ``long_side`` (area filter), then JPEG at ``quality``: roughly what
    Instagram/Facebook/WhatsApp do to an uploaded photo."""
    enc = jpeg(quality)

    def f(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        s = long_side / max(h, w)
        if s < 1:
            rgb = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        return enc(rgb)

    return f


TRANSFORMS: dict[str, Transform] = {
    "jpeg90": jpeg(90),
    "jpeg75": jpeg(75),
    "jpeg50": jpeg(50),
    "resize0.5": resize_back(0.5),
    "blur1": gaussian_blur(1.0),
    "mean5": mean_filter(5),
    "crop0.9": center_crop(0.9),
    "social": social_network(1080, 75),
}
