"""Lite generators: reconstruction quality on held-out identities and CPU speed of every call the methods make.

Quality: PSNR / SSIM (``fluxguard.eval.quality``, uint8) of VAE reconstructions of the aligned portrait crops
of the ``eval`` split (``scripts/build_face_pack.py --split eval`` writes the pack); also on the crops that lie
wholly inside their photo (coverage >= 0.95), since pre-aligned dataset images fill the rest of the portrait
crop by repeating their border.

Speed: best-of-N wall milliseconds at batch 1 and the lite size, with 1 and 2 torch threads, for VAE encode,
decode, decode + backward to the latent (what the adversarial optimisation does), one transformer forward with
the null prompt, one UNet forward with the null text embedding. The machine is shared, so wall times vary; the
process CPU time is reported beside them.

    python benchmarks/lite.py [--pack /work/cache/lite/pack256_eval.npy] [--repeats 7]

Writes ``benchmarks/results/lite.json`` and ``benchmarks/results/lite.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fluxguard.eval.quality import psnr, ssim
from fluxguard.generators.lite import LITE_SIZE, decode_latents, encode_latents, load_lite_flux, load_lite_sd

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_ms": round(1000 * min(walls), 1), "wall_ms_median": round(1000 * float(np.median(walls)), 1),
            "cpu_ms": round(1000 * min(cpus), 1)}


def quality(vae, pack: np.ndarray, cover: np.ndarray | None, batch: int = 8) -> dict[str, float]:
    ps, ss = [], []
    with torch.no_grad():
        for i in range(0, len(pack), batch):
            x = torch.from_numpy(np.ascontiguousarray(pack[i : i + batch])).permute(0, 3, 1, 2).float() / 255
            y = decode_latents(vae, encode_latents(vae, x))
            y8 = (y.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
            for a, b in zip(pack[i : i + batch], y8, strict=True):
                ps.append(psnr(np.asarray(a), b))
                ss.append(ssim(np.asarray(a), b))
    ps_a, ss_a = np.array(ps), np.array(ss)
    out = {"n": len(ps), "psnr_mean": float(ps_a.mean()), "psnr_p05": float(np.percentile(ps_a, 5)),
           "psnr_min": float(ps_a.min()), "ssim_mean": float(ss_a.mean()), "ssim_p05": float(np.percentile(ss_a, 5))}
    if cover is not None:
        full = cover >= 0.95
        out.update(n_full=int(full.sum()), psnr_full_mean=float(ps_a[full].mean()) if full.any() else None,
                   ssim_full_mean=float(ss_a[full].mean()) if full.any() else None)
    return out


def speed(flux, sd, repeats: int) -> dict[str, dict[str, float]]:
    vae = flux.vae
    x = torch.rand(1, 3, LITE_SIZE, LITE_SIZE)
    with torch.no_grad():
        tok = flux.encode(x)
        z = sd.encode(x, sample=False)
    cond = flux.conditioning(None)

    def dec_bwd() -> None:
        zz = tok.clone().requires_grad_(True)
        flux.decode(zz, LITE_SIZE, LITE_SIZE).square().mean().backward()

    out = {}
    with torch.no_grad():
        out["vae_encode"] = timed(lambda: encode_latents(vae, x), repeats)
        out["vae_decode"] = timed(lambda: decode_latents(vae, z), repeats)
    out["vae_decode_backward"] = timed(dec_bwd, repeats)
    with torch.no_grad():
        out["transformer_forward"] = timed(lambda: flux.velocity(tok, 0.5, cond, 1.0, LITE_SIZE, LITE_SIZE), repeats)
        out["unet_forward"] = timed(lambda: sd.predict_noise(z, 500, sd.uncond(1)), repeats)
    return out


def end_to_end(threads: int) -> dict[str, float]:
    """``fluxguard protect`` defaults (Flux-Guard, lite, every shipped FR model) on one 512-px photo, one face."""
    from skimage import data

    from fluxguard.api import Protector
    from fluxguard.io import encode_image, load_image

    torch.set_num_threads(threads)
    photo = load_image(encode_image(np.ascontiguousarray(data.astronaut()[:, :, :3]), "PNG")).rgb
    t0 = time.perf_counter()
    p = Protector()
    load_s = time.perf_counter() - t0
    p.protect(photo, seed=0)  # warm-up: detector, lazy backend
    t0 = time.perf_counter()
    res = p.protect(photo, seed=0)
    return {"threads": threads, "load_s": round(load_s, 2), "protect_s": round(time.perf_counter() - t0, 2),
            "photo_px": list(photo.shape[:2]), "faces": len(res.faces),
            "fr_models": [r.spec.name for r in p.attackers],
            "timings": {k: round(v, 2) for k, v in res.timings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", default="/work/cache/lite/pack256_eval.npy")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    flux, sd = load_lite_flux(), load_lite_sd()
    res: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                 "size": LITE_SIZE}
    res["latent"] = list(encode_latents(flux.vae, torch.rand(1, 3, LITE_SIZE, LITE_SIZE)).shape[1:])
    pack_path = Path(args.pack)
    if pack_path.is_file():
        pack = np.load(pack_path, mmap_mode="r")
        tsv = pack_path.with_suffix(".tsv")
        cover = None
        if tsv.is_file():
            rows = tsv.read_text().splitlines()[1:]
            cover = np.array([float(r.split("\t")[5]) for r in rows])
        torch.set_num_threads(2)
        res["quality"] = quality(flux.vae, pack, cover)
        res["quality"]["pack"] = str(pack_path)
    res["speed"] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        res["speed"][f"threads_{threads}"] = speed(flux, sd, args.repeats)
    res["protect_512px_photo"] = end_to_end(2)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lite.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Lite generators (size {LITE_SIZE}, latent {res['latent']}, {res['machine']}, "
             f"torch {res['torch']})", ""]
    if "quality" in res:
        q = res["quality"]
        lines += ["| held-out crops | n | PSNR mean (dB) | PSNR p05 | SSIM mean | SSIM p05 |",
                  "|---|---|---|---|---|---|",
                  f"| all | {q['n']} | {q['psnr_mean']:.2f} | {q['psnr_p05']:.2f} | {q['ssim_mean']:.4f} "
                  f"| {q['ssim_p05']:.4f} |"]
        if q.get("n_full"):
            lines.append(f"| coverage >= 0.95 | {q['n_full']} | {q['psnr_full_mean']:.2f} | "
                         f"| {q['ssim_full_mean']:.4f} | |")
        lines.append("")
    lines += ["| call (batch 1) | 1 thread wall ms | 1 thread CPU ms | 2 threads wall ms | 2 threads CPU ms |",
              "|---|---|---|---|---|"]
    s1, s2 = res["speed"]["threads_1"], res["speed"]["threads_2"]
    for k in s1:
        lines.append(f"| {k} | {s1[k]['wall_ms']} | {s1[k]['cpu_ms']} | {s2[k]['wall_ms']} | {s2[k]['cpu_ms']} |")
    e = res["protect_512px_photo"]
    lines += ["", f"`fluxguard protect` defaults on one {e['photo_px'][0]} px photo with {e['faces']} face, "
              f"{e['threads']} threads: {e['protect_s']} s (models loaded once: {e['load_s']} s; attacked: "
              f"{', '.join(e['fr_models'])}).", "", "Command: `python benchmarks/lite.py`"]
    (RESULTS / "lite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
