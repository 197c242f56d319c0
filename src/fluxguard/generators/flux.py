"""FLUX rectified-flow backend built from diffusers components (no ``FluxPipeline.__call__``, which is no_grad).

The backend holds the flow transformer and the VAE, plus the text conditioning of a few prompts computed once;
the text encoders are freed right after. Two kinds of checkpoint load through the same ``from_pretrained`` path:

* a full FLUX folder or Hugging Face id (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``text_encoder_2/``, ``tokenizer_2/``), e.g. ``black-forest-labs/FLUX.1-dev``;
* a *text-encoder-free* folder (``transformer/``, ``vae/`` and ``null_prompt.safetensors`` holding the tensors
  ``prompt_embeds`` (1, L, joint_attention_dim) and ``pooled_prompt_embeds`` (1, pooled_projection_dim)): the
  conditioning is a stored, learned null prompt and text edits are unavailable.

Conventions (BFL reference and diffusers agree): packed latents are (B, h/2 * w/2, 4C) tokens of the scaled VAE
latent ``(mode(E(x)) - shift) * scale``; the velocity ``u(z, t)`` points from data to noise, with t in [0, 1]
(1 = noise), so an Euler step from t to t' is ``z + (t' - t) * u``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxguard.errors import ConfigError, FluxguardError, MissingDependencyError

logger = logging.getLogger(__name__)

NULL_PROMPT_FILE = "null_prompt.safetensors"
# FLUX.1-dev scheduler constants (scheduler/scheduler_config.json and BFL get_schedule).
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) VAE latents -> (B, h/2 * w/2, 4C) tokens (2x2 patchify).

    Local copy of the private ``diffusers.pipelines.flux.pipeline_flux.FluxPipeline._pack_latents`` (checked
    against it in the tests), equal to BFL's ``rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)")``.
    """
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {tuple(latents.shape)}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) tokens -> (B, C, h, w) latents; inverse of :func:`pack_latents`.

    Unlike ``FluxPipeline._unpack_latents`` this takes the *latent* size (pixel size / 8), not the pixel size.
    """
    b, n, c4 = packed.shape
    h2, w2 = latent_height // 2, latent_width // 2
    if n != h2 * w2:
        raise ValueError(f"{n} tokens do not fit a {latent_height}x{latent_width} latent")
    x = packed.view(b, h2, w2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, latent_height, latent_width)


def latent_image_ids(latent_height: int, latent_width: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h/2 * w/2, 3) RoPE position ids of the packed image tokens: [0, row, col] (``_prepare_latent_image_ids``)."""
    h2, w2 = latent_height // 2, latent_width // 2
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def flux_timesteps(num_steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """The FLUX.1-dev schedule: ``num_steps + 1`` times from 1 to 0 (BFL ``get_schedule``).

    ``t = linspace(1, 0, N + 1)`` shifted by ``t' = e^mu / (e^mu + 1/t - 1)`` with mu linear in the number of image
    tokens (0.5 at 256 tokens, 1.15 at 4096). Equals diffusers' FluxPipeline sigmas plus a terminal 0.
    """
    ts = [1.0 - i / num_steps for i in range(num_steps + 1)]
    if not shift:
        return ts
    mu = BASE_SHIFT + (MAX_SHIFT - BASE_SHIFT) * (image_seq_len - BASE_SEQ_LEN) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    out = []
    for t in ts:
        out.append(0.0 if t <= 0 else math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0)))
    return out


@dataclass
class Conditioning:
    """Text conditioning of one prompt: T5 token embeddings + CLIP pooled embedding (batch 1)."""

    prompt_embeds: torch.Tensor  # (1, L, joint_attention_dim)
    pooled_prompt_embeds: torch.Tensor  # (1, pooled_projection_dim)

    @property
    def text_ids(self) -> torch.Tensor:
        return torch.zeros(self.prompt_embeds.shape[1], 3, device=self.prompt_embeds.device,
                           dtype=self.prompt_embeds.dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Conditioning:
        return Conditioning(self.prompt_embeds.to(device=device, dtype=dtype),
                            self.pooled_prompt_embeds.to(device=device, dtype=dtype))


def _require(module: str, feature: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise MissingDependencyError(module.split(".")[0], "flux", feature) from e


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class FluxBackend(nn.Module):
    """FLUX transformer + VAE with cached prompt conditioning.

    Build it with :meth:`from_pretrained`. All model weights are frozen (``requires_grad=False``); gradients reach
    the *latents* through :meth:`decode` and :meth:`velocity`, never the weights.

    Args:
        transformer: a ``diffusers.FluxTransformer2DModel``.
        vae: a ``diffusers.AutoencoderKL`` with ``scaling_factor`` / ``shift_factor`` in its config.
        conditionings: prompt -> :class:`Conditioning`; the key ``None`` holds a stored null prompt.
        text_free: True when the checkpoint has no text encoders (only the stored null prompt is available).
    """

    def __init__(self, transformer: nn.Module, vae: nn.Module, conditionings: dict[str | None, Conditioning],
                 *, text_free: bool = False, name: str = "flux") -> None:
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        self.text_free = text_free
        self.name = name
        self._cond = dict(conditionings)
        for p in self.parameters():
            p.requires_grad_(False)
        self.transformer.eval()
        self.vae.eval()

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        prompts: tuple[str, ...] | list[str] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = False,
        max_sequence_length: int = 512,
        null_prompt: str | Path | None = None,
        text_encoders: bool | None = None,
    ) -> FluxBackend:
        """Load a FLUX checkpoint (Hugging Face id or local folder) and encode ``prompts`` once.

        Args:
            path_or_id: diffusers-layout folder, hub id, or "lite" (the built-in lite models).
            prompts: prompts to encode now; the text encoders are deleted afterwards.
            device: default CUDA when available, else CPU.
            dtype: default bf16 on CUDA, fp32 on CPU.
            offload: keep the transformer in CPU memory and stream its blocks to the GPU (diffusers group
                offloading): fits 24 GB cards at the cost of speed. Text encoders always run one at a time.
            max_sequence_length: T5 tokens (512 for FLUX.1-dev, as in the authors' code).
            null_prompt: a ``null_prompt.safetensors`` file; default ``<folder>/null_prompt.safetensors`` when present.
            text_encoders: force (True) or skip (False) loading the text encoders; default: load them when the
                checkpoint has them, otherwise use the null prompt (text-encoder-free mode).

        Raises:
            FluxguardError: the folder is missing pieces (named in the message).
        """
        from fluxguard.generators.lite_files import diffusers_model_kwargs, resolve_model

        diffusers = _require("diffusers", "the FLUX backend")
        path_or_id = resolve_model(path_or_id)
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        src = str(path_or_id)
        local = Path(src)
        is_local = local.is_dir()
        if not is_local and (src.startswith((".", "/", "~")) or src.count("/") != 1):
            raise FluxguardError("FLUX checkpoint folder not found (and not a Hugging Face id)", path=src)

        def has(sub: str) -> bool:
            return (local / sub).is_dir() if is_local else True

        for sub in ("transformer", "vae"):
            if is_local and not has(sub):
                raise FluxguardError(f"not a FLUX checkpoint: the folder has no {sub}/ subfolder", path=src)
        try:
            kw = diffusers_model_kwargs()
            transformer = diffusers.FluxTransformer2DModel.from_pretrained(src, subfolder="transformer", dtype=dtype,
                                                                           **kw)
            vae = diffusers.AutoencoderKL.from_pretrained(src, subfolder="vae", dtype=dtype, **kw)
        except OSError as e:
            raise FluxguardError(f"cannot load the FLUX transformer/VAE ({e})", path=src) from e

        null_file = Path(null_prompt) if null_prompt is not None else (local / NULL_PROMPT_FILE if is_local else None)
        conds: dict[str | None, Conditioning] = {}
        if null_file is not None and null_file.is_file():
            conds[None] = load_null_prompt(null_file)
        elif null_prompt is not None:
            raise FluxguardError("null-prompt file not found", path=null_prompt)
        if text_encoders is None:
            text_encoders = has("text_encoder") and has("text_encoder_2")
        if text_encoders:
            conds.update(encode_prompts(src, prompts, device=device, dtype=dtype,
                                        max_sequence_length=max_sequence_length))
        elif None not in conds:
            raise FluxguardError(
                f"the checkpoint has no text encoders and no {NULL_PROMPT_FILE}: nothing to condition on", path=src)

        vae.to(device)
        if offload and device.type == "cuda":
            transformer.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                             offload_type="block_level", num_blocks_per_group=1, use_stream=True)
        else:
            transformer.to(device)
        name = local.name if is_local else src
        backend = cls(transformer, vae, conds, text_free=not text_encoders, name=name)
        return backend

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.get("guidance_embeds", False))

    @property
    def num_single_blocks(self) -> int:
        return len(self.transformer.single_transformer_blocks)

    @property
    def prompts(self) -> list[str | None]:
        return list(self._cond)

    def conditioning(self, prompt: str | None) -> Conditioning:
        """The cached conditioning of ``prompt`` (None = the stored null prompt)."""
        if prompt in self._cond:
            return self._cond[prompt].to(self.device, self.dtype)
        if self.text_free:
            raise ConfigError(
                f"this model ({self.name}) has no text encoders, so text prompts such as {prompt!r} cannot be used; "
                "it is conditioned on its stored null prompt only")
        raise ConfigError(f"prompt {prompt!r} was not encoded when the model was loaded (pass it in `prompts=`)")

    # ---------------------------------------------------------------- VAE
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) RGB [0, 1] -> packed latents (B, H/16 * W/16, 64) in float32 (posterior mode)."""
        self._check_size(images)
        x = (images * 2 - 1).to(device=self.device, dtype=self.vae.dtype)
        lat = self.vae.encode(x).latent_dist.mode()
        cfg = self.vae.config
        lat = (lat.float() - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        return pack_latents(lat)

    def decode(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> (B, 3, H, W) RGB in [0, 1], float32, differentiable w.r.t. ``packed``."""
        s = self.vae_scale_factor
        lat = unpack_latents(packed, height // s, width // s)
        cfg = self.vae.config
        lat = lat / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        img = self.vae.decode(lat.to(self.vae.dtype)).sample.float()
        return ((img.clamp(-1, 1) + 1) / 2).clamp(0, 1)

    def _check_size(self, images: torch.Tensor) -> None:
        m = 2 * self.vae_scale_factor
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] % m or images.shape[-2] % m:
            raise ValueError(f"expected (B, 3, H, W) images with H and W multiples of {m}, got {tuple(images.shape)}")

    # ---------------------------------------------------------------- transformer
    def velocity(self, packed: torch.Tensor, t: float, cond: Conditioning, guidance: float,
                 height: int, width: int) -> torch.Tensor:
        """FLUX velocity ``u(z, t)`` for packed latents (B, N, 64) at time t in [0, 1]; returns float32."""
        b = packed.shape[0]
        s = self.vae_scale_factor
        dev, dt = self.device, self.dtype
        emb = cond.prompt_embeds.to(dev, dt)
        pooled = cond.pooled_prompt_embeds.to(dev, dt)
        if emb.shape[0] != b:
            emb, pooled = emb.expand(b, -1, -1), pooled.expand(b, -1)
        g = torch.full((b,), float(guidance), device=dev, dtype=torch.float32) if self.guidance_embeds else None
        out = self.transformer(
            hidden_states=packed.to(dev, dt),
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            timestep=torch.full((b,), float(t), device=dev, dtype=dt),
            img_ids=latent_image_ids(height // s, width // s, dev, dt),
            txt_ids=torch.zeros(emb.shape[1], 3, device=dev, dtype=dt),
            guidance=g,
            return_dict=False,
        )[0]
        return out.float()

    def image_seq_len(self, height: int, width: int) -> int:
        s = 2 * self.vae_scale_factor
        return (height // s) * (width // s)


def load_null_prompt(path: str | Path) -> Conditioning:
    """Read a stored null prompt (``prompt_embeds`` + ``pooled_prompt_embeds``) from a safetensors file."""
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad file
        raise FluxguardError(f"cannot read the null prompt: {e}", path=path) from e
    missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(t)
    if missing:
        raise FluxguardError(f"null-prompt file lacks {sorted(missing)}", path=path)
    pe, pp = t["prompt_embeds"], t["pooled_prompt_embeds"]
    if pe.dim() == 2:
        pe = pe[None]
    if pp.dim() == 1:
        pp = pp[None]
    return Conditioning(pe.float(), pp.float())


def save_null_prompt(path: str | Path, cond: Conditioning) -> None:
    """Write a :class:`Conditioning` as a null-prompt safetensors file (for text-encoder-free checkpoints)."""
    from safetensors.torch import save_file

    save_file({"prompt_embeds": cond.prompt_embeds.detach().contiguous().cpu(),
               "pooled_prompt_embeds": cond.pooled_prompt_embeds.detach().contiguous().cpu()}, str(path))


@torch.no_grad()
def encode_prompts(src: str, prompts: tuple[str, ...] | list[str], *, device: torch.device, dtype: torch.dtype,
                   max_sequence_length: int = 512) -> dict[str | None, Conditioning]:
    """Encode prompts with CLIP (pooled) and T5 (tokens), one encoder on the device at a time, then free both."""
    tf = _require("transformers", "text prompts for FLUX")
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        return {}
    out: dict[str | None, list[torch.Tensor]] = {p: [] for p in prompts}
    tok = tf.CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    enc = tf.CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype).to(device).eval()
    max_len = min(int(tok.model_max_length), 77)
    for p in prompts:
        ids = tok([p], padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
        out[p].append(enc(ids.to(device), output_hidden_states=False).pooler_output.float().cpu())
    del enc
    tok2 = tf.T5TokenizerFast.from_pretrained(src, subfolder="tokenizer_2")
    enc2 = tf.T5EncoderModel.from_pretrained(src, subfolder="text_encoder_2", dtype=dtype).to(device).eval()
    for p in prompts:
        ids = tok2([p], padding="max_length", max_length=max_sequence_length, truncation=True,
                   return_tensors="pt").input_ids
        out[p].insert(0, enc2(ids.to(device), output_hidden_states=False)[0].float().cpu())
    del enc2
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {p: Conditioning(v[0], v[1]) for p, v in out.items()}
