"""Image quality of a protected photo against its original: PSNR, SSIM, MS-SSIM (scikit-image / pytorch-msssim),
and LPIPS / FID (``fluxguard.eval.learned_metrics``, ``fluxguard quality``) only from weights the user points to
(they cannot be downloaded here)."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 (H, W, 3) images (inf when identical)."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=255))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 (H, W, 3) images (scikit-image, Gaussian window as Wang et al. 2004)."""
    from skimage.metrics import structural_similarity

    if min(a.shape[:2]) < 7:
        return float(np.array_equal(a, b))
    return float(structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float | None:
    """MS-SSIM (pytorch-msssim); None for images under 161 px a side, where 5 scales do not fit."""
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    if min(a.shape[:2]) < 161:
        return None
    ta = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float()  # a copy: inputs may be read-only
    tb = torch.from_numpy(np.array(b)).permute(2, 0, 1)[None].float()
    return float(_ms_ssim(ta, tb, data_range=255, size_average=True))


def quality_report(
    original: np.ndarray, protected: np.ndarray, box: np.ndarray | None = None
) -> dict[str, float | None]:
    """PSNR / SSIM / MS-SSIM on the whole photo and, when ``box`` (x0, y0, x1, y1) is given, on the face region."""
    if original.shape != protected.shape:
        raise ValueError(f"shapes differ: {original.shape} vs {protected.shape}")
    out: dict[str, float | None] = {
        "psnr": psnr(original, protected),
        "ssim": ssim(original, protected),
        "ms_ssim": ms_ssim(original, protected),
    }
    if box is not None:
        h, w = original.shape[:2]
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 - x0 >= 7 and y1 - y0 >= 7:
            fa, fb = original[y0:y1, x0:x1], protected[y0:y1, x0:x1]
            out.update(face_psnr=psnr(fa, fb), face_ssim=ssim(fa, fb), face_ms_ssim=ms_ssim(fa, fb))
    return out



def _bbox(mask: np.ndarray, pad: int = 3) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask > 0)
    if ys.size == 0:
        return None
    h, w = mask.shape
    return max(0, ys.min() - pad), min(h, ys.max() + 1 + pad), max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)


def face_quality(original: np.ndarray, protected: np.ndarray, mask: np.ndarray,
                 outside: np.ndarray | None = None) -> dict[str, float | None]:
    """How visible a protection is on one face, as people see it (all on the 8-bit photos).

    Args:
        original, protected: (H, W, 3) uint8 photos.
        mask: (H, W) float face mask in [0, 1] (the region the protection may change), weights the face figures.
        outside: (H, W) mask of every protected face; ``psnr_outside`` is measured where it is 0 (default ``mask``).

    Returns:
        ``delta_e_mean`` (mask-weighted mean CIEDE2000), ``delta_e_p95`` (95th percentile where the mask is >= 0.5),
        ``dL``, ``da``, ``db`` (mask-weighted mean change of L*, a*, b*: the colour cast), ``visible`` (share of the
        mask whose change exceeds its JND, :func:`fluxguard.losses.visibility.visible_fraction`), ``psnr_mask`` and
        ``ssim_mask`` (SSIM map averaged under the mask), ``psnr_outside`` (inf when bit-exact) and
        ``changed_outside`` (pixels outside any mask that differ at all).
    """
    import torch
    from skimage.color import rgb2lab
    from skimage.metrics import structural_similarity

    from fluxguard.losses.visibility import delta_e_2000, visible_fraction

    if original.shape != protected.shape or original.shape[:2] != mask.shape:
        raise ValueError(f"shapes differ: {original.shape}, {protected.shape}, mask {mask.shape}")
    out_mask = mask if outside is None else outside
    free = out_mask <= 0
    diff_free = np.any(original != protected, axis=2) & free
    res: dict[str, float | None] = {
        "psnr_outside": psnr(original[free][None], protected[free][None]) if free.any() else None,
        "changed_outside": int(diff_free.sum()),
    }
    box = _bbox(mask)
    if box is None:
        return {**res, **dict.fromkeys(("delta_e_mean", "delta_e_p95", "dL", "da", "db", "visible", "psnr_mask",
                                        "ssim_mask"))}
    y0, y1, x0, x1 = box
    a, b, w = original[y0:y1, x0:x1], protected[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.float64)
    wsum = max(float(w.sum()), 1e-8)
    de = delta_e_2000(a, b)
    core = w >= 0.5
    lab_diff = rgb2lab(b.astype(np.float64) / 255) - rgb2lab(a.astype(np.float64) / 255)
    shift = [(lab_diff[..., c] * w).sum() / wsum for c in range(3)]
    mse = float((((a.astype(np.float64) - b) ** 2).mean(2) * w).sum() / wsum)
    if min(a.shape[:2]) >= 7:
        _, smap = structural_similarity(a, b, channel_axis=2, data_range=255, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, full=True)
        ssim_mask = float((smap.mean(2) * w).sum() / wsum)
    else:
        ssim_mask = None
    ta = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255
    tb = torch.from_numpy(np.ascontiguousarray(b)).permute(2, 0, 1)[None].float() / 255
    tw = torch.from_numpy(w).float()[None, None]
    res.update(
        delta_e_mean=float((de * w).sum() / wsum),
        delta_e_p95=float(np.percentile(de[core], 95)) if core.any() else None,
        dL=float(shift[0]), da=float(shift[1]), db=float(shift[2]),
        visible=float(visible_fraction(ta, tb, tw)[0]),
        psnr_mask=float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
        ssim_mask=ssim_mask,
    )
    return res


def face_masks(rgb: np.ndarray, faces: list) -> list[np.ndarray]:
    """(H, W) float masks in the photo of each face (the protection masks of :mod:`fluxguard.faces.mask`, built on
    a crop at the face's own resolution and warped back)."""
    from fluxguard.faces.align import align_faces, native_crop_size, photo_mask
    from fluxguard.faces.mask import face_mask

    photo = _to_tensor(rgb)
    out = []
    for f in faces:
        af = align_faces(photo, [f.landmarks], native_crop_size(f.landmarks))[0]
        out.append(photo_mask(rgb.shape[:2], [af], [face_mask(af.crop)[0]]).numpy())
    return out


def faces_quality(original: np.ndarray, protected: np.ndarray, faces: list | None = None) -> list[dict]:
    """:func:`face_quality` for every face of ``original`` (detected when ``faces`` is None), each with its box."""
    if faces is None:
        from fluxguard.faces.detect import detect_faces

        faces = detect_faces(original)
    masks = face_masks(original, faces)
    union = np.maximum.reduce(masks) if masks else np.zeros(original.shape[:2], np.float32)
    return [{"box": [round(float(v), 1) for v in f.box], **face_quality(original, protected, m, outside=union)}
            for f, m in zip(faces, masks, strict=True)]


def _to_tensor(rgb: np.ndarray):  # noqa: ANN202 (torch.Tensor; torch imported lazily)
    import torch

    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
