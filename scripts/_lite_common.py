"""Shared helpers of the lite training scripts (not part of the package): the face pack, augmentation, checkpoints.

The face pack is a uint8 array (N, S, S, 3) of aligned portrait crops in RGB, written by
``scripts/build_face_pack.py`` to ``/work/cache/lite/`` (never to the repository).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CACHE = Path(os.environ.get("FLUXGUARD_LITE_CACHE", "/work/cache/lite"))


def load_pack(path: str | Path) -> np.ndarray:
    """The (N, S, S, 3) uint8 crops of a pack file (memory-mapped)."""
    return np.load(path, mmap_mode="r")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (the diffusers VAE range)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def augment(x: torch.Tensor, gen: torch.Generator, jitter: float = 0.08) -> torch.Tensor:
    """Horizontal flips and mild colour jitter (brightness, contrast, saturation) on [-1, 1] images."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if jitter > 0:
        u = (torch.rand(b, 3, generator=gen) * 2 - 1) * jitter
        x01 = (x + 1) / 2
        x01 = x01 * (1 + u[:, 0, None, None, None])  # brightness
        m = x01.mean(dim=(1, 2, 3), keepdim=True)
        x01 = (x01 - m) * (1 + u[:, 1, None, None, None]) + m  # contrast
        g = x01.mean(dim=1, keepdim=True)
        x01 = (x01 - g) * (1 + u[:, 2, None, None, None]) + g  # saturation
        x = x01.clamp(0, 1) * 2 - 1
    return x


def random_batch(pack: np.ndarray, batch: int, crop: int, gen: torch.Generator, jitter: float = 0.08) -> torch.Tensor:
    """A random augmented batch of ``crop`` x ``crop`` windows from the pack, float in [-1, 1]."""
    n, h, w, _ = pack.shape
    idx = torch.randint(0, n, (batch,), generator=gen).tolist()
    out = []
    for i in idx:
        y = int(torch.randint(0, h - crop + 1, (1,), generator=gen)) if crop < h else 0
        x = int(torch.randint(0, w - crop + 1, (1,), generator=gen)) if crop < w else 0
        out.append(pack[i, y : y + crop, x : x + crop])
    return augment(to_tensor(np.stack(out)), gen, jitter)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic torch.save (a kill during the write keeps the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class RunLog:
    """Appends JSON lines to ``<run>/log.jsonl`` and mirrors them to stdout; tracks wall and process CPU time."""

    def __init__(self, run_dir: Path, wall0: float = 0.0, cpu0: float = 0.0) -> None:
        self.path = run_dir / "log.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._t0, self._c0 = time.time(), time.process_time()
        self.wall0, self.cpu0 = wall0, cpu0

    @property
    def wall(self) -> float:
        return self.wall0 + time.time() - self._t0

    @property
    def cpu(self) -> float:
        return self.cpu0 + time.process_time() - self._c0

    def __call__(self, **rec) -> None:
        rec = {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1), **rec}
        line = json.dumps(rec)
        with self.path.open("a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def psnr_ssim(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR (dB) and SSIM of two [0, 1] batches (SSIM: Gaussian window 11, sigma 1.5, pytorch_msssim)."""
    from pytorch_msssim import ssim

    mse = (a - b).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse), ssim(a, b, data_range=1.0, size_average=False)


def cached_latents(vae_dir: str | Path, pack_path: str | Path, out: Path, batch: int = 8) -> torch.Tensor:
    """Normalised latents ``(mode - shift_factor) * scaling_factor`` of every pack crop and of its mirror image.

    Encoded once and kept as fp16 in ``out`` ((2N, C, h, w)); the flips are encoded rather than flipped in latent
    space because the encoder is not exactly mirror-equivariant.
    """
    if out.is_file():
        return torch.load(out)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    pack = load_pack(pack_path)
    chunks = []
    with torch.no_grad():
        for flip in (False, True):
            for i in range(0, len(pack), batch):
                x = to_tensor(pack[i : i + batch])
                if flip:
                    x = x.flip(-1)
                z = vae.encode(x).latent_dist.mode()
                chunks.append(((z - shift) * scale).half())
    lat = torch.cat(chunks)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(lat, out)
    return lat


class EMA:
    """Exponential moving average of a module's parameters (the weights that are shipped)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up so early averages are not dominated by init
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)


def train_with_ema(model: torch.nn.Module, args, run: Path, gen: torch.Generator,
                   batch_loss: Callable[[], torch.Tensor], **start_info) -> tuple[RunLog, int]:
    """The denoiser training loop shared by the flow transformer and the UNet.

    AdamW (weight decay 0.01) with a 300-step warm-up and a cosine to 10 % over ``args.cpu_minutes`` of process CPU
    time, gradient clipping at 1, an EMA of the weights (``args.ema``), the mean loss logged every 50 steps and a
    checkpoint every ``args.ckpt_every`` seconds; resumes from ``<run>/ckpt.pt``. ``batch_loss`` draws a batch
    (from ``gen``) and returns its loss. On return the model holds the EMA weights, in eval mode.
    """
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    step, wall0, cpu0 = 0, 0.0, 0.0
    ckpt = run / "ckpt.pt"
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        ema.shadow = st["ema"]
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, wall0, cpu0 = st["step"], st["wall"], st["cpu"]
    log = RunLog(run, wall0, cpu0)
    log(event="start", step=step, args=vars(args), **start_info, params=sum(p.numel() for p in model.parameters()))

    def state() -> dict:
        return {"model": model.state_dict(), "ema": ema.shadow, "opt": opt.state_dict(), "gen": gen.get_state(),
                "step": step, "wall": log.wall, "cpu": log.cpu}

    budget = args.cpu_minutes * 60
    last_ckpt, run_loss = time.time(), 0.0
    model.train()
    while log.cpu < budget:
        frac = log.cpu / budget
        lr = args.lr * min(1.0, (step + 1) / 300) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        step += 1
        run_loss += float(loss)
        if step % 50 == 0:
            log(step=step, lr=round(lr, 7), loss=round(run_loss / 50, 5))
            run_loss = 0.0
        if time.time() - last_ckpt > args.ckpt_every:
            save_checkpoint(ckpt, state())
            last_ckpt = time.time()
    save_checkpoint(ckpt, state())
    model.load_state_dict(ema.shadow)
    model.eval()
    return log, step
