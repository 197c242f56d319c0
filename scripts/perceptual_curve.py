#!/usr/bin/env python
"""Tabulate and plot Flux-Guard's identity weight w_id against image change, for the perceptual losses at hand.

For real aligned face crops and graded perturbations (Gaussian noise, Gaussian blur, JPEG, and low-frequency noise
upsampled from the 1/8-resolution grid, which is what a VAE-latent change looks like), it measures PSNR, the msSSIM
distance D, the substitute's L_p = (0.3 / tau_ssim) * D and its w_id. With ``--vgg`` (torchvision VGG19
IMAGENET1K_V1 state dict) it also measures the paper's VGG19 relu3_4 MSE and its w_id, and fits the scale of the
substitute by least squares (L_vgg ~ c * D), printing the tau_ssim = 0.3 / c that would make the two curves agree
on these perturbations.

usage: python scripts/perceptual_curve.py [--size 512] [--vgg vgg19-dcbb9e9d.pth] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxguard.data import find_faces_dir, package_faces  # noqa: E402
from fluxguard.faces.align import align_faces  # noqa: E402
from fluxguard.losses.perceptual import (  # noqa: E402
    DEFAULT_SSIM_TAU,
    PAPER_TAU,
    SSIMPerceptualLoss,
    VGGPerceptualLoss,
    adaptive_id_weight,
    ms_ssim_distance,
)

FAMILIES = {
    "noise": [1, 2, 4, 8, 16, 32],  # sigma in /255
    "lowfreq_noise": [2, 4, 8, 16, 32, 64],  # sigma in /255 on the 1/8 grid, bicubic upsampled
    "blur": [0.5, 1.0, 1.5, 2.0, 3.0, 4.0],  # Gaussian sigma in px at 512
    "jpeg": [95, 80, 60, 40, 20, 10],  # quality
}


def crops(size: int, extra: int) -> list[torch.Tensor]:
    """Aligned crops of the package faces, plus ``extra`` photos of ../shared/faces with detected landmarks."""
    out = []
    for f in package_faces(mirrored=False):
        photo = torch.from_numpy(f.rgb).permute(2, 0, 1).float() / 255
        out.append(align_faces(photo, f.landmarks, size)[0].crop)
    root = find_faces_dir()
    if root is not None and extra:
        import dlib
        from PIL import Image

        det = dlib.get_frontal_face_detector()
        import face_recognition_models

        sp = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
        for p in sorted((root / "identities").glob("*/*"))[::37][: extra * 3]:
            rgb = np.array(Image.open(p).convert("RGB"))
            d = det(rgb, 1)
            if not len(d):
                continue
            s = sp(rgb, d[0])
            q = np.array([[v.x, v.y] for v in s.parts()], dtype=np.float64)
            five = np.stack([q[36:42].mean(0), q[42:48].mean(0), q[30], q[48], q[54]])
            photo = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
            out.append(align_faces(photo, five, size)[0].crop)
            if len(out) >= 2 + extra:
                break
    return out


def perturb(x: torch.Tensor, family: str, level: float, g: torch.Generator) -> torch.Tensor:
    size = x.shape[-1]
    if family == "noise":
        return (x + level / 255 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    if family == "lowfreq_noise":
        n = torch.randn(1, 3, size // 8, size // 8, generator=g)
        n = F.interpolate(n, size=(size, size), mode="bicubic", align_corners=False)
        return (x + level / 255 * n[0]).clamp(0, 1)
    if family == "blur":
        from kornia.filters import gaussian_blur2d

        s = level * size / 512
        k = 2 * int(3 * s) + 1
        return gaussian_blur2d(x[None], (k, k), (s, s), border_type="reflect")[0]
    if family == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG",
                                                                                        quality=int(level))
        return torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1).float() / 255
    raise ValueError(family)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--extra-faces", type=int, default=4,
                    help="photos from ../shared/faces besides the 2 package faces")
    ap.add_argument("--vgg", default=None, help="torchvision VGG19 IMAGENET1K_V1 weights (state dict)")
    ap.add_argument("--tau-ssim", type=float, default=DEFAULT_SSIM_TAU)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    faces = crops(a.size, a.extra_faces)
    sub = SSIMPerceptualLoss(a.tau_ssim)
    vgg = VGGPerceptualLoss(a.vgg) if a.vgg else None
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for fam, levels in FAMILIES.items():
            for lev in levels:
                vals = {"psnr": [], "D": [], "vgg": []}
                for x in faces:
                    y = perturb(x, fam, lev, g)
                    vals["psnr"].append(psnr(y, x))
                    vals["D"].append(float(ms_ssim_distance(y[None], x[None])))
                    if vgg is not None:
                        vals["vgg"].append(float(vgg(y[None], x[None])))
                d = float(np.mean(vals["D"]))
                row = {"family": fam, "level": lev, "psnr": float(np.mean(vals["psnr"])), "D_msssim": d,
                       "L_p_substitute": sub.scale * d, "w_id_substitute": adaptive_id_weight(sub.scale * d)}
                if vgg is not None:
                    lv = float(np.mean(vals["vgg"]))
                    row.update({"L_p_vgg": lv, "w_id_vgg": adaptive_id_weight(lv)})
                rows.append(row)
                print(row, flush=True)
    report = {"size": a.size, "faces": len(faces), "tau_ssim": a.tau_ssim, "scale": sub.scale, "rows": rows,
              "vgg": bool(vgg), "command": "python scripts/perceptual_curve.py " + " ".join(sys.argv[1:])}
    if vgg is not None:
        d = np.array([r["D_msssim"] for r in rows])
        lv = np.array([r["L_p_vgg"] for r in rows])
        c = float((d * lv).sum() / (d * d).sum())
        report["fit"] = {"c": c, "tau_ssim_equivalent": PAPER_TAU / c}
        print(f"least squares L_vgg ~ {c:.3f} * D  ->  tau_ssim = {PAPER_TAU / c:.4f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perceptual_curve.json").write_text(json.dumps(report, indent=2))
    lines = [f"# w_id against image change ({a.size}px aligned crops, {len(faces)} real faces)", "",
             f"Command: `{report['command']}`", "",
             f"Substitute: L_p = {sub.scale:g} x (1 - msSSIM) (tau_ssim = {a.tau_ssim}); paper: tau = 0.3, k = 20.",
             "", "| perturbation | level | PSNR dB | 1 - msSSIM | L_p (substitute) | w_id (substitute) |"
             + (" L_p (VGG) | w_id (VGG) |" if vgg else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if vgg else "")]
    for r in rows:
        lines.append(f"| {r['family']} | {r['level']} | {r['psnr']:.1f} | {r['D_msssim']:.4f} | "
                     f"{r['L_p_substitute']:.3f} | {r['w_id_substitute']:.3f} |"
                     + (f" {r['L_p_vgg']:.3f} | {r['w_id_vgg']:.3f} |" if vgg else ""))
    if not vgg:
        lines += ["", "VGG19 columns need `--vgg` (torchvision IMAGENET1K_V1 weights, not available offline here)."]
    (out / "perceptual_curve.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        lp = np.linspace(0, 0.6, 200)
        ax[0].plot(lp, [adaptive_id_weight(v) for v in lp], "k-", label="w_id(L_p), paper (tau 0.3, k 20)")
        ax[0].set_xlabel("L_p (VGG relu3_4 MSE units)")
        ax[0].set_ylabel("w_id")
        sec = ax[0].secondary_xaxis("top", functions=(lambda v: v / sub.scale, lambda v: v * sub.scale))
        sec.set_xlabel("substitute: 1 - msSSIM")
        ax[0].legend(fontsize=8)
        for fam in FAMILIES:
            rr = [r for r in rows if r["family"] == fam]
            ax[1].plot([r["psnr"] for r in rr], [r["w_id_substitute"] for r in rr], "o-", label=f"{fam} (msSSIM)")
            if vgg:
                ax[1].plot([r["psnr"] for r in rr], [r["w_id_vgg"] for r in rr], "x--", label=f"{fam} (VGG)")
        ax[1].set_xlabel("PSNR of the change (dB)")
        ax[1].set_ylabel("w_id")
        ax[1].invert_xaxis()
        ax[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "perceptual_curve.png", dpi=100)
    except ImportError:
        pass
    print(f"wrote {out}/perceptual_curve.{{json,md,png}}")


if __name__ == "__main__":
    main()
