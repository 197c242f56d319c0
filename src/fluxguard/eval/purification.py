"""Diffusion purification: the defence WDP is built to survive, applied to any protected face.

A latent-diffusion "purifier" (DiffPure-style, SDEdit on SD latents) encodes the crop, adds Gaussian noise up to a
timestep, and DDIM-denoises back with the unconditional embedding, which washes out small adversarial patterns.
Re-scoring protected faces after this pass measures how much protection survives it, for every method:
:class:`Purifier` applies it to the face of a whole photo, as the evaluation does (:func:`make_purifier`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxguard.errors import FluxguardError
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


@dataclass
class Purifier:
    """Purify the face of a photo: align a ``size`` crop, :func:`purify` it with an SD-style backend, paste the
    change back."""

    backend: Any
    source: str
    size: int = 256
    strength: float = 0.2
    num_steps: int = 20
    seed: int = 0

    @property
    def tag(self) -> str:
        h = hashlib.sha1(f"{self.source}|{self.size}|{self.strength}|{self.num_steps}|{self.seed}".encode())
        return h.hexdigest()[:12]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.source, "crop": self.size, "strength": self.strength, "num_steps": self.num_steps,
                "seed": self.seed}

    def __call__(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        from fluxguard.api import to_tensor, to_uint8
        from fluxguard.faces import align_faces, paste_back

        photo = to_tensor(rgb)
        aligned = align_faces(photo, [landmarks], self.size)
        cfg = PurificationConfig(strength=self.strength, num_steps=self.num_steps)
        out = purify(aligned[0].crop[None], self.backend, config=cfg,
                     generator=torch.Generator().manual_seed(self.seed))
        return to_uint8(paste_back(photo, aligned, [out[0]]))


def make_purifier(spec: Any, seed: int, device: str, notes: list[str]) -> Purifier | None:
    """``None``/``"none"``: skip; ``"auto"``: the lite SD model shipped with fluxguard when present; a folder or
    hub id: that SD model; an SDBackend: itself. Why a check does not run goes to ``notes``."""
    if spec is None or spec == "none" or spec is False:
        notes.append("purification check skipped (not requested)")
        return None
    if isinstance(spec, Purifier):
        return spec
    if isinstance(spec, SDBackend):
        return Purifier(spec, spec.source, seed=seed)
    if spec == "auto":
        backend = _lite_sd_backend(notes)
        return None if backend is None else Purifier(backend, backend.source, seed=seed)
    try:
        backend = load_backend(str(spec), device=device)
    except FluxguardError as e:
        notes.append(f"purification check not run: {e}")
        return None
    return Purifier(backend, str(spec), seed=seed)


def _lite_sd_backend(notes: list[str]) -> Any:
    """The lite UNet + VAE shipped with fluxguard as an SDBackend, or None (with a note) when this install has none."""
    try:
        from fluxguard.generators.lite import load_lite_sd

        return load_lite_sd()
    except (ImportError, FluxguardError) as e:
        notes.append(f"purification check not run: no SD-style backend is available here ({e}; SD weights cannot "
                     "be downloaded); pass --purification FOLDER")
    return None
