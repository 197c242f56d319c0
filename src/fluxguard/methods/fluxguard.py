"""Flux-Guard: latent adversarial face editing on FLUX rectified flow (re-implemented from the authors' code).

Paper: Wang, Wang, Zhang, Liu, "Flux-Guard" (arXiv 2606.17606; the repository now calls it "PostFace").
Threat model: make FR models fail to match (dodging) or match a chosen target (impersonation), by editing the
face with a text prompt and optimising the last denoising latents against a white-box FR ensemble.

Per aligned portrait crop (``design/methods.md`` §2.4):

1. RF-Solver 2nd-order (midpoint) inversion of the VAE latent with the source prompt at guidance 1.0, keeping
   every velocity and, for the last ``T_inj`` inversion steps, the attention *values* of the late single-stream
   blocks (20..37 of 38).
2. Generation with the edit prompt at guidance 5.5 from the inverted noise: the stored values replace the
   model's for the first ``T_inj`` steps ("Structuring"); for steps 5..19 the velocity outside the edit mask is
   the inversion's (``v = M v + (1 - M) v_inv``, "Detailing").
3. From ``attack_start`` (20 of 25) a clean and an adversarial branch: after each step the adversarial latent is
   optimised with Adam (10 steps, lr 0.02) through the VAE decoder, the perceptual loss and the FR ensemble, with
   ``L = w_id L_id + 0.5 L_p`` and ``w_id = w_min + (w_max - w_min) / (1 + exp(k (L_p - tau)))`` recomputed at
   every Adam step from the perceptual distance to the clean branch.

Natural by construction (our change to the authors' pipeline): the protected face is the original plus what the
attack and the edit changed, ``x + M_edit (G(z_clean) - G(z_rec)) + shape(G(z_adv) - G(z_clean))``, where ``z_rec``
is the same pipeline without the edit (the source prompt at the inversion guidance) and ``shape`` confines the
adversarial change to the face mask, bounds it per pixel by the visibility budget (a multiple of each pixel's JND)
and removes any colour cast (:func:`fluxguard.losses.visibility.shape_residual`). The Adam steps optimise exactly
that composition, and the perceptual term of the adaptive weight is, by default, how much of the budget the change
uses (``perceptual="jnd"``; the paper's VGG19 loss with ``vgg_weights``). What the generator cannot reconstruct
(colour, skin detail, hair) stays the original's; with the adversarial stage and the edit off the output is the
input, bit for bit.

Quirks of the released code are flags (``FluxGuardConfig``): ``fusion_index`` ("as_released" reads inversion
velocities in inversion order, "time_aligned" at the matching time), ``share_clean_branch`` (the released code
computes the two bit-identical branches separately until the attack starts), ``adaptive_weight``. Differences we
chose: the ODE state is kept in float32 (the released code rounds latents to bf16 between steps); the 5 FR
landmarks of the aligned crop are used so every FR model cuts its own crop (the released code resizes the whole
512 image; the pipeline's ``no_align`` option reproduces that). The method draws no random numbers: the same
input gives the same output, and ``generator`` is accepted for the common interface only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from fluxguard.errors import ConfigError
from fluxguard.losses.identity import IdentityLoss
from fluxguard.losses.perceptual import adaptive_id_weight, perceptual_loss
from fluxguard.losses.visibility import budget_usage, shape_residual
from fluxguard.methods.base import MethodResult, Mode, ProgressFn, ProtectionMethod
from fluxguard.methods.v_injection import ValueBank, VInjection, v_injection_blocks
from fluxguard.recognition.base import FaceRecognizer

logger = logging.getLogger(__name__)

PAPER_SOURCE_PROMPT = "A person"
PAPER_EDIT_PROMPT = "A person wearing red lipstick and red-purple hair"
FUSION_INDEX = ("as_released", "time_aligned")


@dataclass
class FluxGuardConfig:
    """Every constant of the authors' code, with their defaults (``design/methods.md`` §2.3).

    Prompts: ``source_prompt=None`` means "A person" (or the stored null prompt of a text-encoder-free model);
    ``edit_prompt=None`` means the paper's edit prompt on a model with text encoders and no edit on one without;
    ``edit_prompt=""`` asks for no edit (empty mask: the face is reconstructed and only the adversarial stage
    changes it).
    """

    model: str = "lite"  # "lite" (built in, CPU-sized), a Hugging Face id (black-forest-labs/FLUX.1-dev) or a folder
    # None: the schedule of the model (PAPER_SCHEDULE for FLUX, LITE_SCHEDULE for the lite model), see resolved()
    crop_size: int | None = None
    num_steps: int | None = None  # N
    guidance: float = 5.5  # generation
    inversion_guidance: float = 1.0
    source_prompt: str | None = None
    edit_prompt: str | None = None
    max_sequence_length: int = 512  # T5 tokens
    # Structuring: V injection
    inject_steps: int | None = None  # None: the authors' rule below
    inject_small: int = 3  # T_inj when the edit mask covers < inject_area_threshold % of the crop
    inject_large: int = 5
    inject_area_threshold: float = 10.0
    v_inject_from_block: int = 20  # first single-stream block whose V is replaced (of v_inject_reference_blocks)
    v_inject_reference_blocks: int = 38  # FLUX.1-dev depth; other depths scale the start proportionally
    # Detailing: mask-guided velocity fusion on steps [fusion_start, fusion_end)
    fusion_start: int | None = None
    fusion_end: int | None = None
    fusion_index: str = "as_released"
    mask_blur_sigma: float = 1.0
    # adversarial stage
    attack_start: int | None = None
    adam_steps: int = 10
    adam_lr: float = 0.02
    perceptual_weight: float = 0.5
    lp_limit: float = 0.3  # tau, in VGG19 relu3_4 MSE units (the SSIM substitute reports in those units)
    k: float = 20.0
    w_min: float = 0.05
    w_max: float = 1.0
    adaptive_weight: bool = True
    fixed_id_weight: float = 1.0  # used when adaptive_weight is False
    share_clean_branch: bool = True
    # L_p of the adaptive weight: "jnd" = share of the visibility budget the change uses (no weights needed), "vgg" =
    # the paper's VGG19 relu3_4 MSE (needs vgg_weights), "ssim" = the multi-scale SSIM substitute; None: "vgg" when
    # vgg_weights is given, else "jnd"
    perceptual: str | None = None
    jnd_midpoint: float = 0.5  # "jnd": budget usage (mean of (change / bound)^2 over the mask) where w_id halves
    # the regenerated change is multiplied by this before it is shaped into the budget (1: as generated); the
    # generator's change is smooth and small, so a gain lets it fill the per-pixel bound as pixel noise does
    change_gain: float = 1.0
    vgg_weights: str | None = None  # torchvision VGG19 IMAGENET1K_V1 state dict -> the paper's L_p
    ssim_tau: float = 0.05  # "ssim": SSIM distance where w_id halves (see fluxguard.losses.perceptual)
    # resources
    device: str | None = None
    offload: bool = False  # stream transformer blocks from CPU memory (GPUs with < ~40 GB)
    store_v_on_cpu: bool = False  # keep the injected V tensors (~1.7 GB at 512, ~5 GB at 1024) in CPU memory
    vae_checkpointing: bool = False  # recompute VAE decoder activations in the backward pass (less memory)

    def resolved(self, lite: bool | None = None) -> FluxGuardConfig:
        """A copy with every ``None`` of the schedule filled from the model's schedule (lite: ``is_lite(model)``)."""
        from fluxguard.generators.lite import is_lite

        base = LITE_SCHEDULE if (is_lite(self.model) if lite is None else lite) else PAPER_SCHEDULE
        return replace(self, **{k: v for k, v in base.items() if getattr(self, k) is None})

    def validate(self) -> None:
        if any(getattr(self, k) is None for k in PAPER_SCHEDULE):
            self.resolved().validate()
            return
        if self.fusion_index not in FUSION_INDEX:
            raise ConfigError(f"fusion_index must be one of {FUSION_INDEX}, got {self.fusion_index!r}")
        if self.num_steps < 1:
            raise ConfigError("num_steps must be >= 1")
        if not 0 <= self.attack_start <= self.num_steps:
            raise ConfigError(f"attack_start must be in [0, num_steps={self.num_steps}], got {self.attack_start}")
        if not 0 <= self.fusion_start <= self.fusion_end <= self.num_steps:
            raise ConfigError("need 0 <= fusion_start <= fusion_end <= num_steps")
        if self.inject_steps is not None and not 0 <= self.inject_steps <= self.num_steps:
            raise ConfigError("inject_steps must be in [0, num_steps]")
        if self.crop_size % 16:
            raise ConfigError(f"crop_size must be a multiple of 16, got {self.crop_size}")
        if self.adam_steps < 0 or self.adam_lr <= 0:
            raise ConfigError("adam_steps must be >= 0 and adam_lr > 0")
        if self.perceptual not in (None, "jnd", "vgg", "ssim"):
            raise ConfigError(f"perceptual must be jnd, vgg or ssim, got {self.perceptual!r}")
        if self.perceptual == "vgg" and not self.vgg_weights:
            raise ConfigError("perceptual='vgg' needs vgg_weights (torchvision's VGG19 IMAGENET1K_V1 state dict)")
        if self.change_gain <= 0:
            raise ConfigError("change_gain must be > 0")
        if not 0 < self.jnd_midpoint <= 1:
            raise ConfigError("jnd_midpoint must be in (0, 1]")


# The authors' schedule on FLUX.1-dev at 512 px (design/methods.md §2.3).
PAPER_SCHEDULE: dict[str, int] = {"crop_size": 512, "num_steps": 25, "fusion_start": 5, "fusion_end": 20,
                                  "attack_start": 20}
# The same stages in proportion on the lite model, at its 256 px training size, with 10 steps so a CPU can run it;
# with residual composition the reconstruction error of the lite model never reaches the output.
LITE_SCHEDULE: dict[str, int] = {"crop_size": 256, "num_steps": 10, "fusion_start": 2, "fusion_end": 8,
                                 "attack_start": 8}


def rf_solver_step(z: torch.Tensor, v: torch.Tensor, v_mid: torch.Tensor, h: float) -> torch.Tensor:
    """The RF-Solver 2nd-order update ``z + h v + h^2/2 (v_mid - v) / (h/2)``, i.e. the midpoint step ``z + h v_mid``.

    Written as the authors do (first-order term plus a finite-difference derivative) so rounding matches theirs.
    """
    return z + h * v + 0.5 * h**2 * (v_mid - v) / (h / 2)


# ----------------------------------------------------------------------------------------------- the method
@dataclass
class _FaceState:
    inject_steps: int
    regions: list[str] = field(default_factory=list)
    mask_area: float = 0.0
    v_stored: int = 0
    v_replayed: int = 0


class FluxGuard(ProtectionMethod):
    """Flux-Guard on aligned portrait crops (512 px for FLUX.1-dev; any multiple of 16 works).

    Example::

        from fluxguard.methods import METHODS
        from fluxguard.methods.fluxguard import FluxGuardConfig
        from fluxguard.recognition import load_recognizer

        frs = [load_recognizer(n, "cuda") for n in ("mobilefacenet", "mobileface", "faceres")]
        method = METHODS["fluxguard"](frs, config=FluxGuardConfig(model="black-forest-labs/FLUX.1-dev"))
        result = method.protect_faces(crops)  # (B, 3, 512, 512) aligned portrait crops in [0, 1]
        result.crops, result.history[-1]  # protected crops; last L_id, L_p, w_id

    Args:
        recognizers: white-box FR ensemble (the attack surrogates).
        mode: dodging or impersonation.
        config: :class:`FluxGuardConfig` (paper defaults); keyword overrides are applied on top
            (``FluxGuard(frs, adam_steps=5)``).
        backend: a loaded :class:`~fluxguard.generators.flux.FluxBackend`; default: loaded lazily from
            ``config.model`` on first use.
        perceptual: a perceptual loss module ``(x, ref) -> (B,)`` in VGG relu3_4 MSE units; default from config
            (the paper's VGG19 when ``config.vgg_weights`` is set, else the msSSIM substitute).
        landmarker: 68-point landmark function for edit masks (default: dlib).
    """

    name = "fluxguard"
    crop_size = LITE_SCHEDULE["crop_size"]  # of the default (lite) model; instances take it from their config
    config_class = FluxGuardConfig
    # Adam iterations per attacked step and the largest identity-loss weight of the adaptive schedule (medium = the
    # authors' 10 / 1.0); the same on any model, whatever its number of steps.
    # Each strength is a visibility budget (the same for every method); the Adam iterations per attacked step are the
    # authors' 10.
    presets = {
        "low": {"budget": "low"},
        "medium": {"budget": "medium"},
        "high": {"budget": "high"},
    }

    def __init__(self, recognizers: Sequence[FaceRecognizer], *, mode: Mode | str = Mode.DODGE,
                 config: FluxGuardConfig | None = None, backend: Any = None, perceptual: nn.Module | None = None,
                 landmarker: Any = None, **overrides: Any) -> None:
        super().__init__(recognizers, mode=mode, config=config, **overrides)
        lite = None if backend is None else getattr(backend, "name", "") == "lite"
        self.config = self.config.resolved(lite)
        self.config.validate()
        self.crop_size = self.config.crop_size
        self._backend = backend
        self._perceptual = perceptual
        self.landmarker = landmarker

    # ------------------------------------------------------------------ setup
    @property
    def backend(self) -> Any:
        if self._backend is None:
            from fluxguard.generators.flux import FluxBackend

            c = self.config
            prompts = [c.source_prompt or PAPER_SOURCE_PROMPT, PAPER_EDIT_PROMPT if c.edit_prompt is None
                       else c.edit_prompt]
            self._backend = FluxBackend.from_pretrained(
                c.model, prompts=[p for p in prompts if p], device=c.device, offload=c.offload,
                max_sequence_length=c.max_sequence_length)
        return self._backend

    @property
    def perceptual_kind(self) -> str:
        """``jnd``, ``vgg`` or ``ssim`` (a ``perceptual`` module given to the constructor counts as ``vgg``-like)."""
        c = self.config
        if self._perceptual is not None:
            return "module"
        return c.perceptual or ("vgg" if c.vgg_weights else "jnd")

    @property
    def perceptual(self) -> nn.Module | None:
        """The image-space perceptual loss ``(x, ref) -> (B,)`` (vgg, ssim or a given module); None for ``jnd``."""
        kind = self.perceptual_kind
        if self._perceptual is None and kind != "jnd":
            weights = self.config.vgg_weights if kind == "vgg" else None
            self._perceptual = perceptual_loss(weights, self.config.ssim_tau)
        return self._perceptual

    def resolve_prompts(self) -> tuple[str | None, str | None, str | None]:
        """(source key, generation key, edit prompt or None) for the loaded backend.

        Raises:
            ConfigError: a text prompt was asked of a model without text encoders.
        """
        c, b = self.config, self.backend
        if b.text_free:
            if c.edit_prompt:
                raise ConfigError(
                    f"the model {b.name!r} has no text encoders, so text edits are unavailable (edit_prompt="
                    f"{c.edit_prompt!r}); use a FLUX checkpoint with text encoders, or set edit_prompt to None "
                    "for protection without an edit")
            if c.source_prompt:
                raise ConfigError(f"the model {b.name!r} has no text encoders; source_prompt must be None")
            return None, None, None
        src = c.source_prompt or PAPER_SOURCE_PROMPT
        edit = PAPER_EDIT_PROMPT if c.edit_prompt is None else c.edit_prompt
        return (src, edit, edit) if edit else (src, src, None)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "perceptual": self.perceptual_kind}

    def inject_steps_for(self, area_percent: float) -> int:
        c = self.config
        if c.inject_steps is not None:
            return c.inject_steps
        return c.inject_small if area_percent < c.inject_area_threshold else c.inject_large

    def id_weight(self, lp: float) -> float:
        c = self.config
        if not c.adaptive_weight:
            return c.fixed_id_weight
        return adaptive_id_weight(lp, c.lp_limit, c.k, c.w_min, c.w_max)

    # ------------------------------------------------------------------ main entry
    def protect_faces(
        self,
        crops: torch.Tensor,
        *,
        masks: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: ProgressFn | None = None,
        edit_masks: torch.Tensor | None = None,
        landmarks: torch.Tensor | None = None,
        target_landmarks: torch.Tensor | None = None,
    ) -> MethodResult:
        """Protect (B, 3, S, S) aligned portrait crops in [0, 1].

        Args:
            crops: aligned portrait crops; S a multiple of 16 (``crop_size`` by default).
            masks: (B, 1, S, S) face masks in [0, 1] where the adversarial change may go (default: the whole crop);
                an edit's regions are added to them.
            target: impersonation target crop(s), (1 or B, 3, S, S); None when dodging.
            generator: unused (the method is deterministic), accepted for the common interface.
            progress: ``progress(stage, step, total)`` with stages "invert", "generate", "attack", "faces".
            edit_masks: optional (B, S, S) or (B, 1, S, S) masks in [0, 1] replacing the prompt-derived masks.
            landmarks: optional (B, 5, 2) ArcFace landmarks of the faces in ``crops`` when they are not aligned
                portrait crops (e.g. the paper's whole-image 512 resize): the FR models and the edit mask use them.
            target_landmarks: likewise for ``target``.

        Returns:
            MethodResult with the protected crops (input + edit + shaped adversarial change), the masks used, one
            history entry per Adam step (face, step, iter, t, L_id, L_p, w_id, loss) and info (regions, mask areas,
            T_inj, timesteps, clean_crops = input + edit without the attack, regenerated_crops = the generator's
            clean output before composition, seconds).
        """
        if crops.dim() != 4 or crops.shape[1] != 3 or crops.shape[-1] != crops.shape[-2] or crops.shape[-1] % 16:
            raise ValueError(f"expected (B, 3, S, S) crops with S a multiple of 16, got {tuple(crops.shape)}")
        self.check_target(target)
        b_size, size = crops.shape[0], int(crops.shape[-1])
        if self.config.vae_checkpointing:
            self.backend.vae.enable_gradient_checkpointing()
        if target is not None and (target.shape[0] not in (1, b_size) or target.shape[-1] != size):
            raise ValueError(f"target must be (1 or {b_size}, 3, {size}, {size}), got {tuple(target.shape)}")
        if edit_masks is not None:
            if edit_masks.numel() != b_size * size * size:
                raise ValueError(f"edit_masks must be (B, S, S) or (B, 1, S, S) with B={b_size}, S={size}")
            edit_masks = edit_masks.reshape(b_size, size, size)
        face_masks = torch.ones(b_size, 1, size, size) if masks is None else masks.detach().float().cpu()
        src_key, gen_key, edit_prompt = self.resolve_prompts()
        backend = self.backend
        dev = backend.device
        for r in self.recognizers:
            r.to(dev)
        perc = self.perceptual
        if perc is not None:
            perc = perc.to(dev)
        report = progress or (lambda stage, step, total: None)

        t0 = time.perf_counter()
        out, clean, regenerated, used, history = [], [], [], [], []
        info: dict[str, Any] = {
            "regions": [], "mask_area_percent": [], "inject_steps": [], "v_stored": [], "v_replayed": [],
            "text_free": backend.text_free, "edit_prompt": edit_prompt, "perceptual": self.perceptual_kind}
        for i in range(b_size):
            x = crops[i : i + 1].to(dev, torch.float32)
            lm_i = None if landmarks is None else torch.as_tensor(landmarks, dtype=torch.float64).reshape(-1, 5, 2)[
                min(i, len(landmarks) - 1)]
            mask, regions = self._edit_mask(crops[i], edit_prompt, None if edit_masks is None else edit_masks[i],
                                            lm_i)
            state = _FaceState(self.inject_steps_for(100.0 * float(mask.mean())), regions, 100.0 * float(mask.mean()))
            tgt = None if target is None else target[min(i, target.shape[0] - 1)][None].to(dev, torch.float32)
            tlm = None if target_landmarks is None else torch.as_tensor(
                target_landmarks, dtype=torch.float64).reshape(-1, 5, 2)[min(i, len(target_landmarks) - 1)]
            idloss = IdentityLoss(self.recognizers, x, tgt, lm_i, tlm)
            edit_region = mask.to(dev)[None, None]
            m = torch.maximum(face_masks[i : i + 1].to(dev), edit_region)
            face = _FaceInputs(x, m, edit_region, self.change_bound(x, m))
            za, zc, zr, ts = self._run_face(face, state, src_key, gen_key, edit_prompt is not None, idloss, perc, i,
                                            history, report)
            with torch.no_grad():
                base, x_clean = self._base(face, zc, zr, size)
                adv = backend.decode(za, size, size)
                change = shape_residual(self.config.change_gain * (adv - x_clean), m, face.bound, soft=True)
                out.append((base + change).clamp(0, 1).cpu())
                clean.append(base.cpu())
                regenerated.append(x_clean.cpu())
                used.append(m.cpu())
            info["regions"].append(state.regions)
            info["mask_area_percent"].append(state.mask_area)
            info["inject_steps"].append(state.inject_steps)
            info["v_stored"].append(state.v_stored)
            info["v_replayed"].append(state.v_replayed)
            info["timesteps"] = ts
            report("faces", i + 1, b_size)
        info["clean_crops"] = torch.cat(clean)
        info["regenerated_crops"] = torch.cat(regenerated)  # the generator's own output (diagnostics)
        info["seconds"] = time.perf_counter() - t0
        return MethodResult(crops=torch.cat(out), history=history, info=info, masks=torch.cat(used),
                            reference=info["clean_crops"])

    # ------------------------------------------------------------------ pieces
    def _edit_mask(self, crop: torch.Tensor, edit_prompt: str | None, user_mask: torch.Tensor | None,
                   landmarks5: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str]]:
        size = int(crop.shape[-1])
        if user_mask is not None:
            return user_mask.detach().float().clamp(0, 1).cpu(), ["user"]
        if not edit_prompt:
            return torch.zeros(size, size), []
        from fluxguard.methods.edit_mask import build_edit_mask

        five = None if landmarks5 is None else landmarks5.numpy()
        em = build_edit_mask(crop, edit_prompt, self.landmarker, five)
        return em.mask, em.regions

    def _base(self, face: _FaceInputs, zc: torch.Tensor, zr: torch.Tensor | None, size: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input + the edit's change inside its region, the clean branch's decoded image) at the current step."""
        b = self.backend
        x_clean = b.decode(zc, size, size)
        if zr is None:  # no edit: the clean branch is the reconstruction
            return face.x, x_clean
        return face.x + face.edit_region * (x_clean - b.decode(zr, size, size)), x_clean

    def _run_face(self, face: _FaceInputs, state: _FaceState, src_key: str | None, gen_key: str | None,
                  editing: bool, idloss: IdentityLoss, perc: nn.Module | None, face_index: int,
                  history: list[dict[str, float]], report: ProgressFn
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[float]]:
        """Invert, regenerate with the edit (clean branch), without it (reconstruction branch, only when
        ``editing``) and with the attack (adversarial branch): (z_adv, z_clean, z_rec or None, timesteps)."""
        from fluxguard.generators.flux import flux_timesteps
        from fluxguard.methods.edit_mask import latent_token_mask

        c, b = self.config, self.backend
        x = face.x
        size = int(x.shape[-1])
        n = c.num_steps
        ts = flux_timesteps(n, b.image_seq_len(size, size))
        tok = size // (2 * b.vae_scale_factor)
        m = latent_token_mask(face.edit_region[0, 0].cpu(), tok, tok, c.mask_blur_sigma)[None].to(b.device)
        cond_s, cond_g = b.conditioning(src_key), b.conditioning(gen_key)
        bank = ValueBank("cpu" if c.store_v_on_cpu else None)
        t_inj = state.inject_steps
        blocks = v_injection_blocks(b.num_single_blocks, c.v_inject_from_block, c.v_inject_reference_blocks)

        def vel(z: torch.Tensor, t: float, cond: Any, g: float) -> torch.Tensor:
            return b.velocity(z, t, cond, g, size, size)

        with torch.no_grad(), VInjection(b.transformer, bank, blocks), record_function("fluxguard/invert"):
            z = b.encode(x)
            inv_v: list[torch.Tensor] = []
            inv_vm: list[torch.Tensor] = []
            for j in range(n):  # inversion, t from 0 to 1
                s, s2 = ts[n - j], ts[n - j - 1]
                h = s2 - s
                store = "store" if j >= n - t_inj else None
                bank.set(store, (n - 1 - j, False))  # key = the generation step that reads it
                v = vel(z, s, cond_s, c.inversion_guidance)
                bank.set(store, (n - 1 - j, True))
                vm = vel(z + h / 2 * v, s + h / 2, cond_s, c.inversion_guidance)
                inv_v.append(v)
                inv_vm.append(vm)
                z = rf_solver_step(z, v, vm, h)
                report("invert", j + 1, n)
            bank.set(None)
            state.v_stored = len(bank.bank)

            def gen_step(zz: torch.Tensor, k: int, reconstruct: bool = False) -> torch.Tensor:
                """One generation step: with the edit prompt and fusion, or (``reconstruct``) the inversion undone."""
                tau, tau2 = ts[k], ts[k + 1]
                dt = tau2 - tau
                cond, g = (cond_s, c.inversion_guidance) if reconstruct else (cond_g, c.guidance)
                replay = "replay" if k < t_inj else None
                fuse = not reconstruct and c.fusion_start <= k < c.fusion_end
                idx = k if c.fusion_index == "as_released" else n - 1 - k
                bank.set(replay, (k, False))
                v = vel(zz, tau, cond, g)
                if fuse:
                    v = m * v + (1 - m) * inv_v[idx]
                bank.set(replay, (k, True))
                vm = vel(zz + dt / 2 * v, tau + dt / 2, cond, g)
                if fuse:
                    vm = m * vm + (1 - m) * inv_vm[idx]
                bank.set(None)
                return rf_solver_step(zz, v, vm, dt)

        with torch.no_grad(), VInjection(b.transformer, bank, blocks), record_function("fluxguard/generate"):
            zc = z
            zr = z if editing else None
            za = None if c.share_clean_branch else z.clone()
            n_attack = n - c.attack_start
            for k in range(n):
                if zr is not None:
                    zr = gen_step(zr, k, reconstruct=True)
                if k < c.attack_start:
                    zc = gen_step(zc, k)
                    if za is not None:
                        za = gen_step(za, k)  # the released code's duplicate (bit-identical) branch
                else:
                    if za is None:
                        za = zc.clone()
                    if c.share_clean_branch:
                        both = gen_step(torch.cat([zc, za]), k)
                        zc, za = both[:1], both[1:]
                    else:
                        zc, za = gen_step(zc, k), gen_step(za, k)
                    with torch.enable_grad(), record_function("fluxguard/attack"):
                        za = self._adv_opt(za, zc, zr, face, idloss, perc, face_index, k, ts[k + 1], history,
                                           report, (k - c.attack_start) * c.adam_steps, n_attack * c.adam_steps)
                report("generate", k + 1, n)
            if za is None:
                za = zc
            state.v_replayed = bank.replayed
        return za, zc, zr, ts

    def _adv_opt(self, z0: torch.Tensor, zc: torch.Tensor, zr: torch.Tensor | None, face: _FaceInputs,
                 idloss: IdentityLoss, perc: nn.Module | None, face_index: int, k: int, t: float,
                 history: list[dict[str, float]], report: ProgressFn, done: int, total: int) -> torch.Tensor:
        """``get_classifier_guidance``: a fresh Adam on the (partly noisy) packed latent, decoded every step, the loss
        taken on the composed output ``base + shape(decode(z) - decode(z_clean))``."""
        c, b = self.config, self.backend
        size = int(face.x.shape[-1])
        with torch.no_grad():
            base, x_clean = self._base(face, zc, zr, size)
        z = z0.detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=c.adam_lr)
        for it in range(c.adam_steps):
            change = shape_residual(c.change_gain * (b.decode(z, size, size) - x_clean), face.m, face.bound, soft=True)
            x = (base + change).clamp(0, 1)
            lid = idloss(x).mean()
            if perc is None:
                lp = c.lp_limit * budget_usage(change, face.bound, face.m).mean() / c.jnd_midpoint
            else:
                lp = perc(x, base).mean()
            w = self.id_weight(float(lp.detach()))
            loss = w * lid + c.perceptual_weight * lp
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"face": face_index, "step": k, "iter": it, "t": t, "L_id": float(lid.detach()),
                            "L_p": float(lp.detach()), "w_id": w, "loss": float(loss.detach())})
            report("attack", done + it + 1, total)
        return z.detach()


@dataclass
class _FaceInputs:
    """One face's fixed inputs: the crop, the mask the change may use, the edit's region and the per-pixel bound."""

    x: torch.Tensor  # (1, 3, S, S)
    m: torch.Tensor  # (1, 1, S, S): face mask plus edit regions
    edit_region: torch.Tensor  # (1, 1, S, S)
    bound: torch.Tensor  # (1, 1, S, S): the budget's per-pixel bound inside m


__all__ = ["FluxGuard", "FluxGuardConfig", "PAPER_EDIT_PROMPT", "PAPER_SOURCE_PROMPT", "rf_solver_step"]
