"""The lite generators shipped with fluxguard: a small VAE, a rectified-flow transformer and a UNet, all diffusers.

FLUX.1-dev and Stable Diffusion weights are many gigabytes and cannot ship, so fluxguard carries small models of
its own, trained on CPU on aligned portrait crops (``fluxguard.faces.align.portrait_template``) of real faces;
see ``weights/lite/README.md`` for the data, the training and the measured quality. They follow the layout and
conventions of the big models so the same backends drive them:

- ``vae/``: ``AutoencoderKL`` with FLUX-style ``scaling_factor`` and ``shift_factor`` taken from the latent
  statistics of its training set. Latents are ``(mode - shift_factor) * scaling_factor`` for *both* generators
  (:func:`encode_latents` / :func:`decode_latents`); SD pipelines, which only scale, must also shift.
- ``transformer/``: ``FluxTransformer2DModel`` (no guidance embedding) trained unconditionally with a learned
  null prompt (``null_prompt.safetensors``: ``prompt_embeds`` (1, L, joint_attention_dim) and
  ``pooled_prompt_embeds`` (1, pooled_projection_dim)), rectified flow in the diffusers FLUX convention, with a
  ``FlowMatchEulerDiscreteScheduler`` config (FLUX.1-dev's shift settings) in ``flow_scheduler/``.
- ``unet/``: ``UNet2DConditionModel`` (epsilon prediction) with a learned null text embedding
  (``null_text.safetensors``: ``null_embeds`` (1, L, cross_attention_dim)) and SD's ``DDIMScheduler`` config in
  ``ddim_scheduler/``.

Weights are stored in fp16 and loaded as frozen fp32 modules on CPU in eval mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluxguard.errors import FluxguardError

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        UNet2DConditionModel,
    )

logger = logging.getLogger(__name__)

LITE_SIZE = 256
"""Side of the aligned portrait crop (px) the lite models were trained at."""


def lite_dir() -> Path:
    """The folder of the shipped lite weights (``fluxguard/weights/lite``)."""
    return Path(__file__).resolve().parent.parent / "weights" / "lite"


def _folder(name: str) -> Path:
    path = lite_dir() / name
    if not (path / "config.json").is_file() and not (path / "scheduler_config.json").is_file():
        raise FluxguardError("lite model files are missing (reinstall fluxguard)", path=path)
    return path


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    module.to(dtype=torch.float32, device="cpu").eval()
    module.requires_grad_(False)
    return module


def _quiet() -> None:
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()


def load_lite_vae() -> AutoencoderKL:
    """The lite ``AutoencoderKL`` (frozen, fp32, CPU, eval); images in [-1, 1] as for every diffusers VAE."""
    from diffusers import AutoencoderKL

    _quiet()
    return _frozen(AutoencoderKL.from_pretrained(_folder("vae"), dtype=torch.float32))


def _embeddings(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FluxguardError("lite null embeddings are missing (reinstall fluxguard)", path=path)
    return {k: v.float() for k, v in load_file(str(path)).items()}


@dataclass
class LiteFlux:
    """The lite rectified-flow generator: everything a FLUX backend needs, with stored prompt embeddings."""

    vae: AutoencoderKL
    transformer: FluxTransformer2DModel
    scheduler: FlowMatchEulerDiscreteScheduler
    prompt_embeds: torch.Tensor  # (1, L, joint_attention_dim), the learned null prompt
    pooled_prompt_embeds: torch.Tensor  # (1, pooled_projection_dim)

    @property
    def text_ids(self) -> torch.Tensor:
        """(L, 3) zeros, the text position ids FLUX uses."""
        return torch.zeros(self.prompt_embeds.shape[1], 3)


@dataclass
class LiteSD:
    """The lite SD-style generator (for WDP): UNet, DDIM scheduler and the learned null text embedding."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    null_embeds: torch.Tensor  # (1, L, cross_attention_dim)


def load_lite_flux() -> LiteFlux:
    """Load the lite VAE, flow transformer, its scheduler and null prompt (frozen, fp32, CPU, eval)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    _quiet()
    folder = _folder("transformer")
    transformer = _frozen(FluxTransformer2DModel.from_pretrained(folder, dtype=torch.float32))
    emb = _embeddings(folder / "null_prompt.safetensors")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(_folder("flow_scheduler"))
    return LiteFlux(load_lite_vae(), transformer, scheduler, emb["prompt_embeds"], emb["pooled_prompt_embeds"])


def load_lite_sd() -> LiteSD:
    """Load the lite VAE, UNet, DDIM scheduler and null text embedding (frozen, fp32, CPU, eval)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    _quiet()
    folder = _folder("unet")
    unet = _frozen(UNet2DConditionModel.from_pretrained(folder, dtype=torch.float32))
    emb = _embeddings(folder / "null_text.safetensors")
    scheduler = DDIMScheduler.from_pretrained(_folder("ddim_scheduler"))
    return LiteSD(load_lite_vae(), unet, scheduler, emb["null_embeds"])


def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(mode - shift_factor) * scaling_factor`` of (B, 3, H, W) images in [0, 1]."""
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] from normalised latents (differentiable; clamped as the pipelines do)."""
    x = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
    return ((x + 1) / 2).clamp(0, 1)
