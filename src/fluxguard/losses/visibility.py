"""What the eye sees of a change to a face: a pixel-domain JND model, the visible share, and visibility budgets.

The just-noticeable difference (JND) of a pixel is the largest change of its luminance a viewer cannot see. The
model is the classic pixel-domain one (no learned weights):

* luminance adaptation (Chou & Li 1995): ``T_l = 17 (1 - sqrt(bg / 127)) + 3`` for a background luminance
  ``bg <= 127``, else ``3/128 (bg - 127) + 3`` (grey levels), ``bg`` the 5x5 weighted mean around the pixel;
* texture masking (Yang et al. 2005): ``T_t = 0.117 * mg * W_e``, ``mg`` the largest of four 5x5 directional
  gradients, ``W_e`` lowers masking near structural edges (Canny edges weigh 0.1, smoothed), since a change along
  an eye or lip contour shows where the same change in skin texture or hair does not;
* the nonlinear additivity model for masking: ``JND = T_l + T_t - 0.3 min(T_l, T_t)``.

The map serves twice: as a metric (:func:`visible_fraction`, the share of face pixels whose change exceeds their
JND) and as an allocation (:class:`VisibilityBudget`: a per-pixel bound from the scaled JND terms, so a method puts its
change where texture hides it and not onto smooth skin).

References:
    C.-H. Chou, Y.-C. Li, "A perceptually tuned subband image coder based on the measure of just-noticeable-
    distortion profile", IEEE TCSVT 5(6), 1995.
    X. Yang, W. Lin, Z. Lu, E. Ong, S. Yao, "Motion-compensated residue preprocessing in video coding based on
    just-noticeable-distortion profile", IEEE TCSVT 15(6), 2005.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fluxguard.errors import ConfigError

# 5x5 kernels of Chou & Li: background luminance (sum 32) and the four directional gradient operators (/16).
_BG_KERNEL = ((1, 1, 1, 1, 1), (1, 2, 2, 2, 1), (1, 2, 0, 2, 1), (1, 2, 2, 2, 1), (1, 1, 1, 1, 1))
_GRAD_KERNELS = (
    ((0, 0, 0, 0, 0), (1, 3, 8, 3, 1), (0, 0, 0, 0, 0), (-1, -3, -8, -3, -1), (0, 0, 0, 0, 0)),
    ((0, 0, 1, 0, 0), (0, 8, 3, 0, 0), (1, 3, 0, -3, -1), (0, 0, -3, -8, 0), (0, 0, -1, 0, 0)),
    ((0, 0, 1, 0, 0), (0, 0, 3, 8, 0), (-1, -3, 0, 3, 1), (0, -8, -3, 0, 0), (0, 0, -1, 0, 0)),
    ((0, 1, 0, -1, 0), (0, 3, 0, -3, 0), (0, 8, 0, -8, 0), (0, 3, 0, -3, 0), (0, 1, 0, -1, 0)),
)
TEXTURE_GAIN = 0.117  # Yang et al.'s eta
OVERLAP = 0.3  # C_lt of the nonlinear additivity model
EDGE_WEIGHT = 0.1  # texture masking kept on structural edges
EDGE_SIGMA = 2.0  # Canny scale (px on a 256 px portrait crop): contours of eyes, lips, jaw; not hair strands
DETAIL_SIGMA = 2.0  # px: texture masking is measured on the detail layer, the luma minus its blur


CAST_TOLERANCE = 0.1 / 255  # mean change per channel over the mask the final projection leaves alone


def luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) BT.601 luma in grey levels [0, 255] of (B, 3, H, W) RGB in [0, 1]."""
    w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) * 255.0


def _gaussian_blur(y: torch.Tensor, sigma: float) -> torch.Tensor:
    from kornia.filters import gaussian_blur2d

    k = 2 * int(3 * sigma) + 1
    return gaussian_blur2d(y, (k, k), (sigma, sigma), border_type="replicate")


def _edge_weight(y: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) texture-masking weight: EDGE_WEIGHT on (dilated) Canny edges, 1 elsewhere, smoothed."""
    import cv2
    from skimage.feature import canny

    out = []
    for img in y[:, 0].detach().cpu().numpy():
        edges = canny(img / 255.0, sigma=EDGE_SIGMA).astype(np.uint8)
        edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))
        w = 1.0 - (1.0 - EDGE_WEIGHT) * edges.astype(np.float32)
        out.append(cv2.GaussianBlur(w, (7, 7), 0.8))
    return torch.from_numpy(np.stack(out))[:, None].to(y)


@torch.no_grad()
def jnd_components(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(luminance adaptation ``T_l``, texture masking ``T_t``) of (B, 3, H, W) RGB in [0, 1], each (B, 1, H, W) in
    grey levels [0, 255]."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) RGB images, got {tuple(x.shape)}")
    y = luma(x.float())
    pad = F.pad(y, (2, 2, 2, 2), mode="replicate")
    bg_k = y.new_tensor(_BG_KERNEL).view(1, 1, 5, 5) / 32.0
    bg = F.conv2d(pad, bg_k)
    grads = y.new_tensor(_GRAD_KERNELS).view(4, 1, 5, 5) / 16.0
    # texture is measured on the detail layer: smooth shading ramps (a lit forehead, a cheek's curve) have large
    # gradients but mask nothing, and changes there show
    detail = y - _gaussian_blur(y, DETAIL_SIGMA)
    mg = F.conv2d(F.pad(detail, (2, 2, 2, 2), mode="replicate"), grads).abs().amax(1, keepdim=True)
    dark = 17.0 * (1 - torch.sqrt(bg.clamp_min(0) / 127.0)) + 3.0
    t_l = torch.where(bg <= 127, dark, 3.0 / 128.0 * (bg - 127) + 3.0)
    t_t = TEXTURE_GAIN * mg * _edge_weight(y)
    return t_l, t_t


def combine(t_l: torch.Tensor, t_t: torch.Tensor) -> torch.Tensor:
    """The nonlinear additivity model for masking: ``T_l + T_t - 0.3 min(T_l, T_t)``."""
    return t_l + t_t - OVERLAP * torch.minimum(t_l, t_t)


@torch.no_grad()
def jnd_map(x: torch.Tensor) -> torch.Tensor:
    """The JND of every pixel of (B, 3, H, W) RGB images in [0, 1], as (B, 1, H, W) in [0, 1] units (grey / 255).

    >>> flat = torch.full((1, 3, 32, 32), 0.5)
    >>> round(float(jnd_map(flat)[0, 0, 16, 16]) * 255, 2)  # smooth mid-grey: luminance adaptation alone
    3.0
    """
    return combine(*jnd_components(x)) / 255.0


def visible_fraction(original: torch.Tensor, changed: torch.Tensor, mask: torch.Tensor | None = None,
                     jnd: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) share of pixels (weighted by ``mask``, (B, 1, H, W) in [0, 1]) whose change exceeds their JND.

    A pixel's change is its largest absolute change over R, G and B (a colour shift the luma would hide counts).
    """
    j = jnd_map(original) if jnd is None else jnd
    d = (changed.float() - original.float()).abs().amax(1, keepdim=True)
    seen = (d > j + 0.5 / 255).float()  # half a grey level: 8-bit rounding alone is never "visible"
    w = torch.ones_like(seen) if mask is None else mask.float()
    return (seen * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)


@dataclass(frozen=True)
class VisibilityBudget:
    """How much a protection may show, the same for every method.

    The per-pixel bound on each channel's change is the JND with its two terms scaled: ``smooth_scale x T_l``
    (what any pixel may take, smooth skin included) and ``texture_scale x T_t`` (what texture hides on top), combined
    by the additivity model. Scales <= 1 keep every pixel under its JND; a larger ``texture_scale`` lets grain show
    in textured areas only.

    Attributes:
        name: ``low``, ``medium`` or ``high`` (or a user's own).
        smooth_scale: multiplies luminance adaptation ``T_l``.
        texture_scale: multiplies texture masking ``T_t``.
        max_delta_e: cap on the mean CIEDE2000 colour difference over the face mask.
        max_visible: cap on :func:`visible_fraction` over the face mask.
    """

    name: str
    smooth_scale: float
    texture_scale: float
    max_delta_e: float
    max_visible: float

    def __post_init__(self) -> None:
        if min(self.smooth_scale, self.texture_scale, self.max_delta_e) <= 0 or not 0 < self.max_visible <= 1:
            raise ConfigError(f"invalid visibility budget {self}")

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) per-pixel bound in [0, 1] units for (B, 3, H, W) images ``x``."""
        t_l, t_t = jnd_components(x)
        return combine(self.smooth_scale * t_l, self.texture_scale * t_t) / 255.0


# Set from contact sheets of every method on held-out faces (benchmarks/results/visibility.md): "low" is not visible
# at 100 % side by side (every pixel under its JND), "medium" at most a faint grain or tone change in textured areas
# (smooth skin stays at its JND, texture takes more), "high" visible but natural.
BUDGETS: dict[str, VisibilityBudget] = {
    "low": VisibilityBudget("low", smooth_scale=0.6, texture_scale=1.0, max_delta_e=1.0, max_visible=0.05),
    "medium": VisibilityBudget("medium", smooth_scale=0.8, texture_scale=2.5, max_delta_e=2.0, max_visible=0.5),
    "high": VisibilityBudget("high", smooth_scale=1.0, texture_scale=4.0, max_delta_e=3.0, max_visible=0.9),
}


def get_budget(budget: str | VisibilityBudget | Mapping[str, Any] | None) -> VisibilityBudget:
    """A :data:`BUDGETS` entry by name (``None``: ``medium``), the budget itself, or a budget from its fields (as a
    method's ``params()`` records it)."""
    if isinstance(budget, VisibilityBudget):
        return budget
    if isinstance(budget, Mapping):
        try:
            return VisibilityBudget(**budget)
        except TypeError as e:
            raise ConfigError(f"a visibility budget needs the fields name, smooth_scale, texture_scale, max_delta_e "
                              f"and max_visible: {e}") from None
    name = "medium" if budget is None else str(budget)
    if name not in BUDGETS:
        raise ConfigError(f"unknown visibility budget {name!r}; valid: {', '.join(BUDGETS)}")
    return BUDGETS[name]


@torch.no_grad()
def calibrated_bound(x: torch.Tensor, mask: torch.Tensor, budget: VisibilityBudget, luma_only: bool = False,
                     seed: int = 0) -> torch.Tensor:
    """(B, 1, H, W) per-pixel bound ``s x budget.bound(x) x mask`` with, per face, the largest ``s <= 1`` at which a
    change sitting at the bound with random signs (what sign-gradient attacks converge to) keeps the mean CIEDE2000
    over the mask at 95 % of ``budget.max_delta_e``.

    The JND shapes the allocation (texture takes more than smooth skin); the scale makes the colour-difference cap
    hold where the bound alone would not, so the final projection rarely has to shrink an optimised change.
    ``luma_only`` probes with one sign per
    pixel for all channels (grey-level changes cost less CIEDE2000 than chroma noise).
    """
    bound = budget.bound(x) * mask.float()
    gen = torch.Generator().manual_seed(seed)
    shape = (x.shape[0], 1 if luma_only else 3, *x.shape[-2:])
    signs = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(x)
    out = []
    for i in range(x.shape[0]):
        xi = x[i].permute(1, 2, 0).cpu().numpy()
        w = mask[i, 0].float().cpu().numpy()

        def de(s: float, i=i, xi=xi, w=w) -> float:
            y = (x[i] + s * bound[i] * signs[i]).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            return _weighted_mean(delta_e_2000(xi, y), w)

        target = 0.95 * budget.max_delta_e
        s = 1.0
        if de(s) > target:
            lo, hi = 0.0, 1.0
            for _ in range(10):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if de(mid) <= target else (lo, mid)
            s = lo
        out.append(s * bound[i : i + 1])
    return torch.cat(out)


@torch.no_grad()
def delta_e_cost(x: torch.Tensor, step: float = 2 / 255) -> torch.Tensor:
    """(B, 1, H, W) CIEDE2000 per unit of a grey-level change (the same change on R, G and B) at each pixel,
    measured with a ``step`` change up and down (CIEDE2000 is close to linear in small changes)."""
    out = []
    for img in x.detach().float():
        a = img.permute(1, 2, 0).cpu().numpy()
        up = delta_e_2000(a, np.clip(a + step, 0, 1))
        down = delta_e_2000(a, np.clip(a - step, 0, 1))
        out.append(torch.from_numpy(np.maximum(up, down) / step).float())
    return torch.stack(out)[:, None].to(x.device)


def project_sparse(change: torch.Tensor, cost: torch.Tensor, bound: torch.Tensor, total: torch.Tensor,
                   iters: int = 40) -> torch.Tensor:
    """Euclidean projection of a per-pixel change onto ``|c| <= bound`` and ``sum(cost |c|) <= total`` per face.

    The second constraint is the mean colour difference of the budget (``cost`` = CIEDE2000 per unit change,
    ``total`` = cap x mask area): an L1 ball, so the projection is a soft threshold ``sign(v) clip(|v| - lam cost,
    0, bound)`` with ``lam`` found by bisection. It keeps the change where it does the most per unit of visibility
    and leaves the rest of the face untouched.

    Args:
        change: (B, C, H, W); cost, bound: (B, 1, H, W); total: (B,).
    """
    a = change.abs()
    sgn = change.sign()

    def spent(lam: torch.Tensor) -> torch.Tensor:
        kept = torch.minimum((a - lam[:, None, None, None] * cost).clamp_min(0), bound)
        return (cost * kept).flatten(1).sum(1) / change.shape[1]

    lo = torch.zeros_like(total)
    hi = (a / cost.clamp_min(1e-6)).flatten(1).amax(1)
    need = spent(lo) > total
    if bool(need.any()):
        for _ in range(iters):
            mid = (lo + hi) / 2
            over = spent(mid) > total
            lo = torch.where(over, mid, lo)
            hi = torch.where(over, hi, mid)
        lam = torch.where(need, hi, torch.zeros_like(hi))
    else:
        lam = lo
    return sgn * torch.minimum((a - lam[:, None, None, None] * cost).clamp_min(0), bound)


def remove_colour_cast(residual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract from a masked residual ``R = m * D`` its mask-weighted mean per channel (as ``m * c``), so the face's
    mean colour does not move; the result is still zero where the mask is."""
    m = mask.float()
    c = (residual * m).flatten(2).sum(2) / (m * m).flatten(2).sum(2).clamp_min(1e-8)  # (B, 3)
    return residual - m * c[:, :, None, None]


def bound_residual(residual: torch.Tensor, bound: torch.Tensor, soft: bool = False) -> torch.Tensor:
    """Clamp a residual per pixel to ``[-bound, bound]``; ``soft``: ``bound * tanh(R / bound)`` (gradients flow)."""
    if soft:
        b = bound.clamp_min(1e-6)
        return b * torch.tanh(residual / b)
    return torch.maximum(torch.minimum(residual, bound), -bound)


def shape_residual(residual: torch.Tensor, mask: torch.Tensor, bound: torch.Tensor, soft: bool = False
                   ) -> torch.Tensor:
    """The change a method may make: masked, bounded per pixel (``bound``, e.g. :meth:`VisibilityBudget.bound`), no
    colour cast.

    Bounded, freed of its mean over the mask, bounded again (so the bound holds exactly and the cast left is what
    the second clamp shaves off: nothing, unless many pixels sit at the bound with one sign). Differentiable (with
    ``soft``), so methods optimise the very change they will output.
    """
    b = bound * mask
    r = remove_colour_cast(bound_residual(residual * mask, b, soft), mask)
    return bound_residual(r, b, soft)


def delta_e_2000(original: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """(H, W) CIEDE2000 colour difference of two (H, W, 3) RGB images (uint8, or float in [0, 1])."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    def lab(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        return rgb2lab(a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64))

    return deltaE_ciede2000(lab(original), lab(changed))


def _weighted_mean(values: np.ndarray, weight: np.ndarray) -> float:
    return float((values * weight).sum() / max(float(weight.sum()), 1e-8))


@torch.no_grad()
def project_to_budget(original: torch.Tensor, changed: torch.Tensor, mask: torch.Tensor,
                      budget: VisibilityBudget, jnd: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict]]:
    """The final projection every method's output goes through: ``x + s * shape(changed - x)``.

    The residual is masked, bounded by ``budget.bound`` and freed of any colour cast; then, per face, the
    largest scale ``s <= 1`` keeps the mean CIEDE2000 over the mask under ``budget.max_delta_e`` and the visible
    fraction under ``budget.max_visible`` (bisection; both grow with ``s``).

    Returns:
        (B, 3, H, W) projected images in [0, 1] and, per face, ``{"scale", "delta_e", "visible"}`` after projection.
    """
    x = original.float()
    j = jnd_map(x) if jnd is None else jnd
    m = mask.float()
    b = budget.bound(x) * m
    r = bound_residual((changed.float() - x) * m, b)
    cast = (r * m).flatten(2).sum(2) / (m * m).flatten(2).sum(2).clamp_min(1e-8)
    if float(cast.abs().max()) > CAST_TOLERANCE:  # the methods remove it themselves; this is the safety net
        r = shape_residual(r, m, b)
    out, stats = [], []
    for i in range(x.shape[0]):
        xi, ri, mi, ji = x[i : i + 1], r[i : i + 1], m[i : i + 1], j[i : i + 1]
        w = mi[0, 0].cpu().numpy()
        x_np = xi[0].permute(1, 2, 0).cpu().numpy()

        def measure(s: float, xi=xi, ri=ri, mi=mi, ji=ji, w=w, x_np=x_np) -> tuple[float, float, torch.Tensor]:
            y = (xi + s * ri).clamp(0, 1)
            de = _weighted_mean(delta_e_2000(x_np, y[0].permute(1, 2, 0).cpu().numpy()), w)
            return de, float(visible_fraction(xi, y, mi, ji)[0]), y

        def fits(de: float, vis: float) -> bool:
            return de <= budget.max_delta_e and vis <= budget.max_visible

        s = 1.0
        de, vis, y = measure(s)
        if not fits(de, vis):
            lo, hi = 0.0, 1.0
            for _ in range(12):
                mid = (lo + hi) / 2
                if fits(*measure(mid)[:2]):
                    lo = mid
                else:
                    hi = mid
            s = lo
            de, vis, y = measure(s)
        out.append(y)
        stats.append({"scale": round(s, 4), "delta_e": de, "visible": vis})
    return torch.cat(out), stats


def budget_usage(change: torch.Tensor, bound: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) how much of the per-pixel budget a (shaped) change uses: mask-weighted mean of ``(change / bound)^2``,
    0 for no change, 1 when every channel of every pixel sits at its bound."""
    ratio = (change / bound.clamp_min(1e-6)).pow(2).mean(1, keepdim=True)
    m = mask.float()
    return (ratio * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-8)
