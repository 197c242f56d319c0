"""Stable Diffusion backend: a UNet, a VAE, a DDIM scheduler and one fixed unconditional embedding.

WDP and diffusion purification never use a text prompt: they run the UNet with the empty-prompt embedding (or a
learned replacement of it). So the backend computes that embedding once, with the CLIP text encoder when the model
has one, and frees the encoder; models trained without a text encoder ship the embedding as a tensor instead.

Two folder layouts load through :meth:`SDBackend.from_pretrained`:

* a diffusers Stable Diffusion folder or hub id (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``), e.g. ``stabilityai/stable-diffusion-2-base`` (WDP's model). Needs ``transformers``
  (``pip install 'fluxguard[flux]'``).
* a text-encoder-free folder: ``unet/``, ``vae/``, optionally ``scheduler/``, and ``null_embedding.safetensors``
  holding one (1, L, D) tensor (key ``null_embedding``, or the file's only tensor) with D = the UNet's
  ``cross_attention_dim``. No ``transformers`` needed.

All maths is the deterministic DDIM (eta = 0) of diffusers' :class:`~diffusers.DDIMScheduler`, written out so that
it is differentiable, batched and also runs backwards (inversion).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxguard.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

NULL_EMBEDDING_FILE = "null_embedding.safetensors"
NULL_EMBEDDING_KEY = "null_embedding"

# Stable Diffusion 2 (base) noise schedule; used when a folder has no scheduler/ (text-encoder-free models).
SD2_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _ddim_config(config: Any) -> dict[str, Any]:
    """A scheduler config as DDIM's: a config that does not say ``clip_sample`` (PNDM, Euler...) never clipped,
    whereas DDIM's own default is to clip x0 to [-1, 1], which would distort latents."""
    cfg = dict(config)
    cfg.setdefault("clip_sample", False)
    return cfg


def load_null_embedding(path: str | Path) -> torch.Tensor:
    """Read a stored unconditional embedding: key ``null_embedding`` or the file's single tensor, as (1, L, D)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if NULL_EMBEDDING_KEY in tensors:
        emb = tensors[NULL_EMBEDDING_KEY]
    elif len(tensors) == 1:
        emb = next(iter(tensors.values()))
    else:
        raise ConfigError(f"expected a tensor named {NULL_EMBEDDING_KEY!r} (found {sorted(tensors)})", path=path)
    if emb.dim() == 2:
        emb = emb[None]
    if emb.dim() != 3 or emb.shape[0] != 1:
        raise ConfigError(f"null embedding must be (1, L, D), got {tuple(emb.shape)}", path=path)
    return emb


def save_null_embedding(embedding: torch.Tensor, path: str | Path) -> None:
    """Store a (1, L, D) unconditional embedding in the layout :func:`load_null_embedding` reads."""
    from safetensors.torch import save_file

    save_file({NULL_EMBEDDING_KEY: embedding.detach().float().cpu().contiguous()}, str(path))


def empty_prompt_embedding(
    model: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32, **load_kwargs: Any
) -> torch.Tensor:
    """The CLIP text encoder's output for the empty prompt (padded to the tokenizer's length), as (1, L, D).

    The encoder is loaded, run once and dropped, so it holds no memory afterwards.
    """
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise MissingDependencyError("transformers", "flux", f"the text encoder of {model}") from exc
    tok_kwargs = {k: v for k, v in load_kwargs.items() if k != "variant"}
    tokenizer = CLIPTokenizer.from_pretrained(str(model), subfolder="tokenizer", **tok_kwargs)
    encoder = CLIPTextModel.from_pretrained(str(model), subfolder="text_encoder", dtype=dtype, **load_kwargs)
    encoder = encoder.to(device).eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = encoder(ids.to(device))[0]
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return emb.detach()


@dataclass(eq=False)
class SDBackend:
    """A frozen SD-style latent diffusion model used without prompts.

    Attributes:
        unet: ``UNet2DConditionModel`` (eval, no grad on its parameters).
        vae: ``AutoencoderKL``.
        scheduler: a ``DDIMScheduler`` (its noise schedule and timestep spacing are used, not its ``step``).
        null_embedding: (1, L, D) unconditional embedding (empty prompt or stored).
        source: where the weights came from (for reports).
    """

    unet: Any
    vae: Any
    scheduler: Any
    null_embedding: torch.Tensor
    source: str = "<in memory>"

    def __post_init__(self) -> None:
        for m in (self.unet, self.vae):
            m.eval()
            m.requires_grad_(False)
        cad = getattr(self.unet.config, "cross_attention_dim", None)
        cad = cad[0] if isinstance(cad, list | tuple) else cad
        if cad is not None and int(self.null_embedding.shape[-1]) != int(cad):
            raise ConfigError(
                f"null embedding width {self.null_embedding.shape[-1]} != UNet cross_attention_dim {cad}",
                path=self.source if self.source != "<in memory>" else None,
            )
        self.null_embedding = self.null_embedding.to(self.device, self.dtype)
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"unsupported prediction_type {self.scheduler.config.prediction_type!r}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_components(
        cls, unet: Any, vae: Any, null_embedding: torch.Tensor, scheduler: Any = None, *, source: str = "<in memory>"
    ) -> SDBackend:
        """Wrap already-built models (``scheduler`` None: the SD2 DDIM schedule)."""
        from diffusers import DDIMScheduler

        if scheduler is None:
            scheduler = DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG)
        elif not isinstance(scheduler, DDIMScheduler):
            scheduler = DDIMScheduler.from_config(_ddim_config(scheduler.config))
        return cls(unet=unet, vae=vae, scheduler=scheduler, null_embedding=null_embedding, source=source)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        *,
        device: str | torch.device | None = "auto",
        dtype: torch.dtype = torch.float32,
        null_embedding: torch.Tensor | str | Path | None = None,
        **load_kwargs: Any,
    ) -> SDBackend:
        """Load a diffusers SD folder or hub id (see the module docstring for the two layouts).

        Args:
            model: hub id (e.g. ``stabilityai/stable-diffusion-2-base``), local folder, or "lite" (built in).
            device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
            dtype: weights dtype (float32 as in the paper; float16/bfloat16 on GPUs to save time).
            null_embedding: override the unconditional embedding (tensor or safetensors file); skips the text
                encoder entirely.
            **load_kwargs: passed to every ``from_pretrained`` (``revision``, ``variant``, ``local_files_only``...).
        """
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        from fluxguard.generators.lite_files import diffusers_model_kwargs, resolve_model

        model = resolve_model(model)
        dev = _resolve_device(device)
        folder = Path(model) if Path(str(model)).is_dir() else None
        if folder is None and str(model).startswith((".", "/", "~")):
            raise ConfigError("no such model folder", path=model)
        try:
            model_kwargs = {**diffusers_model_kwargs(), **load_kwargs}
            unet = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet", dtype=dtype, **model_kwargs)
            vae = AutoencoderKL.from_pretrained(str(model), subfolder="vae", dtype=dtype, **model_kwargs)
        except OSError as exc:
            raise ConfigError(f"cannot load the UNet/VAE ({exc})", path=model) from exc
        if folder is None or (folder / "scheduler").is_dir():
            sched_cfg = DDIMScheduler.load_config(str(model), subfolder="scheduler", **load_kwargs)
        else:
            sched_cfg = dict(SD2_SCHEDULER_CONFIG)
        scheduler = DDIMScheduler.from_config(_ddim_config(sched_cfg))

        if isinstance(null_embedding, torch.Tensor):
            emb = null_embedding
        elif null_embedding is not None:
            emb = load_null_embedding(null_embedding)
        elif folder is not None and (folder / NULL_EMBEDDING_FILE).is_file():
            emb = load_null_embedding(folder / NULL_EMBEDDING_FILE)
        elif folder is not None and not (folder / "text_encoder").is_dir():
            raise ConfigError(f"needs text_encoder/ + tokenizer/ or {NULL_EMBEDDING_FILE}", path=folder)
        else:
            emb = empty_prompt_embedding(model, device=dev, dtype=dtype, **load_kwargs)
        log.info("loaded SD backend from %s (%s, %s)", model, dev, dtype)
        return cls(unet=unet.to(dev), vae=vae.to(dev), scheduler=scheduler, null_embedding=emb, source=str(model))

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the text-encoder-free layout (``unet/``, ``vae/``, ``scheduler/``, the null embedding)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.scheduler.save_pretrained(folder / "scheduler")
        save_null_embedding(self.null_embedding, folder / NULL_EMBEDDING_FILE)
        return folder

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def uncond(self, batch: int) -> torch.Tensor:
        """The (batch, L, D) unconditional embedding."""
        return self.null_embedding.expand(batch, -1, -1)

    # ------------------------------------------------------------------ VAE
    def encode(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> scaled latents. ``sample``: draw from the posterior, else its mode."""
        x = images.to(self.device, self.dtype) * 2.0 - 1.0
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def decode(self, latents: torch.Tensor, *, clamp: bool = False) -> torch.Tensor:
        """Scaled latents -> images in [0, 1] (differentiable; unclamped unless ``clamp``)."""
        z = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        x = self.vae.decode(z).sample.float() * 0.5 + 0.5
        return x.clamp(0.0, 1.0) if clamp else x

    # ------------------------------------------------------------------ DDIM maths
    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The DDIM timesteps for ``num_steps`` steps, descending (SD2, 20 steps: 951, 901, ..., 51, 1)."""
        self.scheduler.set_timesteps(num_steps)
        return self.scheduler.timesteps.clone()

    def step_size(self, num_steps: int) -> int:
        return self.num_train_timesteps // num_steps

    def alpha_bar(self, t: int) -> torch.Tensor:
        """Cumulative alpha at integer timestep ``t`` (negative ``t``: the scheduler's final alpha)."""
        t = int(t)
        a = self.scheduler.alphas_cumprod[t] if t >= 0 else self.scheduler.final_alpha_cumprod
        return a.to(torch.float32)

    def predict_noise(self, latents: torch.Tensor, t: int | torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction at ``t`` converted to epsilon (fp32), whatever the model's prediction type."""
        out = self.unet(latents.to(self.dtype), t, encoder_hidden_states=embedding.to(self.dtype)).sample.float()
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return out
        a = self.alpha_bar(int(t))
        z = latents.float()
        if kind == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * z
        return (z - a.sqrt() * out) / (1 - a).sqrt()  # "sample": out is x0

    def ddim_step(self, latents: torch.Tensor, eps: torch.Tensor, t: int, t_to: int) -> torch.Tensor:
        """Deterministic DDIM move of ``latents`` (at ``t``) to ``t_to`` given ``eps``; ``t_to > t`` inverts.

        Same result as ``DDIMScheduler.step(eta=0)`` for ``t_to = t - step``, including ``clip_sample``.
        """
        a_t, a_to = self.alpha_bar(t), self.alpha_bar(t_to)
        x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if t_to < t and self.scheduler.config.clip_sample:
            r = float(self.scheduler.config.clip_sample_range)
            x0 = x0.clamp(-r, r)
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def load_backend(model: str | Path | SDBackend, **kwargs: Any) -> SDBackend:
    """An :class:`SDBackend` from a backend (returned as is), a hub id or a folder."""
    return model if isinstance(model, SDBackend) else SDBackend.from_pretrained(model, **kwargs)


# Architectures for tests and timing (random weights). "sd2-base" is stabilityai/stable-diffusion-2-base's UNet and
# VAE (865.9 M + 83.7 M parameters); "tiny" runs in milliseconds on a CPU.
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": (2, 4),
            "use_linear_projection": True,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (8, 8, 8, 8),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "scaling_factor": 0.18215,
        },
        "null_embedding": {"tokens": 77, "dim": 32},
    },
    "sd2-base": {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": 4,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        },
        "null_embedding": {"tokens": 77, "dim": 1024},
    },
}


def random_backend(
    arch: str = "tiny",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SDBackend:
    """An :class:`SDBackend` with random weights of a known architecture (``"tiny"`` or ``"sd2-base"``).

    For tests and benchmarks only: it generates noise, not faces. Large models are built directly on ``device``
    in ``dtype`` (no float32 CPU copy).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    dev = _resolve_device(device)
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with dev:
            unet = UNet2DConditionModel(**spec["unet"])
            vae = AutoencoderKL(**spec["vae"])
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator().manual_seed(seed + 1)
    emb = torch.randn(1, spec["null_embedding"]["tokens"], spec["null_embedding"]["dim"], generator=g)
    return SDBackend.from_components(unet, vae, emb.to(dev, dtype), source=f"random:{arch}")
