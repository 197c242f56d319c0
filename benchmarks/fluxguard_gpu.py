#!/usr/bin/env python
"""Flux-Guard end to end on the full-size FLUX.1-dev architecture (random bf16 weights built on the GPU).

Measures, per resolution (512 and 1024 by default) and per clean-branch mode (shared / separate, the released
code's duplicate branch): seconds per face, peak GPU memory, transformer time and achieved transformer TFLOP/s
(FLOPs counted by ``torch.utils.flop_counter`` on one forward, times the number of forwards) against the H100 SXM
dense bf16 peak (989.4 TFLOP/s), plus a ``torch.profiler`` summary of one run (stages and top kernels).

Everything the paper's algorithm does runs: FaceMesh edit mask of the paper's prompt on a real face (astronaut),
RF-Solver inversion with V storing, V injection + mask fusion, 5 attack steps x 10 Adam steps through the VAE
decoder, 3 shipped FR models and the perceptual loss (VGG19 relu3_4 with random weights by default, to time the
paper's cost; ``--perceptual ssim`` for the offline substitute). Text conditioning is random T5/CLIP-shaped
embeddings (512 tokens x 4096, 768): T5-XXL runs once per run and is not part of the per-face cost.

``--tiny`` runs the same code path on the tiny CPU config (64 px) to prove it works without a GPU.

usage:
    python benchmarks/fluxguard_gpu.py                       # GPU: 512 and 1024, shared and separate branch
    python benchmarks/fluxguard_gpu.py --sizes 512 --no-profile
    python benchmarks/fluxguard_gpu.py --tiny                # CPU smoke run
Writes benchmarks/results/fluxguard_gpu[_tiny].{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxguard.generators.flux import Conditioning, FluxBackend  # noqa: E402
from fluxguard.generators.flux_testing import (  # noqa: E402
    FLUX_DEV_TRANSFORMER,
    FLUX_DEV_VAE,
    TINY_TRANSFORMER,
    TINY_VAE,
)
from fluxguard.methods.fluxguard import PAPER_EDIT_PROMPT, PAPER_SOURCE_PROMPT, FluxGuard, FluxGuardConfig  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.4


def build_backend(tiny: bool, device: torch.device, dtype: torch.dtype, text_tokens: int) -> FluxBackend:
    """Random-weight transformer + VAE built directly in ``dtype`` on ``device`` (no fp32 copy)."""
    import diffusers

    tcfg, vcfg = (TINY_TRANSFORMER, TINY_VAE) if tiny else (FLUX_DEV_TRANSFORMER, FLUX_DEV_VAE)
    old = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            transformer = diffusers.FluxTransformer2DModel(**tcfg)
            vae = diffusers.AutoencoderKL(**vcfg)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator().manual_seed(1)
    conds = {p: Conditioning(torch.randn(1, text_tokens, tcfg["joint_attention_dim"], generator=g),
                             torch.randn(1, tcfg["pooled_projection_dim"], generator=g))
             for p in (PAPER_SOURCE_PROMPT, PAPER_EDIT_PROMPT)}
    return FluxBackend(transformer, vae, conds, name="flux-dev-random" if not tiny else "tiny-random")


def load_frs(names: list[str], device: torch.device) -> list:
    from fluxguard.recognition import load_recognizer

    return [load_recognizer(n, device, download=False) for n in names]


def face_crop(size: int) -> torch.Tensor:
    from fluxguard.data import package_faces
    from fluxguard.faces.align import align_faces

    f = package_faces()[0]
    return align_faces(torch.from_numpy(f.rgb).permute(2, 0, 1).float() / 255, f.landmarks, size)[0].crop[None]


def perceptual(kind: str, device: torch.device) -> torch.nn.Module:
    from fluxguard.losses.perceptual import SSIMPerceptualLoss, VGGPerceptualLoss, vgg19_relu3_4

    if kind == "ssim":
        return SSIMPerceptualLoss().to(device)
    torch.manual_seed(2)
    return VGGPerceptualLoss(vgg19_relu3_4().state_dict()).to(device)


def transformer_flops(backend: FluxBackend, size: int) -> tuple[float, float]:
    """FLOPs of one transformer forward at ``size`` px for batch 1 and batch 2 (counted, not estimated)."""
    from torch.utils.flop_counter import FlopCounterMode

    cond = backend.conditioning(PAPER_SOURCE_PROMPT)
    n = backend.image_seq_len(size, size)
    out = []
    for b in (1, 2):
        z = torch.zeros(b, n, 64, device=backend.device)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            backend.velocity(z, 0.5, cond, 1.0, size, size)
        out.append(float(fc.get_total_flops()))
    return out[0], out[1]


class TimedVelocity:
    """Wraps ``backend.velocity``: counts forwards per batch size and their synchronised wall time."""

    def __init__(self, backend: FluxBackend) -> None:
        self.backend = backend
        self.inner = backend.velocity
        self.calls = {1: 0, 2: 0}
        self.seconds = 0.0

    def __call__(self, packed: torch.Tensor, *a, **k) -> torch.Tensor:
        sync(self.backend.device)
        t = time.perf_counter()
        out = self.inner(packed, *a, **k)
        sync(self.backend.device)
        self.seconds += time.perf_counter() - t
        self.calls[int(packed.shape[0])] = self.calls.get(int(packed.shape[0]), 0) + 1
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(method: FluxGuard, crop: torch.Tensor, flops: tuple[float, float], device: torch.device,
            warmup: bool) -> dict:
    backend = method.backend
    timer = TimedVelocity(backend)
    backend.velocity = timer  # instance attribute shadows the method for this run
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        res = method.protect_faces(crop)
        sync(device)
        total = time.perf_counter() - t0
    finally:
        del backend.velocity
    fl = flops[0] * timer.calls.get(1, 0) + flops[1] * timer.calls.get(2, 0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "seconds_per_face": total,
        "transformer_seconds": timer.seconds,
        "transformer_forwards": {str(k): v for k, v in timer.calls.items() if v},
        "transformer_tflop": fl / 1e12,
        "transformer_tflops_achieved": fl / max(timer.seconds, 1e-9) / 1e12,
        "mfu_vs_h100_bf16": fl / max(timer.seconds, 1e-9) / 1e12 / H100_BF16_DENSE_TFLOPS,
        "peak_memory_gib": peak / 2**30,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "adam_steps": len(res.history),
        "inject_steps": res.info["inject_steps"][0],
        "regions": res.info["regions"][0],
        "final_L_id": res.history[-1]["L_id"] if res.history else None,
        "warmup": warmup,
    }


def profile_one(method: FluxGuard, crop: torch.Tensor, device: torch.device, rows: int = 20) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        method.protect_faces(crop)
        sync(device)
    cuda = device.type == "cuda"
    total, self_total = ("device_time_total", "self_device_time_total") if cuda else \
        ("cpu_time_total", "self_cpu_time_total")
    ev = prof.key_averages()
    stages: dict = {}
    for e in ev:
        if e.key.startswith("fluxguard/"):
            stages[e.key] = {"device_s": getattr(e, total) / 1e6, "cpu_s": e.cpu_time_total / 1e6} if cuda \
                else getattr(e, total) / 1e6
    ops = sorted((e for e in ev if not e.key.startswith("fluxguard/")), key=lambda e: getattr(e, self_total),
                 reverse=True)[:rows]
    table = ev.table(sort_by=self_total, row_limit=rows)
    return {
        "stages_seconds": stages,
        "top_ops": [{"op": e.key, "calls": e.count, "self_s": getattr(e, self_total) / 1e6} for e in ops],
        "table": table,
    }


def markdown(report: dict) -> str:
    lines = [f"# Flux-Guard end to end ({report['mode']})", "",
             f"Device: {report['device']}; transformer {report['transformer_params'] / 1e6:,.1f} M params "
             f"({report['dtype']}); FR: {', '.join(report['fr_models'])}; perceptual: {report['perceptual']}; "
             f"{report['config']['num_steps']} steps, attack from {report['config']['attack_start']}, "
             f"{report['config']['adam_steps']} Adam steps per attack step.", "",
             f"Command: `{report['command']}`", "",
             "| size | clean branch | s/face | transformer s | forwards (b1/b2) | transformer TFLOP | "
             "achieved TFLOP/s | "
             "vs H100 bf16 peak | peak memory GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        f = r["transformer_forwards"]
        lines.append(f"| {r['size']} | {'shared' if r['share_clean_branch'] else 'separate'} | "
                     f"{r['seconds_per_face']:.2f} | {r['transformer_seconds']:.2f} | "
                     f"{f.get('1', 0)}/{f.get('2', 0)} | "
                     f"{r['transformer_tflop']:.4g} | {r['transformer_tflops_achieved']:.4g} | "
                     f"{100 * r['mfu_vs_h100_bf16']:.3g} % | {r['peak_memory_gib']:.2f} |")
    for size, prof in report.get("profiles", {}).items():
        lines += ["", f"## Profile at {size} px (shared branch)", "",
                  "Stages are nested: attack runs inside generate.", "", "| stage | seconds |", "|---|---|"]
        for k, v in prof["stages_seconds"].items():
            lines.append(f"| {k} | {v if not isinstance(v, dict) else v['device_s']:.3f} |")
        lines += ["", "| top op (self time) | calls | seconds |", "|---|---|---|"]
        for o in prof["top_ops"][:12]:
            lines.append(f"| `{o['op']}` | {o['calls']} | {o['self_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU (same code path)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="crop sizes (default 512 1024; tiny: 64)")
    ap.add_argument("--fr", nargs="+", default=None,
                    help="FR ensemble (default: mobilefacenet mobileface faceres; tiny: mobileface)")
    ap.add_argument("--perceptual", choices=["vgg-random", "ssim"], default="vgg-random")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--vae-checkpointing", action="store_true", help="recompute VAE decoder activations (memory)")
    ap.add_argument("--no-separate", action="store_true", help="skip the separate-branch (as released) runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()

    if a.tiny:
        device, dtype, sizes, text_tokens = torch.device("cpu"), torch.float32, a.sizes or [64], 32
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
        device, dtype, sizes, text_tokens = torch.device("cuda"), torch.bfloat16, a.sizes or [512, 1024], 512
        torch.backends.cuda.matmul.allow_tf32 = False
    t_build = time.perf_counter()
    backend = build_backend(a.tiny, device, dtype, text_tokens)
    build_s = time.perf_counter() - t_build
    a.fr = a.fr or (["mobileface"] if a.tiny else ["mobilefacenet", "mobileface", "faceres"])
    frs = load_frs(a.fr, device)
    perc = perceptual(a.perceptual, device)
    report: dict = {
        "mode": "tiny CPU smoke run" if a.tiny else "full-size FLUX.1-dev architecture, random weights",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix().split(str(ROOT) + "/")[-1], *sys.argv[1:]]),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.machine()}, 1 thread)"),
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "transformer_params": sum(p.numel() for p in backend.transformer.parameters()),
        "build_seconds": build_s, "fr_models": a.fr, "perceptual": perc.name, "runs": [], "profiles": {},
        "vae_checkpointing": a.vae_checkpointing,
    }
    import diffusers

    report["diffusers"] = diffusers.__version__
    for size in sizes:
        crop = face_crop(size)
        flops = transformer_flops(backend, size)
        for share in ([True] if a.no_separate else [True, False]):
            cfg = FluxGuardConfig(crop_size=size, share_clean_branch=share, device=str(device),
                                  max_sequence_length=text_tokens, vae_checkpointing=a.vae_checkpointing)
            method = FluxGuard(frs, config=cfg, backend=backend, perceptual=perc)
            report["config"] = {k: getattr(cfg, k) for k in ("num_steps", "attack_start", "adam_steps", "guidance")}
            if device.type == "cuda" and share:
                run_one(method, crop, flops, device, warmup=True)  # kernels, allocator, cuDNN autotune
            r = run_one(method, crop, flops, device, warmup=False)
            r.update({"size": size, "share_clean_branch": share, "flops_per_forward_b1": flops[0],
                      "flops_per_forward_b2": flops[1]})
            report["runs"].append(r)
            print(f"{size}px share={share}: {r['seconds_per_face']:.2f} s/face, transformer "
                  f"{r['transformer_tflops_achieved']:.2f} TFLOP/s, peak {r['peak_memory_gib']:.2f} GiB", flush=True)
        if not a.no_profile:
            method = FluxGuard(frs, config=FluxGuardConfig(crop_size=size, device=str(device),
                                                           max_sequence_length=text_tokens),
                               backend=backend, perceptual=perc)
            report["profiles"][str(size)] = profile_one(method, crop, device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "fluxguard_gpu_tiny" if a.tiny else "fluxguard_gpu"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(report))
    for prof in report["profiles"].values():
        print(prof["table"])
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
