"""Similarity alignment to canonical templates, and paste-back into the full photo.

Coordinates are pixel coordinates with pixel centres on integers (the OpenCV convention). Matrices are (2, 3)
affine maps *from photo coordinates to crop coordinates*. Warps are differentiable (kornia), so a loss on an
aligned crop reaches the photo's pixels.

Paste-back adds the *change* made to a crop (edited crop minus the aligned crop) to the original photo through the
inverse warp and a feathered mask: an unchanged crop gives back the photo exactly, pixels outside the face region
are never touched, and the photo keeps its full-resolution detail under the edit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# The standard ArcFace 112x112 template (insightface), in the landmark order of fluxguard.faces.Face.
ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

# A portrait crop is the ArcFace box widened by this factor around its centre: room for hair, chin and ears, so
# generators see a whole head (the face proper fills the middle half).
PORTRAIT_MARGIN = 2.0


def crop_template(size: int, margin: float = 1.0, base: np.ndarray = ARCFACE_112,
                  base_size: float = 112.0) -> np.ndarray:
    """The 5 template points for a square crop of ``size`` px whose face box is ``margin`` times the ArcFace box."""
    offset = base_size * (margin - 1.0) / 2.0
    return (base + offset) * (size / (base_size * margin))


def portrait_template(size: int) -> np.ndarray:
    """Template points of the generator crop (``PORTRAIT_MARGIN`` times the ArcFace box) at ``size`` px."""
    return crop_template(size, PORTRAIT_MARGIN)


def estimate_similarity(src: np.ndarray | torch.Tensor, dst: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping ``src`` onto ``dst``.

    Args:
        src: (..., N, 2) points, e.g. detected landmarks.
        dst: (N, 2) or (..., N, 2) template points.

    Returns:
        (..., 2, 3) float64 matrices M with ``dst ~= M[:, :2] @ src + M[:, 2]`` (Umeyama 1991).
    """
    s = torch.as_tensor(src, dtype=torch.float64)
    d = torch.as_tensor(dst, dtype=torch.float64).to(s.device)
    d = d.expand_as(s)
    mu_s, mu_d = s.mean(-2, keepdim=True), d.mean(-2, keepdim=True)
    sc, dc = s - mu_s, d - mu_d
    var_s = (sc**2).sum((-2, -1)) / s.shape[-2]
    cov = dc.transpose(-2, -1) @ sc / s.shape[-2]  # (..., 2, 2)
    u, sig, vh = torch.linalg.svd(cov)
    det = torch.linalg.det(u) * torch.linalg.det(vh)
    fix = torch.ones_like(sig)
    fix[..., 1] = torch.where(det < 0, -1.0, 1.0)
    rot = u @ torch.diag_embed(fix) @ vh
    scale = (sig * fix).sum(-1) / var_s
    a = rot * scale[..., None, None]
    t = mu_d.squeeze(-2) - (a @ mu_s.transpose(-2, -1)).squeeze(-1)
    return torch.cat([a, t[..., None]], dim=-1)


def warp_affine(
    image: torch.Tensor,
    matrix: torch.Tensor,
    size: tuple[int, int],
    *,
    mode: str = "bilinear",
    padding_mode: str = "border",
    antialias: bool = True,
) -> torch.Tensor:
    """Differentiable ``cv2.warpAffine``: out[y, x] = image[M^-1 (x, y)].

    Args:
        image: (B, C, H, W) float.
        matrix: (B, 2, 3) or (2, 3) map from ``image`` coordinates to output coordinates.
        size: output (height, width).
        antialias: when the warp shrinks the image by more than 1.5x, low-pass it first with an area resize so the
            output does not alias (bilinear sampling of a big photo into a small crop would otherwise skip pixels).
    """
    from kornia.geometry.transform import warp_affine as _kornia_warp

    m = matrix.to(device=image.device, dtype=torch.float64)
    if m.dim() == 2:
        m = m.expand(image.shape[0], 2, 3)
    if antialias:
        scale = float(torch.sqrt(torch.abs(torch.linalg.det(m[:, :, :2]))).min())
        if scale < 1 / 1.5:
            factor = scale * 1.25  # keep a little more resolution than the output needs
            h, w = image.shape[-2:]
            nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
            image = F.interpolate(image, size=(nh, nw), mode="area")
            # pixel centres: x_small = (x + 0.5) * nw / w - 0.5
            sx, sy = w / nw, h / nh
            pre = torch.tensor([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], dtype=torch.float64)
            m = m @ pre.to(m.device)
    return _kornia_warp(image, m.to(image.dtype), dsize=size, mode=mode, padding_mode=padding_mode,
                        align_corners=False)


def invert_affine(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of (..., 2, 3) affine maps."""
    m = matrix.to(torch.float64)
    a, t = m[..., :2], m[..., 2:]
    ai = torch.linalg.inv(a)
    return torch.cat([ai, -ai @ t], dim=-1)


def portrait_side(landmarks: np.ndarray, margin: float = PORTRAIT_MARGIN) -> float:
    """The side (photo px) of the portrait box of the face at ``landmarks``."""
    ref = 256
    m = estimate_similarity(np.asarray(landmarks, dtype=np.float64), crop_template(ref, margin))
    scale = float(torch.sqrt(torch.abs(torch.linalg.det(m[:2, :2]))))  # photo px -> crop px at ``ref``
    return ref / max(scale, 1e-9)


def native_crop_size(landmarks: np.ndarray, lo: int = 128, hi: int = 512, multiple: int = 16,
                     margin: float = PORTRAIT_MARGIN) -> int:
    """The side (px) at which a portrait crop of the face at ``landmarks`` keeps the photo's own resolution,
    rounded to ``multiple`` and clamped to [lo, hi]."""
    side = portrait_side(landmarks, margin)
    return int(min(hi, max(lo, multiple * round(side / multiple))))


@dataclass
class AlignedFace:
    """An aligned crop and the map that made it: ``crop = warp(photo, matrix, (size, size))``."""

    crop: torch.Tensor  # (3, S, S) float in [0, 1]
    matrix: torch.Tensor  # (2, 3) photo -> crop
    landmarks: np.ndarray  # (5, 2) landmarks in photo coordinates

    @property
    def size(self) -> int:
        return int(self.crop.shape[-1])

    @property
    def crop_landmarks(self) -> np.ndarray:
        """(5, 2) the landmarks in crop coordinates (the portrait template for an aligned crop)."""
        m = self.matrix.numpy()
        return self.landmarks @ m[:, :2].T + m[:, 2]


def align_faces(
    photo: torch.Tensor, landmarks: list[np.ndarray] | np.ndarray, size: int, margin: float = PORTRAIT_MARGIN
) -> list[AlignedFace]:
    """Align every face of ``photo`` ((3, H, W) float [0, 1]) to a square crop of ``size`` px.

    Pixels outside the photo (a face at the border) are filled by repeating the border, which generators and FR
    models tolerate better than black.
    """
    if isinstance(landmarks, np.ndarray) and landmarks.ndim == 2:
        landmarks = [landmarks]
    out = []
    tpl = crop_template(size, margin)
    for lm in landmarks:
        m = estimate_similarity(np.asarray(lm, dtype=np.float64), tpl)
        crop = warp_affine(photo[None], m[None], (size, size))[0].clamp(0, 1)
        out.append(AlignedFace(crop=crop, matrix=m, landmarks=np.asarray(lm, dtype=np.float64)))
    return out


def window_size(landmarks: np.ndarray, lo: int = 128, hi: int = 512, multiple: int = 16,
                margin: float = PORTRAIT_MARGIN) -> int | None:
    """The side (px) of a :func:`window_face` that holds the face's whole portrait box at the photo's resolution:
    rounded up to ``multiple``, at least ``lo``; None when that is over ``hi`` (the face is too big for one)."""
    side = multiple * int(np.ceil(portrait_side(landmarks, margin) / multiple))
    return max(lo, side) if side <= hi else None


def window_face(photo: torch.Tensor, landmarks: np.ndarray, size: int, margin: float = PORTRAIT_MARGIN
                ) -> AlignedFace:
    """A ``size`` px square window of ``photo`` ((3, H, W) float [0, 1]) centred where the portrait crop of the face
    at ``landmarks`` is: an integer shift, no rotation or scaling, so the crop and its paste-back copy pixels
    exactly (nothing is resampled) and the face keeps its tilt (its landmarks are :attr:`AlignedFace.crop_landmarks`).
    Pixels outside the photo repeat its border, as in :func:`align_faces`.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    aligned = estimate_similarity(lm, crop_template(size, margin))
    centre = invert_affine(aligned) @ torch.tensor([(size - 1) / 2, (size - 1) / 2, 1.0], dtype=torch.float64)
    x0, y0 = (round(float(c) - (size - 1) / 2) for c in centre)
    m = torch.tensor([[1.0, 0.0, -x0], [0.0, 1.0, -y0]], dtype=torch.float64)
    _, h, w = photo.shape
    ys = torch.arange(y0, y0 + size, device=photo.device).clamp(0, h - 1)
    xs = torch.arange(x0, x0 + size, device=photo.device).clamp(0, w - 1)
    return AlignedFace(crop=photo[:, ys][:, :, xs].clamp(0, 1), matrix=m, landmarks=lm)


def _window_box(face: AlignedFace, h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """For a :func:`window_face` (its matrix an integer shift) in an ``h`` x ``w`` photo: the (rows, cols) slices of
    the photo it covers and the matching slices of the crop (empty where it lies outside); None for any other
    crop, which must be warped."""
    m = face.matrix.to(torch.float64)
    t = m[:, 2]
    if not (torch.equal(m[:, :2], torch.eye(2, dtype=torch.float64)) and torch.equal(t, t.round())):
        return None
    x0, y0 = -int(t[0]), -int(t[1])
    ya, yb, xa, xb = max(0, y0), min(h, y0 + face.size), max(0, x0), min(w, x0 + face.size)
    yb, xb = max(ya, yb), max(xa, xb)
    return (slice(ya, yb), slice(xa, xb)), (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))


def move_to(image: torch.Tensor, src: AlignedFace, dst: AlignedFace) -> torch.Tensor:
    """(C, S, S) ``image`` in ``src``'s crop frame, warped into ``dst``'s (zeros where ``src`` has no pixel); e.g. a
    face mask built on an aligned crop, for a window of the same face."""
    inv = invert_affine(src.matrix)
    m = dst.matrix.to(torch.float64)
    composed = torch.cat([m[:, :2] @ inv[:, :2], m[:, :2] @ inv[:, 2:] + m[:, 2:]], dim=1)  # src crop -> dst crop
    return warp_affine(image[None].float(), composed[None], (dst.size, dst.size), padding_mode="zeros")[0]


def feather_mask(size: int, border: float = 0.08, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, S, S) mask: 1 in the middle, a smooth (raised-cosine) ramp to 0 over ``border`` of the side."""
    ramp = max(1.0, border * size)
    x = torch.arange(size, dtype=torch.float32, device=device)
    d = torch.minimum(x, size - 1 - x)  # distance to the nearest edge, in px
    r = ((d - 0.5) / ramp).clamp(0, 1)
    w = 0.5 - 0.5 * torch.cos(torch.pi * r)
    return (w[:, None] * w[None, :])[None, None]


def _region(face: AlignedFace, h: int, w: int) -> tuple[int, int, int, int, torch.Tensor] | None:
    """The photo box (x0, y0, x1, y1) a crop covers and the crop -> box map, or None when it lies outside."""
    inv = invert_affine(face.matrix)
    corners = torch.tensor([[0, 0], [face.size - 1, 0], [0, face.size - 1], [face.size - 1, face.size - 1]],
                           dtype=torch.float64)
    pc = corners @ inv[:, :2].T + inv[:, 2]
    x0, y0 = (int(max(0, np.floor(float(pc[:, i].min())) - 1)) for i in (0, 1))
    x1 = int(min(w, np.ceil(float(pc[:, 0].max())) + 2))
    y1 = int(min(h, np.ceil(float(pc[:, 1].max())) + 2))
    if x1 <= x0 or y1 <= y0:
        return None
    m_region = inv.clone()  # crop -> region coordinates: region = photo - (x0, y0)
    m_region[0, 2] -= x0
    m_region[1, 2] -= y0
    return x0, y0, x1, y1, m_region


def paste_back(photo: torch.Tensor, faces: list[AlignedFace], edited: list[torch.Tensor],
               masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Add each crop's change back into ``photo`` ((3, H, W) float [0, 1]); returns the new photo (same size).

    For each face, ``delta = edited - aligned`` is warped back with the inverse similarity (anti-aliased when the
    face in the photo is smaller than the crop). With ``masks`` ((1, S, S) face masks, the change already confined
    to them by the method) the change is added where the warped mask is non-zero; without, it is blended under a
    feathered square (for whole-crop changes such as purification). Pixels the masks do not reach stay
    bit-identical, and an unchanged crop leaves the photo unchanged.
    """
    out = photo.clone()
    _, h, w = photo.shape
    for i, (face, new) in enumerate(zip(faces, edited, strict=True)):
        delta = (new.to(photo) - face.crop.to(photo))[None]
        if masks is None:
            mask = feather_mask(face.size, device=photo.device).to(photo)
        else:
            mask = (masks[i].to(photo).reshape(1, 1, face.size, face.size) > 0).to(photo)
            delta = delta * mask
        box = _window_box(face, h, w)
        if box is not None:  # a window: the change is copied, not resampled
            (rows, cols), (crop_rows, crop_cols) = box
            d, m_w = delta[0, :, crop_rows, crop_cols], mask[0, :, crop_rows, crop_cols]
            weight = m_w if masks is None else 1.0
            patch = out[:, rows, cols]
            out[:, rows, cols] = torch.where(m_w > 0, (patch + d * weight).clamp(0, 1), patch)
            continue
        region = _region(face, h, w)
        if region is None:
            continue
        x0, y0, x1, y1, m_region = region
        both = torch.cat([delta, mask], dim=1)
        warped = warp_affine(both, m_region[None], (y1 - y0, x1 - x0), padding_mode="zeros")
        d_back, m_w = warped[:, :3], warped[:, 3:].clamp(0, 1)
        weight = m_w[0] if masks is None else 1.0
        patch = out[:, y0:y1, x0:x1]
        out[:, y0:y1, x0:x1] = torch.where(m_w[0] > 0, (patch + d_back[0] * weight).clamp(0, 1), patch)
    return out


def photo_mask(shape: tuple[int, int], faces: list[AlignedFace], masks: list[torch.Tensor]) -> torch.Tensor:
    """(H, W) mask in the photo: each face's crop mask warped back, the maximum where faces overlap."""
    h, w = shape
    out = torch.zeros(h, w, dtype=torch.float32)
    for face, m in zip(faces, masks, strict=True):
        box = _window_box(face, h, w)
        if box is not None:
            (rows, cols), (crop_rows, crop_cols) = box
            part = m.float().reshape(face.size, face.size)[crop_rows, crop_cols].clamp(0, 1)
            out[rows, cols] = torch.maximum(out[rows, cols], part.cpu())
            continue
        region = _region(face, h, w)
        if region is None:
            continue
        x0, y0, x1, y1, m_region = region
        warped = warp_affine(m.float().reshape(1, 1, face.size, face.size), m_region[None], (y1 - y0, x1 - x0),
                             padding_mode="zeros")[0, 0].clamp(0, 1)
        out[y0:y1, x0:x1] = torch.maximum(out[y0:y1, x0:x1], warped.cpu())
    return out
