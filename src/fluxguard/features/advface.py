"""AdvFace: adversarial FR templates that a reconstruction network cannot turn back into the face.

A plug-in for FR providers: ``AdvFace("mobileface").protect(templates)`` maps clean templates to protected ones
that still verify against clean probes (cosine to the clean template at least ``min_cosine``) but invert badly. The
FR model is used as is. By default the budget is relative to the FR model: the template may turn by ``budget`` (0.35)
of the model's decision angle ``arccos(t)`` (``t``: its calibrated FAR 1e-2 threshold), because the models' score
scales differ widely (dlib-resnet accepts at cosine 0.91, mobileface at 0.34): one fixed cosine floor that leaves
mobileface's verification intact breaks dlib-resnet's at its own threshold.

**This is a reconstruction**: AdvFace (Wang et al., CVPR 2023) published no code; see ``methods.md`` section 4.

Our FR models expose only their final L2-normalised embedding, so the "template" here is that embedding. The paper
splits the FR network at an intermediate layer and protects feature maps; that split point is not available for the
zoo's models (graph-converted or ported without hooks into their middle), so both variants work on embeddings:

* **Variant A** (cyclic image-domain noise, as the paper's figure describes): decode the template with the shadow
  model to a shadow image ``x_s``, then search an image perturbation ``delta`` (L-inf <= ``epsilon``, PGD with
  sign steps) such that the FR model's template of ``x_s + delta`` stays close to the clean template while the
  shadow model's reconstruction of it moves away from ``x_s``; the stored template is the FR model's template of the
  shadow image plus noise (re-extracted by the FR model).
* **Variant B** (template-space noise): PGD directly on the unit template, maximising the change of the shadow
  reconstruction, projected onto the spherical cap ``cos(z', z) >= min_cosine``.

Both end with the same guarantee: every protected template keeps ``cos(z', z) >= min_cosine`` (variant A projects
onto the cap when its re-extracted template falls below the floor, and reports how often).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fluxguard.errors import ConfigError, FluxguardError

if TYPE_CHECKING:
    from fluxguard.features.templates import TemplateSet
    from fluxguard.recognition.base import FaceRecognizer

log = logging.getLogger(__name__)

VARIANTS = ("A", "B")


@dataclass(frozen=True)
class AdvFaceConfig:
    """Budget and optimisation settings.

    Attributes:
        variant: ``"A"`` (image-domain noise through the shadow decoder, template re-extracted by the FR model) or
            ``"B"`` (noise on the template itself).
        min_cosine: floor on the cosine between a protected template and its clean template (both variants). It
            bounds the template change: ``||z' - z|| <= sqrt(2 - 2 min_cosine)``. ``None`` (default): derived from
            ``budget`` and the FR model's threshold by :meth:`for_threshold` (AdvFace does this).
        budget: the largest template turn as a fraction of the FR model's decision angle ``arccos(t)`` at its
            calibrated FAR 1e-2 threshold ``t``; used when ``min_cosine`` is None (0.35: cosine 0.91 for mobileface,
            0.99 for dlib-resnet).
        steps: PGD iterations.
        epsilon: variant A: L-inf budget of the image noise, in [0, 1] pixel units.
        step_size: variant A: L-inf step (default ``epsilon / 4``); variant B: geodesic step in radians (default
            ``2.5 * arccos(min_cosine) / steps``).
        identity_weight: variant A: weight of ``1 - cos(z', z)`` against the reconstruction similarity.
        batch: templates optimised together.
        seed: seed of the random start when no generator is passed.
    """

    variant: str = "B"
    min_cosine: float | None = None
    budget: float = 0.35
    steps: int = 20
    epsilon: float = 8 / 255
    step_size: float | None = None
    identity_weight: float = 4.0
    batch: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"AdvFace variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.min_cosine is not None and not -1.0 < self.min_cosine < 1.0:
            raise ConfigError(f"min_cosine must lie in (-1, 1), got {self.min_cosine}")
        if not 0.0 < self.budget < 1.0:
            raise ConfigError(f"budget must lie in (0, 1) (a fraction of the decision angle), got {self.budget}")
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ConfigError(f"epsilon must lie in [0, 1] (pixel units), got {self.epsilon}")
        if self.step_size is not None and self.step_size <= 0:
            raise ConfigError(f"step_size must be > 0, got {self.step_size}")
        if self.batch < 1:
            raise ConfigError(f"batch must be >= 1, got {self.batch}")

    def for_threshold(self, threshold: float | None) -> AdvFaceConfig:
        """This config with ``min_cosine`` set (from ``budget`` and the model's FAR 1e-2 threshold when unset)."""
        if self.min_cosine is not None:
            return self
        if threshold is None or not -1.0 < threshold < 1.0:
            raise ConfigError("the FR model has no calibrated FAR 1e-2 threshold to scale the budget by; set "
                              "min_cosine")
        return replace(self, min_cosine=round(math.cos(self.budget * math.acos(threshold)), 4))

    @property
    def max_angle(self) -> float:
        if self.min_cosine is None:
            raise ConfigError("min_cosine is not set yet (AdvFaceConfig.for_threshold sets it from the FR model)")
        return math.acos(self.min_cosine)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProtectionResult:
    """Protected templates plus per-template diagnostics (all arrays have one row per template)."""

    templates: np.ndarray  # (N, D) float32, unit norm
    cosine: np.ndarray  # cos(protected, clean)
    shadow_ssim: np.ndarray  # SSIM(shadow(protected), shadow(clean)): the defender's own privacy proxy
    projected: np.ndarray  # bool: variant A's template was pulled back onto the cosine floor
    config: AdvFaceConfig
    info: dict = field(default_factory=dict)


def project_to_cap(w: torch.Tensor, z: torch.Tensor, max_angle: float) -> torch.Tensor:
    """Closest unit rows to ``w`` in the spherical cap of angle ``max_angle`` around the unit rows ``z``."""
    cos = (w * z).sum(-1, keepdim=True)
    v = F.normalize(w - cos * z, dim=-1)
    edge = math.cos(max_angle) * z + math.sin(max_angle) * v
    return torch.where(cos >= math.cos(max_angle), w, F.normalize(edge, dim=-1))


def rotate_by(z: torch.Tensor, angle: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit rows of ``z`` turned by ``angle`` (per row, radians) towards uniformly random orthogonal directions."""
    u = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    u = u - (u * z).sum(-1, keepdim=True) * z
    # a draw (almost) parallel to z leaves no direction: use another coordinate order of z instead
    fallback = torch.roll(z, 1, dims=-1)
    fallback = fallback - (fallback * z).sum(-1, keepdim=True) * z
    v = F.normalize(torch.where(u.norm(dim=-1, keepdim=True) > 1e-3, u, fallback), dim=-1)
    a = angle.reshape(-1, 1).to(z.dtype)
    return F.normalize(torch.cos(a) * z + torch.sin(a) * v, dim=-1)


def gaussian_like(clean: np.ndarray | torch.Tensor, protected: np.ndarray | torch.Tensor,
                  generator: torch.Generator | None = None) -> np.ndarray:
    """The noise baseline: isotropic Gaussian noise of the *same size* as each protection's change.

    Each clean unit template is moved by the same angle (hence the same L2 distance, ``2 sin(angle / 2)``) as its
    protected counterpart, in a random direction (a Gaussian vector with its component along the template removed).
    """
    z = F.normalize(torch.as_tensor(np.asarray(clean), dtype=torch.float32), dim=-1)
    p = F.normalize(torch.as_tensor(np.asarray(protected), dtype=torch.float32), dim=-1)
    angle = torch.arccos((z * p).sum(-1).clamp(-1, 1))
    return rotate_by(z, angle, generator).numpy()


class AdvFace:
    """The AdvFace protector for one FR model of the zoo (with that model's shadow decoder).

    Args:
        model: FR model name (or a loaded :class:`FaceRecognizer`) whose templates are protected.
        config: budget and optimisation settings (default :class:`AdvFaceConfig`).
        shadow: a shadow decoder file (default: the shipped one for ``model``).

    Raises:
        FluxguardError: no shadow decoder for ``model``, or the decoder was trained for another FR model or for other
            weights of it.
    """

    def __init__(self, model: str | FaceRecognizer, config: AdvFaceConfig | None = None,
                 shadow: str | Path | None = None) -> None:
        from fluxguard.features.decoders import decoder_path, fr_weights_sha256, load_decoder
        from fluxguard.recognition import FR_MODELS

        self._recognizer = None if isinstance(model, str) else model
        self.model_name = model if isinstance(model, str) else model.spec.name
        self.model_cls = FR_MODELS[model] if isinstance(model, str) else type(model)
        threshold = self.model_cls.calibrated_spec().thresholds.get("1e-2")
        self.config = (config or AdvFaceConfig()).for_threshold(threshold)
        path = Path(shadow) if shadow is not None else decoder_path("shadow", self.model_name)
        if shadow is None and not path.is_file():
            raise FluxguardError(f"no shipped AdvFace shadow decoder for FR model {self.model_name!r} (train one with "
                                 "scripts/train_advface.py and pass it as shadow=)", path=path)
        self.shadow, self.shadow_meta = load_decoder(path)
        self.shadow_path = path
        if self.shadow_meta.get("role") != "shadow":
            raise FluxguardError(f"{self.shadow_meta.get('role')!r} decoder given where a shadow decoder is needed",
                                 path=path)
        if self.shadow_meta["fr_model"] != self.model_name:
            raise FluxguardError(f"this shadow decoder inverts {self.shadow_meta['fr_model']!r} templates, not "
                                 f"{self.model_name!r} templates", path=path)
        self.model_sha256 = fr_weights_sha256(self.model_cls)
        if self.shadow_meta["fr_weights_sha256"] != self.model_sha256:
            raise FluxguardError(f"this shadow decoder was trained on other weights of {self.model_name!r} (sha256 "
                                 f"{self.shadow_meta['fr_weights_sha256'][:12]}, installed "
                                 f"{self.model_sha256[:12]})", path=path)
        self.dim = self.model_cls.spec.embedding_size

    @property
    def recognizer(self) -> FaceRecognizer:
        """The FR model (loaded on first use; variant A re-extracts templates with it)."""
        if self._recognizer is None:
            from fluxguard.recognition import load_recognizer

            self._recognizer = load_recognizer(self.model_name)
        return self._recognizer

    # -- public API ----------------------------------------------------------------------------------------------
    def protect(self, templates: np.ndarray | torch.Tensor | TemplateSet,
                generator: torch.Generator | None = None) -> np.ndarray | TemplateSet:
        """Protected templates: same shape and type as ``templates`` (a :class:`TemplateSet` comes back as one).

        Raises:
            FluxguardError: the templates belong to another FR model (or other weights of it), or have the wrong
                size.
        """
        from fluxguard.features.templates import TemplateSet

        if isinstance(templates, TemplateSet):
            self.check_templates(templates)
            res = self.run(templates.embeddings, generator)
            return templates.with_protection(res.templates, self.describe())
        return self.run(templates, generator).templates

    def run(self, templates: np.ndarray | torch.Tensor, generator: torch.Generator | None = None) -> ProtectionResult:
        """Protect (N, D) templates and return them with per-template diagnostics."""
        z = torch.as_tensor(np.asarray(templates.detach().cpu() if torch.is_tensor(templates) else templates),
                            dtype=torch.float32)
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise FluxguardError(f"{self.model_name} templates are (N, {self.dim}); got shape {tuple(z.shape)}")
        if not torch.isfinite(z).all() or (z.norm(dim=-1) < 1e-6).any():
            raise FluxguardError("templates contain non-finite or all-zero rows")
        z = F.normalize(z, dim=-1)
        gen = generator if generator is not None else torch.Generator().manual_seed(self.config.seed)
        self._max_delta = 0.0
        parts = [self._protect_batch(z[i:i + self.config.batch], gen) for i in range(0, len(z), self.config.batch)]
        if not parts:
            empty = np.zeros((0, self.dim), np.float32)
            return ProtectionResult(empty, np.zeros(0), np.zeros(0), np.zeros(0, bool), self.config)
        out, proj = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        with torch.no_grad():
            from fluxguard.features.decoders import ssim

            s = torch.cat([ssim(self.shadow(out[i:i + 256]), self.shadow(z[i:i + 256]))
                           for i in range(0, len(z), 256)])
        cos = (out * z).sum(-1)
        info = {"projected_fraction": float(proj.float().mean())}
        if self.config.variant == "A":
            info["max_abs_image_delta"] = self._max_delta  # of the kept iterates; <= epsilon
        return ProtectionResult(out.numpy(), cos.numpy(), s.numpy(), proj.numpy(), self.config, info)

    def describe(self) -> dict:
        """What a protected template file records about its protection."""
        from fluxguard._version import __version__
        from fluxguard.recognition.sources import sha256_file

        return {"method": "advface", "variant": self.config.variant, "config": self.config.to_dict(),
                "shadow_sha256": sha256_file(self.shadow_path), "fluxguard_version": __version__}

    def check_templates(self, ts: TemplateSet) -> None:
        """Raise unless ``ts`` holds clean templates of this protector's FR model and weights."""
        if ts.model != self.model_name:
            raise FluxguardError(f"these templates come from FR model {ts.model!r}; this AdvFace protects "
                                 f"{self.model_name!r} templates (templates of different models cannot be mixed)")
        if ts.model_sha256 != self.model_sha256:
            raise FluxguardError(f"these {ts.model} templates were made with other weights (sha256 "
                                 f"{ts.model_sha256[:12]}, installed {self.model_sha256[:12]})")
        if ts.protection:
            raise FluxguardError("these templates are already protected; protect the clean templates instead")

    # -- the two variants ----------------------------------------------------------------------------------------
    def _protect_batch(self, z: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            x_s = self.shadow(z)
        with torch.enable_grad():  # callers may hold torch.no_grad(); the search needs gradients
            out = self._variant_a(z, x_s, gen) if self.config.variant == "A" else self._variant_b(z, x_s, gen)
        projected = (out * z).sum(-1) < self.config.min_cosine
        return project_to_cap(out, z, self.config.max_angle), projected

    def _similarity(self, x: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
        """Per-sample similarity of a reconstruction to the shadow image (minimised): SSIM minus L1."""
        from fluxguard.features.decoders import ssim

        return ssim(x, x_s) - (x - x_s).abs().mean((1, 2, 3))

    def _variant_b(self, z: torch.Tensor, x_s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        theta = cfg.max_angle
        alpha = cfg.step_size if cfg.step_size is not None else 2.5 * theta / max(cfg.steps, 1)
        # random start inside the cap (uniform angle), as PGD's random start
        w = rotate_by(z, theta * torch.rand(len(z), generator=gen), gen)
        best, best_sim = w.clone(), torch.full((len(z),), float("inf"))
        for _ in range(cfg.steps):
            w = w.detach().requires_grad_(True)
            sim = self._similarity(self.shadow(w), x_s)
            (g,) = torch.autograd.grad(sim.sum(), w)
            with torch.no_grad():
                better = sim < best_sim
                best[better], best_sim[better] = w[better], sim[better]
                g = g - (g * w).sum(-1, keepdim=True) * w  # tangent to the sphere
                w = F.normalize(w - alpha * F.normalize(g, dim=-1), dim=-1)
                w = project_to_cap(w, z, theta)
        with torch.no_grad():
            sim = self._similarity(self.shadow(w), x_s)
            better = sim < best_sim
            best[better] = w[better]
        return best.detach()

    def _variant_a(self, z: torch.Tensor, x_s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from fluxguard.features.faceset import recon_landmarks

        cfg = self.config
        fr = self.recognizer
        eps = cfg.epsilon
        alpha = cfg.step_size if cfg.step_size is not None else eps / 4
        lm = torch.as_tensor(recon_landmarks(x_s.shape[-1])).expand(len(z), 5, 2)
        delta = (torch.rand(x_s.shape, generator=gen) * 2 - 1) * eps
        best = torch.zeros_like(z)
        best_key = torch.full((len(z),), -float("inf"))
        for t in range(cfg.steps + 1):
            delta = delta.detach().requires_grad_(t < cfg.steps)
            with torch.set_grad_enabled(t < cfg.steps):
                zp = fr((x_s + delta).clamp(0, 1), lm)
                sim = self._similarity(self.shadow(zp), x_s)
                cos = (zp * z).sum(-1)
                loss = sim + cfg.identity_weight * (1 - cos)
            with torch.no_grad():
                # keep the iterate that breaks the shadow reconstruction most among those above the floor; below the
                # floor, the one closest to the clean template (it is projected onto the floor afterwards)
                ok = cos >= cfg.min_cosine
                key = torch.where(ok, 10.0 - sim, cos)
                better = key > best_key
                best[better], best_key[better] = zp.detach()[better], key[better]
                if better.any():
                    self._max_delta = max(self._max_delta, float(delta.detach()[better].abs().max()))
            if t == cfg.steps:
                break
            (g,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                delta = (delta - alpha * g.sign()).clamp(-eps, eps)
                delta = (x_s + delta).clamp(0, 1) - x_s
        return F.normalize(best, dim=-1)
