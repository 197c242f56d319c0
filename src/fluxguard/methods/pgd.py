"""The pixel baseline: ensemble PGD with momentum and input diversity (MI-FGSM / DI / TI) inside the visibility budget.

Distance measure: a per-pixel L-inf bound on the face's crop (an aligned portrait crop, or with ``window`` a plain
window of the photo around the face, so nothing is resampled between the attack and the photo), the scaled JND of
each pixel inside the face mask and 0 outside (:class:`~fluxguard.losses.visibility.VisibilityBudget`): the change
goes where texture hides it, never onto the background or hair. ``eps`` optionally caps it further with a uniform
L-inf budget (the classic TIP-IM-style 8/255 of earlier versions). Input range [0, 1].
With ``momentum=0, diversity_prob=0`` it is plain PGD (Madry et al. 2018); the defaults are MI-FGSM
(Dong et al. 2018, arXiv 1710.06081) with input diversity (Xie et al. 2019, arXiv 1803.06978), which is what
transfers to FR models that were not attacked. ``eot`` adds expectation over JPEG / resize (straight-through
gradients), so the change survives what social networks do to photos. ``model_dropout`` thins the surrogates
at random at every step (model augmentation, DFANet: Zhong & Deng 2020, arXiv 2004.05790); ``spectrum_rho``
augments each step in the frequency domain (SSA, arXiv 2207.05382); ``feature_weight`` adds a feature-level loss
on a middle layer of each surrogate.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fluxguard.errors import ConfigError
from fluxguard.losses.identity import IdentityLoss
from fluxguard.losses.visibility import bound_residual, delta_e_cost, project_sparse, remove_colour_cast
from fluxguard.methods.base import MethodResult, Mode, ProgressFn, ProtectionMethod
from fluxguard.recognition.augment import calibrate_dropout
from fluxguard.recognition.base import FaceRecognizer


@dataclass
class PGDConfig:
    eps: float | None = None  # extra uniform L-inf cap on the crop (None: the visibility budget alone)
    steps: int = 50
    step_size: float = 1 / 255
    momentum: float = 1.0  # MI-FGSM decay mu; 0 = plain PGD
    diversity_prob: float = 0.7  # DI: probability of a random transform per step; 0 = off
    diversity_scale: float = 0.1  # DI: +-10 % scale, +-5 % shift of each FR model's crop, random down-up resize
    ti_kernel: int = 0  # TI: Gaussian smoothing of the gradient (kernel size, odd); 0 = off
    eot: tuple[str, ...] = field(default_factory=tuple)  # subset of ("jpeg", "resize")
    random_start: bool = False
    # "luma": one grey-level change per pixel, the same on R, G and B (no hue change); "rgb": each channel on its own.
    # luma is the default: it protects as much at about two thirds of the CIEDE2000 (benchmarks/results/transfer.md)
    colour: str = "luma"
    # "box": every pixel up to its bound (sign steps); "sparse": the budget's mean CIEDE2000 as an L1 ball, spent on
    # the pixels where the gradient is largest per unit of colour difference (normalised-gradient steps)
    projection: str = "box"
    # "mean": the ensemble's loss is the mean over models; "balanced": each model's gradient is normalised (mean
    # absolute value 1) before they are summed, so no easy model dominates the direction; "margin": each model's term
    # is divided by its matching margin (1 - its FAR 1e-2 threshold), so a model whose genuine and impostor cosines lie
    # close together (dlib: threshold 0.91) counts as much per unit of its own decision scale as a wide one
    model_weighting: str = "mean"
    # impersonation: the target embedding is the mean of this many views of the target photo (itself, mirrored,
    # jittered), and source_weight also pushes away from the source's own embedding
    target_views: int = 1
    source_weight: float = 0.0
    crop_size: int | None = None  # None: each face at its own resolution in the photo (no resampling loss)
    # True (with crop_size None): each crop is a window of the photo around the face, not an aligned (rotated,
    # sub-pixel shifted) crop, so the change reaches the photo without being resampled; the FR models align the
    # face from its landmarks in the window, as they do from the photo
    window: bool = False
    # model augmentation (DFANet): at each step every surrogate is a randomly thinned copy (dropout on the feature
    # maps its layers read), so the change cannot lean on a few units of one model. 0 = off; else the share of each
    # model's matching margin (1 - its FAR 1e-2 threshold) a thinned copy may use up on the clean face, which sets
    # that model's dropout rate (calibrated per face: the models' sensitivities differ by an order of magnitude)
    model_dropout: float = 0.0
    # spectrum augmentation (SSA, Long et al. 2022, arXiv 2207.05382, with the Fourier transform for the DCT): each
    # step sees the face plus Gaussian noise at the per-pixel bound, every frequency scaled by U(1-rho, 1+rho); 0 = off
    spectrum_rho: float = 0.0
    # feature-level loss (FDA / FIA family: Ganeshan et al. 2019, Wang et al. 2021, arXiv 2107.14185): each model's
    # term also gets feature_weight x the cosine between the feature map its convolution at relative depth
    # feature_depth reads on the attacked face and on the clean face (seen through the same input transform), so the
    # change disrupts a middle layer, which models share more than their embeddings. 0 = off
    feature_weight: float = 0.0
    feature_depth: float = 0.5
    # variance tuning (VMI-FGSM, Wang & He 2021, arXiv 2103.15571): each step's gradient is corrected by the mean
    # gradient over variance_samples points within variance_radius x the per-pixel bound around the last one, which
    # stabilises the direction; each sample costs one more gradient, so steps can drop to keep the time. 0 = off
    variance_samples: int = 0
    variance_radius: float = 1.5

    def validate(self) -> None:
        if self.eps is not None and not 0 < self.eps <= 1:
            raise ConfigError(f"eps must be in (0, 1], got {self.eps}")
        if self.steps < 1 or self.step_size <= 0:
            raise ConfigError("steps must be >= 1 and step_size > 0")
        if not 0 <= self.diversity_prob <= 1:
            raise ConfigError("diversity_prob must be in [0, 1]")
        if not 0 <= self.spectrum_rho < 1:
            raise ConfigError(f"spectrum_rho must be in [0, 1), got {self.spectrum_rho}")
        if self.feature_weight < 0 or not 0 <= self.feature_depth <= 1:
            raise ConfigError(f"feature_weight must be >= 0 and feature_depth in [0, 1], got {self.feature_weight}, "
                              f"{self.feature_depth}")
        if self.variance_samples < 0 or self.variance_radius <= 0:
            raise ConfigError(f"variance_samples must be >= 0 and variance_radius > 0, got {self.variance_samples}, "
                              f"{self.variance_radius}")
        if not 0 <= self.model_dropout < 1:
            raise ConfigError(f"model_dropout must be 0 (off) or a share in (0, 1), got {self.model_dropout}")
        if self.target_views < 1 or self.source_weight < 0:
            raise ConfigError("target_views must be >= 1 and source_weight >= 0")
        if self.model_weighting not in ("mean", "balanced", "margin"):
            raise ConfigError(f"model_weighting must be mean, balanced or margin, got {self.model_weighting!r}")
        if self.projection not in ("box", "sparse"):
            raise ConfigError(f"projection must be box or sparse, got {self.projection!r}")
        if not isinstance(self.window, bool):
            raise ConfigError(f"window must be true or false, got {self.window!r}")
        if self.colour not in ("rgb", "luma"):
            raise ConfigError(f"colour must be rgb or luma, got {self.colour!r}")
        if self.ti_kernel and self.ti_kernel % 2 == 0:
            raise ConfigError("ti_kernel must be odd (or 0 to disable)")
        self.eot = tuple(self.eot)
        bad = set(self.eot) - {"jpeg", "resize"}
        if bad:
            raise ConfigError(f"unknown eot transform(s) {sorted(bad)}; use jpeg, resize")


def _jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in x.detach().clamp(0, 1):
        arr = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=quality)
        dec = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(dec).permute(2, 0, 1))
    return torch.stack(out).to(x)


def _threshold(model: FaceRecognizer) -> float:
    """The model's FAR 1e-2 threshold, 0 for one that has none (e.g. an uncalibrated test model)."""
    try:
        return float(model.threshold("1e-2"))
    except KeyError:
        return 0.0


def _gaussian_kernel(size: int, device: torch.device) -> torch.Tensor:
    sigma = size / (2 * math.sqrt(3))
    ax = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    k = (g[:, None] * g[None, :]) / g.sum() ** 2
    return k.expand(3, 1, size, size).contiguous()


class PGD(ProtectionMethod):
    """Ensemble MI-FGSM + DI (+TI, +EOT) on the aligned face inside the visibility budget; see the module docstring."""

    name = "pgd"
    config_class = PGDConfig
    # The visibility budget names the per-pixel bound; "high" also optimises through JPEG round trips (EOT) so the
    # change survives re-compression.
    presets = {
        "low": {"budget": "low"},
        "medium": {"budget": "medium"},
        "high": {"budget": "high", "eot": ["jpeg"]},
    }

    def __init__(self, recognizers: Sequence[FaceRecognizer], *, mode: Mode | str = Mode.DODGE,
                 config: PGDConfig | None = None, **overrides: Any) -> None:
        super().__init__(recognizers, mode=mode, config=config, **overrides)
        self.crop_size = self.config.crop_size
        self.window_crops = self.config.window and self.crop_size is None

    def _diverse(self, x: torch.Tensor, base: torch.Tensor, gen: torch.Generator, clean: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """A random input transform: jittered landmarks (each FR crop moves/scales around the faces' ``base``
        landmarks, (5, 2) or (B, 5, 2)) and a down-up resize; ``clean`` (the same faces unchanged) goes through the
        same resize."""
        cfg = self.config
        if cfg.diversity_prob <= 0 or torch.rand((), generator=gen).item() >= cfg.diversity_prob:
            return x, None, clean
        b, _, s, _ = x.shape
        r = torch.rand((b, 4), generator=gen, dtype=torch.float64) * 2 - 1
        base = base.to(torch.float64).expand(b, 5, 2)
        centre = base.mean(1, keepdim=True)
        scale = 1 + cfg.diversity_scale * r[:, 0]
        shift = 0.5 * cfg.diversity_scale * s * r[:, 1:3]
        angle = math.radians(5.0) * r[:, 3]
        rot = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], -1).view(b, 2, 2)
        lm = (base - centre) @ (rot * scale[:, None, None]).transpose(1, 2) + centre + shift[:, None, :]
        low = int(s * (1 - cfg.diversity_scale * torch.rand((), generator=gen).item()))
        if low < s:
            def down_up(t: torch.Tensor) -> torch.Tensor:
                t = F.interpolate(t, size=(low, low), mode="bilinear", antialias=True, align_corners=False)
                return F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)

            x = down_up(x)
            clean = None if clean is None else down_up(clean)
        return x, lm, clean

    def _terms(self, loss_fn: IdentityLoss, x_in: torch.Tensor, lm: torch.Tensor | None,
               clean_in: torch.Tensor | None) -> torch.Tensor:
        """(M, B) per-model terms: the identity loss, plus the feature-level term when it is on (``clean_in``, the
        clean faces through the same transform, is given only then)."""
        cfg = self.config
        if clean_in is None:
            return loss_fn.per_model(x_in, lm)
        embs, feats = loss_fn.embeddings_and_features(x_in, lm, cfg.feature_depth)
        with torch.no_grad():
            _, refs = loss_fn.embeddings_and_features(clean_in, lm, cfg.feature_depth, augment=False)
        feature = torch.stack([F.cosine_similarity(f.flatten(1), r.flatten(1), dim=1) for f, r in zip(feats, refs,
                                                                                                    strict=True)])
        return loss_fn.terms(embs) + cfg.feature_weight * feature

    def _spectrum(self, x: torch.Tensor, bound: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """SSA's spectrum transform: noise at the bound, then each frequency of each channel scaled at random."""
        rho = self.config.spectrum_rho
        if rho <= 0:
            return x
        noise = torch.randn(x.shape, generator=gen).to(x) * bound
        spec = torch.fft.rfft2(x + noise)
        scale = (1 + rho * (torch.rand(spec.shape, generator=gen) * 2 - 1)).to(x)
        return torch.fft.irfft2(spec * scale, s=x.shape[-2:])

    def _eot(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for t in self.config.eot:
            if t == "jpeg":
                q = int(torch.randint(50, 96, (), generator=gen))
                x = x + (_jpeg_roundtrip(x, q) - x).detach()  # straight-through (BPDA)
            elif t == "resize":
                s = x.shape[-1]
                low = int(s * (0.5 + 0.5 * torch.rand((), generator=gen).item()))
                x = F.interpolate(F.interpolate(x, size=(low, low), mode="bilinear", antialias=True), size=(s, s),
                                  mode="bilinear")
        return x

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
        cfg = self.config
        self.check_target(target)
        gen = generator or torch.Generator().manual_seed(0)
        x0 = crops.detach().float()
        m = torch.ones_like(x0[:, :1]) if masks is None else masks.to(x0)
        bound = self.change_bound(x0, m)
        if cfg.eps is not None:
            bound = bound.clamp(max=cfg.eps)
        loss_fn = IdentityLoss(self.recognizers, x0, target, landmarks, target_views=cfg.target_views,
                               source_weight=cfg.source_weight)
        if cfg.model_dropout > 0:
            lm0 = loss_fn.landmarks.to(torch.float64)
            loss_fn.augment_models([calibrate_dropout(r, x0, lm0, 1 - cfg.model_dropout * (1 - _threshold(r)))
                                    for r in self.recognizers], gen)
        # (M, 1) divisor of each model's term: its matching margin for "margin", 1 (the plain mean) otherwise
        margins = x0.new_tensor([max(1.0 - _threshold(r), 0.05) if cfg.model_weighting == "margin" else 1.0
                                 for r in self.recognizers])[:, None]
        sparse = None
        if cfg.projection == "sparse":
            cost = delta_e_cost(x0) * m
            total = 0.95 * self.budget.max_delta_e * m.flatten(1).sum(1)
            sparse = (cost, total)
        delta = torch.zeros_like(x0)
        if cfg.random_start:
            delta = (torch.rand(x0.shape, generator=gen) * 2 - 1).to(x0) * bound
        g = torch.zeros_like(x0)
        kernel = _gaussian_kernel(cfg.ti_kernel, x0.device) if cfg.ti_kernel else None
        history: list[dict[str, float]] = []
        variance = torch.zeros_like(x0)
        for step in range(cfg.steps):
            delta = self._project(x0, delta, m, bound, sparse)
            x = x0 + delta
            loss, grad = self._loss_grad(x, x0, loss_fn, bound, margins, gen)
            if cfg.variance_samples:  # VMI: this step's gradient plus the last step's variance term
                grad, variance = grad + variance, self._neighbourhood_grad(x, x0, loss_fn, bound, margins, gen) - grad
            with torch.no_grad():
                if cfg.colour == "luma":
                    grad = grad.sum(1, keepdim=True).expand_as(grad)
                if kernel is not None:
                    grad = F.conv2d(grad, kernel, padding=cfg.ti_kernel // 2, groups=3)
                if cfg.momentum > 0:
                    g = cfg.momentum * g + grad / grad.abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-12)
                else:
                    g = grad
                if sparse is None:
                    direction = g.sign()
                else:  # largest gradients move fastest; the projection keeps the best pixels
                    direction = g / g.abs().flatten(1).quantile(0.99, dim=1).clamp_min(1e-12)[:, None, None, None]
                delta = delta - cfg.step_size * direction
            history.append({"step": step, "loss": loss.item() / x0.shape[0]})
            if progress:
                progress("attack", step + 1, cfg.steps)
        out = (x0 + self._project(x0, delta.detach(), m, bound, sparse)).clamp(0, 1)
        return MethodResult(crops=out, history=history, info={"linf": float((out - x0).abs().max())}, masks=m)

    def _loss_grad(self, x: torch.Tensor, x0: torch.Tensor, loss_fn: IdentityLoss, bound: torch.Tensor,
                   margins: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The ensemble loss at ``x`` (through this step's random input transforms) and its gradient."""
        cfg = self.config
        x = x.detach().requires_grad_(True)
        x_in, lm, clean_in = self._diverse(self._spectrum(self._eot(x, gen), bound, gen), loss_fn.landmarks, gen,
                                           x0 if cfg.feature_weight > 0 else None)
        per_model = self._terms(loss_fn, x_in, lm, clean_in)
        if cfg.model_weighting == "balanced":
            terms = per_model.sum(1)  # (M,)
            grad = torch.zeros_like(x)
            for i, t in enumerate(terms):
                (g_m,) = torch.autograd.grad(t, x, retain_graph=i < len(terms) - 1)
                grad = grad + g_m / g_m.abs().mean().clamp_min(1e-12)
            return terms.mean().detach(), grad
        loss = (per_model / margins).mean(0).sum()
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad

    def _neighbourhood_grad(self, x: torch.Tensor, x0: torch.Tensor, loss_fn: IdentityLoss, bound: torch.Tensor,
                            margins: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """VMI's mean gradient over ``variance_samples`` points drawn uniformly within ``variance_radius`` x the
        per-pixel bound around ``x``."""
        cfg = self.config
        total = torch.zeros_like(x)
        for _ in range(cfg.variance_samples):
            r = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x) * cfg.variance_radius * bound
            total = total + self._loss_grad(x + r, x0, loss_fn, bound, margins, gen)[1]
        return total / cfg.variance_samples

    @staticmethod
    def _project(x0: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, bound: torch.Tensor,
                 sparse: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Into the budget: per-pixel bound, no colour cast (mean change 0 over the mask), inside [0, 1]; with
        ``sparse`` = (cost, total) also the mean-CIEDE2000 ball."""
        # delta is already the masked change: bound it (the bound is 0 outside the mask and tapers with it) and
        # remove its mean, without multiplying by the mask again (that would shrink it at every step in the taper)
        d = remove_colour_cast(bound_residual(delta.detach(), bound), mask)
        if sparse is not None:
            d = project_sparse(d, sparse[0], bound, sparse[1])
        d = torch.maximum(torch.minimum(d, bound), -bound)  # the cast removal may step over the bound by a hair
        return (x0 + d).clamp(0, 1) - x0
