"""Diffusion purification: the defence WDP is built to survive, applied to any protected face.

A latent-diffusion "purifier" (DiffPure-style, SDEdit on SD latents) encodes the crop, adds Gaussian noise up to a
timestep, and DDIM-denoises back with the unconditional embedding, which washes out small adversarial patterns.
Re-scoring protected faces after this pass measures how much protection survives it, for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fluxguard.generators.sd import SDBackend, load_backend


@dataclass(frozen=True)
class PurificationConfig:
    """Attributes:
    strength: fraction of the ``num_steps`` DDIM schedule that is re-noised and denoised (img2img convention:
        0.2 of 20 steps noises to t = 201 and denoises in 4 steps).
    num_steps: DDIM schedule length.
    sample_posterior: encode with a VAE posterior sample (else its mode).
    batch_size: crops per UNet batch.
    """

    strength: float = 0.2
    num_steps: int = 20
    sample_posterior: bool = False
    batch_size: int = 8


def _start_timesteps(backend: SDBackend, cfg: PurificationConfig) -> list[int]:
    ts = [int(t) for t in backend.timesteps(cfg.num_steps)]
    n_denoise = min(int(cfg.num_steps * cfg.strength), cfg.num_steps)
    return ts[cfg.num_steps - n_denoise :]


@torch.no_grad()
def purify(
    crops: torch.Tensor,
    backend: SDBackend | str | Path,
    *,
    config: PurificationConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Purify (B, 3, S, S) crops in [0, 1]; returns purified crops in [0, 1] on the CPU.

    Args:
        crops: images whose side is a multiple of the backend's VAE scale factor.
        backend: a loaded :class:`SDBackend`, or a model id / folder to load (tiny, lite or full SD).
        config: :class:`PurificationConfig` (strength 0 returns the VAE reconstruction).
        generator: seeds the re-noising (and the posterior sample); the same seed gives the same output.
            None: seed 0.
    """
    cfg = config or PurificationConfig()
    if not 0.0 <= cfg.strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {cfg.strength}")
    sd = load_backend(backend)
    if crops.dim() != 4 or crops.shape[1] != 3 or crops.shape[-1] % sd.vae_scale_factor:
        raise ValueError(
            f"expected (B, 3, S, S) crops with S a multiple of {sd.vae_scale_factor}, got {tuple(crops.shape)}"
        )
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    timesteps = _start_timesteps(sd, cfg)
    step = sd.step_size(cfg.num_steps)
    out = []
    for chunk in crops.split(cfg.batch_size):
        z = sd.encode(chunk, generator=gen, sample=cfg.sample_posterior)
        if timesteps:
            noise = torch.randn(z.shape, generator=gen, device=gen.device, dtype=torch.float32).to(z.device)
            a = sd.alpha_bar(timesteps[0]).to(z.device)
            z = a.sqrt() * z + (1 - a).sqrt() * noise
            emb = sd.uncond(z.shape[0])
            for t in timesteps:
                z = sd.ddim_step(z, sd.predict_noise(z, t, emb), t, t - step)
        out.append(sd.decode(z, clamp=True).cpu())
    return torch.cat(out)
