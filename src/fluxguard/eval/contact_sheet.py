"""Contact sheets: original | protected | difference amplified, at 100 % (no resampling), one row per face.

A figure of protection quality is only as good as the pictures behind it: every protection benchmark writes one
beside its table, so colour casts, blotches, ghost edges and seams are seen, not averaged away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

AMPLIFY = 10  # the difference panel shows |protected - original| x AMPLIFY (a change of 1/255 is 10 grey levels)
MARGIN = 0.35  # the crop around a face box, as a share of the box side on each side
LABEL_H = 16


@dataclass
class SheetRow:
    """One face: the two photos (H, W, 3) uint8, the face box (x0, y0, x1, y1) and a caption."""

    original: np.ndarray
    protected: np.ndarray
    box: Sequence[float]
    caption: str = ""


def face_window(shape: tuple[int, ...], box: Sequence[float], margin: float = MARGIN) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the face box widened by ``margin`` of its side, clipped to the photo."""
    h, w = shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = side * (0.5 + margin)
    return (max(0, int(cy - half)), min(h, int(np.ceil(cy + half))), max(0, int(cx - half)),
            min(w, int(np.ceil(cx + half))))


def sheet_row(row: SheetRow, amplify: int = AMPLIFY, max_side: int = 400) -> np.ndarray:
    """The three panels of one face, side by side, with the caption above. Windows larger than ``max_side`` are
    centre-cropped (never resized: 100 % is the point)."""
    y0, y1, x0, x1 = face_window(row.original.shape, row.box)
    if y1 - y0 > max_side:
        c = (y0 + y1) // 2
        y0, y1 = c - max_side // 2, c + max_side // 2
    if x1 - x0 > max_side:
        c = (x0 + x1) // 2
        x0, x1 = c - max_side // 2, c + max_side // 2
    a = row.original[y0:y1, x0:x1]
    b = row.protected[y0:y1, x0:x1]
    d = np.clip(np.abs(a.astype(np.int16) - b.astype(np.int16)) * amplify, 0, 255).astype(np.uint8)
    gap = np.full((a.shape[0], 4, 3), 255, np.uint8)
    panels = np.concatenate([a, gap, b, gap, d], axis=1)
    label = Image.new("RGB", (panels.shape[1], LABEL_H), "white")
    ImageDraw.Draw(label).text((2, 2), row.caption, fill="black")
    return np.concatenate([np.asarray(label), panels], axis=0)


def contact_sheet(rows: Sequence[SheetRow], path: str | Path | None = None, amplify: int = AMPLIFY,
                  title: str = "") -> np.ndarray:
    """Stack the rows (left-aligned on a white page) and save as PNG when ``path`` is given."""
    blocks = [sheet_row(r, amplify) for r in rows]
    head = f"{title}  |  original | protected | difference x{amplify}  (100 %)"
    width = max([b.shape[1] for b in blocks] + [8 * len(head)])
    page = []
    label = Image.new("RGB", (width, LABEL_H + 4), "white")
    ImageDraw.Draw(label).text((2, 4), head, fill="black")
    page.append(np.asarray(label))
    for b in blocks:
        pad = np.full((b.shape[0], width - b.shape[1], 3), 255, np.uint8)
        page.append(np.concatenate([b, pad], axis=1))
        page.append(np.full((6, width, 3), 255, np.uint8))
    sheet = np.concatenate(page, axis=0)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sheet).save(path, optimize=True)
    return sheet


def caption(quality: dict, prefix: str = "") -> str:
    """``prefix  dE 1.52 (p95 3.10)  visible 12%  dL* +0.02 da* -0.01 db* +0.00`` from :func:`face_quality`."""
    q = quality
    if q.get("delta_e_mean") is None:
        return prefix
    return (f"{prefix}  dE2000 {q['delta_e_mean']:.2f} (p95 {q['delta_e_p95'] or 0:.2f})  "
            f"visible {100 * q['visible']:.0f}%  dL* {q['dL']:+.2f} da* {q['da']:+.2f} db* {q['db']:+.2f}")
