"""WDP: "Enhancing Facial Privacy Protection via Weakening Diffusion Purification" (Salar et al., CVPR 2025).

Re-implemented from the authors' code (``parham1998/Facial-Privacy-Protection``) on modern diffusers:

1. Encode the face with the SD VAE (a posterior sample) and DDIM-invert it with the empty-prompt embedding, only as
   far as the regenerated steps need (the authors invert all 19 steps and use the last 3).
2. Learn one unconditional embedding per regenerated timestep (null-text optimisation): a single AdamW on one
   embedding that is carried from timestep to timestep, snapshotting it after each. With them the few-step
   regeneration reconstructs the face, which is what "weakens" purification.
3. Optimise the starting latent with AdamW through the regenerated steps and the VAE decoder:
   ``lambda_adv * sum_m L_id,m + L_sa``, where ``L_sa`` is the MSE between the self-attention maps of the adversarial
   branch and of the clean branch on every self-attention layer (``attn1``) at every regenerated step, recorded by a
   custom attention processor while both branches run as one batch.

Natural by construction (our change): the protected face is the original plus the change the attack makes to the
regeneration, ``x + shape(D(regen(z_adv)) - D(regen(z_init)))``, the change confined to the face mask, bounded per
pixel by the visibility budget and free of colour cast (:func:`fluxguard.losses.visibility.shape_residual`); the
adversarial iterations optimise that composition. What the VAE and the few regenerated steps cannot reproduce never
reaches the output, and with no adversarial iteration the output is the input.

Deviations from the authors' code (numerically equivalent unless stated): the FR models cut their own aligned
crops from the portrait crop instead of an MTCNN box; the pointless classifier-free-guidance doubling of the batch is
dropped; only the adversarial branch is decoded; self-attention is computed with ``Attention.get_attention_scores``
(baddbmm + softmax) rather than diffusers 0.9's einsum, a float-rounding difference; the CLIP "makeup" loss
(``makeup_weight``, 0 by default in the paper) is not implemented. See :class:`WDPConfig` for every constant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from fluxguard.errors import ConfigError
from fluxguard.generators.sd import SDBackend
from fluxguard.losses.identity import IdentityLoss
from fluxguard.losses.visibility import shape_residual
from fluxguard.methods.base import MethodResult, Mode, ProgressFn, ProtectionMethod
from fluxguard.recognition.base import FaceRecognizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class WDPConfig:
    """Every constant of WDP, with the paper's defaults (``main.py`` of the authors' code).

    Attributes:
        model: "lite" (built in), an SD model id or a folder (:meth:`SDBackend.from_pretrained`); the paper
            uses SD2-base at 256 px.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        dtype: model weights dtype; the paper runs float32. Optimised tensors always stay float32.
        crop_size: side of the aligned portrait crops (``image_size``, 256).
        diffusion_steps: DDIM schedule length (20: timesteps 951, 901, ..., 1).
        start_step: first regenerated step of the schedule (17: the last 3 steps, t = 101, 51, 1).
        null_optimization_steps: AdamW iterations per regenerated timestep for the unconditional embedding (20).
        null_lr: its learning rate (0.1).
        prot_steps: adversarial AdamW iterations on the starting latent (30).
        adv_lr: their learning rate (0.01).
        lambda_adv: weight of the identity loss summed over the surrogate models (``adv_optim_weight``, 0.003).
        self_attn_weight: weight of the self-attention structure loss (1: the authors add it unweighted).
        weight_decay: AdamW weight decay of both optimisers (0.01, torch's default, as the authors leave it).
        sample_posterior: encode with a VAE posterior sample (authors, seeded 8888) instead of its mode.
        seed: seed of the posterior sample when ``protect_faces`` gets no generator (8888 as the authors).
        consistent_timesteps: False reproduces the authors' schedule, which regenerates the latent inverted to
            t = 151 starting with the UNet at t = 101 (one step off; the learned embeddings absorb it). True
            regenerates 151 -> 101 -> 51 -> 1, exactly undoing the inversion.
        cache_reference_branch: run the clean branch once (no grad) and keep its self-attention maps instead of
            re-running it in every adversarial iteration: same loss, about half the compute, more memory.
            False is the authors' batched two-branch forward.
    """

    model: str = "lite"  # built in; the paper: stabilityai/stable-diffusion-2-base
    device: str = "auto"
    dtype: str = "float32"
    crop_size: int = 256
    diffusion_steps: int = 20
    start_step: int = 17
    null_optimization_steps: int = 20
    null_lr: float = 0.1
    prot_steps: int = 30
    adv_lr: float = 0.01
    lambda_adv: float = 0.003
    self_attn_weight: float = 1.0
    weight_decay: float = 0.01
    sample_posterior: bool = True
    seed: int = 8888
    consistent_timesteps: bool = False
    cache_reference_branch: bool = False

    def validate(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.diffusion_steps < 2 or not 1 <= self.start_step < self.diffusion_steps:
            raise ConfigError(
                f"need 1 <= start_step < diffusion_steps (got start_step={self.start_step}, "
                f"diffusion_steps={self.diffusion_steps})"
            )
        for name in ("null_optimization_steps", "prot_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.crop_size % 8:
            raise ConfigError(f"crop_size must be a multiple of 8, got {self.crop_size}")

    @property
    def regenerated_steps(self) -> int:
        return self.diffusion_steps - self.start_step


# ---------------------------------------------------------------------------------------------------------------
# Self-attention structure loss


class SelfAttentionProbe:
    """Accumulates the per-face self-attention MSE between the adversarial and the clean branch.

    Pair mode (default): each UNet batch is ``[clean_1..clean_B, adv_1..adv_B]``. Reference mode: ``store()`` keeps
    the clean branch's maps from one pass, later passes (adversarial branch only, batch B) are compared with them in
    call order.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.loss: torch.Tensor | None = None
        self.active = True
        self.reference: list[torch.Tensor] | None = None
        self._storing = False
        self._cursor = 0

    def reset(self) -> None:
        self.loss = None
        self._cursor = 0

    @contextmanager
    def store(self) -> Iterator[None]:
        """Record the clean branch's maps (batch B) during the enclosed pass."""
        self.reference, self._storing = [], True
        try:
            yield
        finally:
            self._storing = False

    def observe(self, probs: torch.Tensor, heads: int) -> None:
        """Called by the processors with (batch * heads, q, k) attention probabilities."""
        if not self.active:
            return
        b = self.batch
        if self._storing:
            assert self.reference is not None
            self.reference.append(probs.detach().view(b, heads, *probs.shape[1:]))
            return
        if self.reference is not None:
            ref = self.reference[self._cursor]
            self._cursor += 1
            adv = probs.view(b, heads, *probs.shape[1:])
        else:
            both = probs.view(2, b, heads, *probs.shape[1:])
            ref, adv = both[0].detach(), both[1]
        term = (adv.float() - ref.float()).pow(2).flatten(1).mean(1)
        self.loss = term if self.loss is None else self.loss + term

    def value(self, device: torch.device) -> torch.Tensor:
        return self.loss if self.loss is not None else torch.zeros(self.batch, device=device)


class RecordingAttnProcessor:
    """diffusers' plain ``AttnProcessor`` maths, reporting the softmax probabilities to a :class:`SelfAttentionProbe`.

    The default SDPA processor never materialises the probabilities, so self-attention layers get this one.
    """

    def __init__(self, probe: SelfAttentionProbe) -> None:
        self.probe = probe

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        self.probe.observe(probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def self_attention_probe(unet: Any, probe: SelfAttentionProbe) -> Iterator[SelfAttentionProbe]:
    """Install :class:`RecordingAttnProcessor` on every ``attn1`` (self-attention) layer; restore on exit."""
    original = dict(unet.attn_processors)
    # set_attn_processor pops from the dict it gets, so it always receives a fresh copy.
    unet.set_attn_processor(
        {k: RecordingAttnProcessor(probe) if k.endswith("attn1.processor") else v for k, v in original.items()}
    )
    try:
        yield probe
    finally:
        unet.set_attn_processor(dict(original))


# ---------------------------------------------------------------------------------------------------------------
# Inversion, null-text optimisation, regeneration


def schedule(backend: SDBackend, config: WDPConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(inversion moves, regeneration moves) as (t_from, t_to) pairs.

    SD2, 20 steps, start 17: inversion 1->51->101->151; regeneration (authors) 101->51, 51->1, 1->-49 (the final
    alpha), or (consistent) 151->101, 101->51, 51->1.
    """
    ts = [int(t) for t in backend.timesteps(config.diffusion_steps)]
    step = backend.step_size(config.diffusion_steps)
    n, k = config.diffusion_steps, config.regenerated_steps
    inversion = [(ts[n - 1 - i], ts[n - 1 - i] + step) for i in range(k)]
    if config.consistent_timesteps:
        regeneration = [(ts[i - 1], ts[i]) for i in range(config.start_step, n)]
    else:
        regeneration = [(ts[i], ts[i] - step) for i in range(config.start_step, n)]
    return inversion, regeneration


@torch.no_grad()
def ddim_inversion(
    backend: SDBackend, z0: torch.Tensor, moves: Sequence[tuple[int, int]], embedding: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """DDIM inversion with the unconditional embedding: ``[z0, z1, ..., z_k]``, increasingly noisy."""
    emb = backend.uncond(z0.shape[0]) if embedding is None else embedding
    latents = [z0.float()]
    for t, t_next in moves:
        z = latents[-1]
        latents.append(backend.ddim_step(z, backend.predict_noise(z, t, emb), t, t_next))
    return latents


def regenerate(
    backend: SDBackend, z: torch.Tensor, moves: Sequence[tuple[int, int]], embeddings: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Run the regeneration moves from ``z`` with one (B, L, D) embedding per move (differentiable)."""
    for (t, t_to), emb in zip(moves, embeddings, strict=True):
        z = backend.ddim_step(z, backend.predict_noise(z, t, emb), t, t_to)
    return z


def _face_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error per face."""
    return F.mse_loss(a, b, reduction="none").flatten(1).mean(1)


def learn_null_embeddings(
    backend: SDBackend,
    inverted: Sequence[torch.Tensor],
    moves: Sequence[tuple[int, int]],
    *,
    steps: int,
    lr: float,
    weight_decay: float = 0.01,
    progress: ProgressFn | None = None,
) -> tuple[list[torch.Tensor], list[dict[str, float]]]:
    """Null-text optimisation as the authors do it: one AdamW on one embedding per face, carried across timesteps.

    Args:
        inverted: ``[z0, ..., z_k]`` from :func:`ddim_inversion`; regeneration starts at ``z_k`` and move ``i``
            should land on ``z_{k-1-i}``.
        moves: the ``k`` regeneration moves.

    Returns:
        One (B, L, D) embedding per move (a snapshot after that move's iterations) and the per-iteration losses.
    """
    k = len(moves)
    z = inverted[k].detach()
    batch = z.shape[0]
    emb = backend.uncond(batch).detach().float().clone().requires_grad_(True)
    opt = torch.optim.AdamW([emb], lr=lr, weight_decay=weight_decay)
    snapshots: list[torch.Tensor] = []
    history: list[dict[str, float]] = []
    total, done = k * steps, 0
    for i, (t, t_to) in enumerate(moves):
        target = inverted[k - 1 - i].detach()
        for j in range(steps):
            out = backend.ddim_step(z, backend.predict_noise(z, t, emb), t, t_to)
            per_face = _face_mse(out, target)
            opt.zero_grad(set_to_none=True)
            per_face.sum().backward()  # faces are independent: summing keeps each face's AdamW update its own
            opt.step()
            history.append({"timestep": float(t), "iteration": float(j), "mse": per_face.mean().item()})
            done += 1
            if progress:
                progress("null-text", done, total)
        with torch.no_grad():
            z = backend.ddim_step(z, backend.predict_noise(z, t, emb), t, t_to)
            snapshots.append(emb.detach().clone())
    return snapshots, history


# ---------------------------------------------------------------------------------------------------------------
# The method


class WDP(ProtectionMethod):
    """Weakening-diffusion-purification protection on aligned portrait crops.

    Args:
        recognizers: surrogate FR models; the identity loss is *summed* over them as in the paper.
        mode: dodging (the paper's obfuscation: away from the source identity; with a ``target`` crop also towards
            it, the authors' ``(1 - cos(x, tar)) - (1 - cos(x, src))``) or impersonation (``1 - cos(x, tar)``).
        config: :class:`WDPConfig`; keyword overrides are applied on top (``WDP(frs, prot_steps=10)``).
        backend: an already-loaded :class:`SDBackend` (else ``config.model`` is loaded on first use).
    """

    name: ClassVar[str] = "wdp"
    crop_size: int = 256
    config_class = WDPConfig
    # Each strength is a visibility budget (the same for every method); lambda_adv and the 30 iterations stay the
    # paper's.
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "low": {"budget": "low"},
        "medium": {"budget": "medium"},
        "high": {"budget": "high"},
    }

    def __init__(
        self,
        recognizers: Sequence[FaceRecognizer],
        *,
        mode: Mode | str = Mode.DODGE,
        config: WDPConfig | None = None,
        backend: SDBackend | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(recognizers, mode=mode, config=config, **overrides)
        self.crop_size = self.config.crop_size
        self._backend = backend

    @property
    def backend(self) -> SDBackend:
        if self._backend is None:
            self._backend = SDBackend.from_pretrained(
                self.config.model, device=self.config.device, dtype=_DTYPES[self.config.dtype]
            )
        return self._backend

    def params(self) -> dict[str, Any]:
        out = super().params()
        if self._backend is not None:
            out["model"] = self._backend.source
        return out

    def check_target(self, target: torch.Tensor | None) -> None:
        """Impersonation needs a target; dodging may take one as a guide identity (the authors' obfuscation)."""
        if self.mode is Mode.IMPERSONATE and target is None:
            raise ConfigError("impersonation needs a target face")

    def _check_inputs(self, crops: torch.Tensor, target: torch.Tensor | None) -> None:
        s = self.crop_size
        if crops.dim() != 4 or tuple(crops.shape[1:]) != (3, s, s):
            raise ConfigError(f"WDP expects (B, 3, {s}, {s}) crops, got {tuple(crops.shape)}")
        if self.mode is Mode.IMPERSONATE and target is None:
            raise ConfigError("impersonation needs a target face")
        if target is not None:
            if target.dim() != 4 or tuple(target.shape[1:]) != (3, s, s) or target.shape[0] not in (1, crops.shape[0]):
                raise ConfigError(f"target must be (1 or B, 3, {s}, {s}), got {tuple(target.shape)}")
        vsf = self.backend.vae_scale_factor
        if s % vsf:
            raise ConfigError(f"crop_size {s} is not a multiple of the VAE scale factor {vsf}")

    @torch.enable_grad()
    def protect_faces(
        self,
        crops: torch.Tensor,
        *,
        masks: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
        landmarks: torch.Tensor | None = None,
    ) -> MethodResult:
        """Protect (B, 3, S, S) aligned portrait crops in [0, 1]; see the class docstring for the modes.

        ``history`` has one entry per adversarial iteration (``loss``, ``identity_loss`` = the sum over models
        before ``lambda_adv``, ``self_attn_loss``, ``cos/<model>`` = cosine to the reference identity (the target
        when impersonating, else the source), all means over faces, measured before that iteration's update).
        ``info`` carries the null-text losses, the timesteps, the final similarities and the stage timings.
        """
        cfg = self.config
        if landmarks is not None:
            raise ConfigError("wdp works on aligned portrait crops; it takes no landmarks")
        self._check_inputs(crops, target)
        backend = self.backend
        dev = backend.device
        for r in self.recognizers:  # the identity loss runs on the decoder's output, on the model's device
            r.to(dev)
        crops = crops.detach().to(dev, torch.float32)
        target = None if target is None else target.detach().to(dev, torch.float32)
        m = torch.ones_like(crops[:, :1]) if masks is None else masks.detach().to(dev, torch.float32)
        bound = self.change_bound(crops, m)
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed)
        b = crops.shape[0]
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        inv_moves, regen_moves = schedule(backend, cfg)
        with torch.no_grad():
            z0 = backend.encode(crops, generator=generator, sample=cfg.sample_posterior)
        inverted = ddim_inversion(backend, z0, inv_moves)
        if progress:
            progress("inversion", len(inv_moves), len(inv_moves))
        timings["inversion_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        embeddings, null_history = learn_null_embeddings(
            backend,
            inverted,
            regen_moves,
            steps=cfg.null_optimization_steps,
            lr=cfg.null_lr,
            weight_decay=cfg.weight_decay,
            progress=progress,
        )
        timings["null_text_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if self.mode is Mode.IMPERSONATE:
            ident = IdentityLoss(self.recognizers, crops, target, reduction="sum")
        else:
            ident = IdentityLoss(self.recognizers, crops, None, reduction="sum", guide=target)
        names = ident.names()
        z_init = inverted[-1].detach()
        z_adv = z_init.clone().requires_grad_(True)
        opt = torch.optim.AdamW([z_adv], lr=cfg.adv_lr, weight_decay=cfg.weight_decay)
        probe = SelfAttentionProbe(b)
        pair_embs = [torch.cat([e, e]) for e in embeddings]
        history: list[dict[str, float]] = []
        with self_attention_probe(backend.unet, probe):
            with torch.no_grad():  # what the pipeline gives without the attack: the change is measured from it
                probe.active = False
                x_rec = backend.decode(regenerate(backend, z_init, regen_moves, embeddings))
                probe.active = True
            if cfg.cache_reference_branch:
                with torch.no_grad(), probe.store():
                    regenerate(backend, z_init, regen_moves, embeddings)
            for it in range(cfg.prot_steps):
                probe.reset()
                if cfg.cache_reference_branch:
                    z = regenerate(backend, z_adv, regen_moves, embeddings)
                else:
                    z = regenerate(backend, torch.cat([z_init, z_adv]), regen_moves, pair_embs)[b:]
                image = (crops + shape_residual(backend.decode(z) - x_rec, m, bound, soft=True)).clamp(0, 1)
                embs = ident.embeddings(image)
                cos = ident.cosines(embs).detach()  # (M, B)
                id_loss = ident.terms(embs).sum(0)
                sa_loss = probe.value(dev)
                per_face = cfg.lambda_adv * id_loss + cfg.self_attn_weight * sa_loss
                opt.zero_grad(set_to_none=True)
                per_face.sum().backward()
                opt.step()
                entry = {
                    "step": float(it),
                    "loss": per_face.mean().item(),
                    "identity_loss": id_loss.mean().item(),
                    "self_attn_loss": sa_loss.mean().item(),
                }
                entry.update({f"cos/{n}": v.mean().item() for n, v in zip(names, cos, strict=True)})
                history.append(entry)
                if progress:
                    progress("adversarial", it + 1, cfg.prot_steps)
            probe.active = False
            with torch.no_grad():
                adv = backend.decode(regenerate(backend, z_adv.detach(), regen_moves, embeddings))
                out = (crops + shape_residual(adv - x_rec, m, bound, soft=True)).clamp(0, 1)
        timings["adversarial_s"] = time.perf_counter() - t0

        with torch.no_grad():
            final = {n: [float(v) for v in s] for n, s in zip(names, ident.similarities(out), strict=True)}
        last_null_iteration = cfg.null_optimization_steps - 1
        info = {
            "inversion_timesteps": [list(m) for m in inv_moves],
            "regeneration_timesteps": [list(m) for m in regen_moves],
            "null_text_history": null_history,
            "null_text_last_mse": [h["mse"] for h in null_history if h["iteration"] == last_null_iteration],
            "final_similarity": final,
            "latent_change_rms": float((z_adv.detach() - z_init).pow(2).mean().sqrt()),
            "timings": timings,
            "params": self.params(),
        }
        return MethodResult(crops=out.detach().float().cpu(), history=history, info=info, masks=m.cpu())
