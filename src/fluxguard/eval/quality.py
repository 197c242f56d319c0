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

