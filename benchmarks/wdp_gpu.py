"""WDP speed and memory: seconds per face and peak memory at the paper's settings.

Full mode (GPU): the Stable Diffusion 2 base UNet + VAE architecture (865.9 M + 83.7 M parameters) with random
weights, 256 px crops, 20 DDIM steps, the last 3 regenerated, 20 null-text iterations per step, 30 adversarial
iterations, float32 as in the paper. Random weights cost the same as real ones; three random conv nets with the
surrogates' input sizes (112, 160, 112 px) stand in for IR152 / FaceNet / IRSE50, so the FR share of the time is
underestimated.

``--tiny`` runs the same code path on the CPU with the tiny test architecture at 64 px (it proves the script works;
its numbers say nothing about GPU speed).

    python benchmarks/wdp_gpu.py                 # on a CUDA machine
    python benchmarks/wdp_gpu.py --tiny          # anywhere, ~14 s a face on 1 CPU thread (results/wdp_gpu_tiny.md)

Writes ``benchmarks/results/wdp_gpu[_tiny].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxguard.eval.purification import PurificationConfig, purify  # noqa: E402
from fluxguard.faces.align import crop_template  # noqa: E402
from fluxguard.generators.sd import random_backend  # noqa: E402
from fluxguard.methods.wdp import WDP, WDPConfig  # noqa: E402
from fluxguard.recognition.base import CropSpec, FaceRecognizer, RecognizerSpec  # noqa: E402


def standin_fr(name: str, size: int, seed: int, width: int = 64) -> FaceRecognizer:
    """A frozen random conv net with a surrogate's input size (cost and gradients, not recognition)."""

    class StandIn(FaceRecognizer):
        spec = RecognizerSpec(
            name=name,
            family="random stand-in",
            embedding_size=512,
            input=f"{size}x{size} RGB [-1, 1]",
            crop=CropSpec(size, tuple(map(tuple, crop_template(size)))),
            source="random weights (benchmark)",
            source_sha256="",
            license="n/a",
            weights_file=None,
        )

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(seed)
            chans = [3, width, 2 * width, 4 * width, 8 * width]
            layers: list[nn.Module] = []
            for cin, cout in zip(chans[:-1], chans[1:], strict=True):
                layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.PReLU(cout)]
                layers += [nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.PReLU(cout)]
            self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * width, 512))
            self.freeze()

        def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
            return self.net(crop * 2 - 1)

    return StandIn()


def face_crops(n: int, size: int) -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(data.astronaut()[:256, 128:384].copy()).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=size, mode="area").clamp(0, 1)
    return torch.cat([img, img.flip(-1)] * ((n + 1) // 2))[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny architecture on the CPU at 64 px")
    ap.add_argument("--faces", type=int, default=3, help="timed faces (after one warm-up face)")
    ap.add_argument("--batch", type=int, default=1, help="faces per protect_faces call (paper: 1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--cache-reference", action="store_true", help="WDPConfig.cache_reference_branch")
    ap.add_argument("--purify", action="store_true", help="also time one purification pass per face")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (tiny mode)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if not args.tiny and device.type != "cuda":
        sys.exit("full-size mode needs a CUDA GPU (never run SD2-base optimisation on a CPU); use --tiny")
    arch, size = ("tiny", 64) if args.tiny else ("sd2-base", 256)
    dtype = getattr(torch, args.dtype)

    t0 = time.perf_counter()
    backend = random_backend(arch, device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    width = 8 if args.tiny else 64
    sizes = {"ir152-standin": 112, "facenet-standin": 160, "irse50-standin": 112}
    frs = [standin_fr(n, s, i, width).to(device) for i, (n, s) in enumerate(sizes.items())]
    cfg = WDPConfig(crop_size=size, dtype=args.dtype, cache_reference_branch=args.cache_reference)
    method = WDP(frs, mode="impersonate", config=cfg, backend=backend)
    crops = face_crops(args.faces + args.batch, size)
    target = crops[:1].flip(1)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    method.protect_faces(crops[: args.batch], target=target, generator=torch.Generator().manual_seed(0))  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_call, stages = [], []
    for i in range(args.batch, args.batch + args.faces, args.batch):
        t0 = time.perf_counter()
        res = method.protect_faces(
            crops[i : i + args.batch], target=target, generator=torch.Generator().manual_seed(i)
        )
        sync()
        per_call.append(time.perf_counter() - t0)
        stages.append(res.info["timings"])
    s_per_face = [t / args.batch for t in per_call]
    peak_gib = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    purify_s = None
    if args.purify:
        t0 = time.perf_counter()
        purify(crops[: args.faces], backend, config=PurificationConfig(), generator=torch.Generator().manual_seed(0))
        sync()
        purify_s = (time.perf_counter() - t0) / args.faces

    n_unet = sum(p.numel() for p in backend.unet.parameters())
    n_vae = sum(p.numel() for p in backend.vae.parameters())
    result = {
        "benchmark": "wdp_gpu" + ("_tiny" if args.tiny else ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "architecture": arch,
        "unet_params": n_unet,
        "vae_params": n_vae,
        "fr_models": [f.name for f in frs],
        "crop_size": size,
        "dtype": args.dtype,
        "batch": args.batch,
        "faces_timed": len(s_per_face) * args.batch,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("model", "device")},
        "build_s_incl_imports": round(build_s, 3),
        "seconds_per_face_mean": round(statistics.mean(s_per_face), 3),
        "seconds_per_face_min": round(min(s_per_face), 3),
        "stage_seconds_mean": {k: round(statistics.mean(s[k] for s in stages) / args.batch, 3) for k in stages[0]},
        "peak_memory_gib": round(peak_gib, 3),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "purification_seconds_per_face": None if purify_s is None else round(purify_s, 3),
        "final_loss": res.history[-1]["loss"] if res.history else None,
        "command": "python " + " ".join(sys.argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = result["benchmark"] + ("_" + args.dtype if args.dtype != "float32" else "")
    stem += "_cached" if args.cache_reference else ""
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# WDP timing ({result['benchmark']})",
        "",
        f"`{result['command']}` on {result['device']}, torch {result['torch']}, diffusers {result['diffusers']}.",
        f"{arch}: UNet {n_unet / 1e6:.2f} M + VAE {n_vae / 1e6:.2f} M parameters (random weights), {size} px, "
        f"{args.dtype}, batch {args.batch}; FR: random stand-ins ({', '.join(result['fr_models'])}).",
        "",
        "| s / face (mean) | s / face (min) | inversion | null-text | adversarial | peak memory |",
        "|---|---|---|---|---|---|",
        f"| {result['seconds_per_face_mean']} | {result['seconds_per_face_min']} | "
        f"{result['stage_seconds_mean']['inversion_s']} | {result['stage_seconds_mean']['null_text_s']} | "
        f"{result['stage_seconds_mean']['adversarial_s']} | {result['peak_memory_gib']} GiB "
        f"({result['peak_memory_kind']}) |",
    ]
    if purify_s is not None:
        md += [
            "",
            f"Purification (strength 0.2, 20-step schedule): {result['purification_seconds_per_face']} s / face.",
        ]
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
