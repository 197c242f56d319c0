"""The lite generators shipped with fluxguard: a small VAE, a rectified-flow transformer and a UNet, all diffusers.

FLUX.1-dev and Stable Diffusion weights are many gigabytes and cannot ship, so fluxguard carries small models of
its own, trained on CPU on aligned portrait crops (``fluxguard.faces.align.portrait_template``, 256 px) of real
faces; ``weights/lite/README.md`` gives the data, the training commands and the measured quality.

The folder ``weights/lite`` is laid out so that the ordinary backends load it, under the model name ``"lite"``:

- :class:`~fluxguard.generators.flux.FluxBackend` (Flux-Guard): ``vae/`` (``AutoencoderKL``, 16-channel latent at
  4x downsampling, FLUX-style ``shift_factor`` / ``scaling_factor`` from its training latents), ``transformer/``
  (``FluxTransformer2DModel`` without guidance embedding, trained unconditionally) and ``null_prompt.safetensors``
  (its learned null prompt). No text encoders, so protection runs without a text edit.
- :class:`~fluxguard.generators.sd.SDBackend` (WDP, purification): ``vae/``, ``unet/`` (``UNet2DConditionModel``,
  epsilon prediction), ``scheduler/`` (SD's ``DDIMScheduler`` config) and ``null_embedding.safetensors``.

Weights are stored in fp16 and loaded as frozen fp32 modules. The folder and the name ``"lite"`` are resolved in
:mod:`fluxguard.generators.lite_files` (``LITE``, ``LITE_SIZE``, ``lite_dir``, ``resolve_model`` and ``is_lite`` are
importable from here too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from fluxguard.generators.lite_files import LITE, LITE_SIZE, diffusers_model_kwargs, is_lite, lite_dir, resolve_model

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from fluxguard.generators.flux import FluxBackend
    from fluxguard.generators.sd import SDBackend

__all__ = ["LITE", "LITE_SIZE", "decode_latents", "encode_latents", "is_lite", "lite_dir", "load_lite_flux",
           "load_lite_sd", "load_lite_vae", "resolve_model"]


def load_lite_vae() -> AutoencoderKL:
    """The lite ``AutoencoderKL`` (frozen, fp32, CPU, eval); images in [-1, 1] as for every diffusers VAE."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(resolve_model(LITE), subfolder="vae", dtype=torch.float32,
                                        **diffusers_model_kwargs())
    return vae.eval().requires_grad_(False)


def load_lite_flux(**kwargs: Any) -> FluxBackend:
    """The lite rectified-flow model as a text-encoder-free :class:`FluxBackend` (fp32; CPU unless ``device``)."""
    from fluxguard.generators.flux import FluxBackend

    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("dtype", torch.float32)
    return FluxBackend.from_pretrained(LITE, **kwargs)


def load_lite_sd(**kwargs: Any) -> SDBackend:
    """The lite UNet + DDIM model as a text-encoder-free :class:`SDBackend` (fp32; CPU unless ``device``)."""
    from fluxguard.generators.sd import SDBackend

    kwargs.setdefault("device", "cpu")
    return SDBackend.from_pretrained(LITE, **kwargs)


def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``(mode - shift_factor) * scaling_factor`` of (B, 3, H, W) images in [0, 1]."""
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] from normalised latents (differentiable; clamped as the pipelines do)."""
    x = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
    return ((x + 1) / 2).clamp(0, 1)
