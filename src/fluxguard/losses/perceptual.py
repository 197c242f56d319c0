"""Perceptual losses for Flux-Guard's adaptive identity weighting.

The paper's ``L_p`` is the MSE of VGG19 ``relu3_4`` activations (torchvision ``vgg19(IMAGENET1K_V1).features[:18]``
on ImageNet-normalised input) between the adversarial image and the clean edited image, and the identity weight
is ``w_id = w_min + (w_max - w_min) / (1 + exp(k (L_p - tau)))`` with tau = 0.3, k = 20, in those units.

* :class:`VGGPerceptualLoss` reproduces that exactly when the user supplies the torchvision VGG19 weights (a
  state-dict file; the network is built here, so torchvision is not needed).
* :class:`SSIMPerceptualLoss` is the offline substitute (no weights anywhere): a multi-scale SSIM distance
  ``D = 1 - mean_s SSIM_s`` expressed in *VGG-equivalent units* ``L_p = scale * D``. Both VGG feature MSE and
  ``1 - SSIM`` grow quadratically with a small perturbation's amplitude, so a linear rescale keeps the shape of the
  weighting curve; ``scale = 0.3 / tau_ssim`` puts the curve's midpoint (w_id = 0.525) at ``D = tau_ssim`` and keeps
  ``k * tau`` (the curve's relative steepness) at the paper's 6. The default tau_ssim = 0.05 (mean SSIM 0.95, the
  usual "visually near-lossless" level) is a *choice*, not a measured VGG equivalence: see
  ``scripts/perceptual_curve.py --vgg`` to fit the scale against VGG19 where its weights are available.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fluxguard.errors import FluxguardError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision VGG19 "E" configuration up to relu3_4 = features index 17.
VGG19_RELU3_4_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256)
PAPER_TAU, PAPER_K, PAPER_W_MIN, PAPER_W_MAX = 0.3, 20.0, 0.05, 1.0
DEFAULT_SSIM_TAU = 0.05


def adaptive_id_weight(lp: float, tau: float = PAPER_TAU, k: float = PAPER_K, w_min: float = PAPER_W_MIN,
                       w_max: float = PAPER_W_MAX) -> float:
    """``w_id = clip(w_min + (w_max - w_min) / (1 + exp(k (lp - tau))), w_min, w_max)`` (a detached scalar).

    >>> round(adaptive_id_weight(0.3), 3)
    0.525
    """
    z = k * (float(lp) - tau)
    # exp overflows past ~709; the weight is w_min there anyway
    w = w_min if z > 700 else w_min + (w_max - w_min) / (1.0 + math.exp(z))
    return min(max(w, w_min), w_max)


def vgg19_relu3_4() -> nn.Sequential:
    """Randomly initialised ``vgg19().features[:18]`` with torchvision's layer indices (conv0 ... relu17)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG19_RELU3_4_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(v)
    return nn.Sequential(*layers)


def load_vgg_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read VGG19 weights (torchvision ``vgg19-dcbb9e9d.pth`` or a safetensors/pth features state dict).

    Keys may be ``features.N.weight`` (whole model) or ``N.weight`` (features only); only layers 0..16 are kept.
    """
    p = Path(path)
    if not p.is_file():
        raise FluxguardError("VGG19 weights file not found", path=p)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a bad file
        raise FluxguardError(f"cannot read VGG19 weights: {e}", path=p) from e
    out = {}
    for k, v in state.items():
        key = k.removeprefix("features.")
        idx = key.split(".")[0]
        if idx.isdigit() and int(idx) <= 16 and (k.startswith("features.") or k[0].isdigit()):
            out[key] = v.float()
    if len(out) != 16:  # 8 convs x (weight, bias)
        raise FluxguardError(f"not a VGG19 state dict: found {len(out)} of the 16 tensors of features[0:17]", path=p)
    return out


class VGGPerceptualLoss(nn.Module):
    """The paper's ``L_p``: MSE of VGG19 relu3_4 features of ImageNet-normalised [0, 1] RGB images.

    Args:
        weights: torchvision VGG19 IMAGENET1K_V1 weights (state-dict file), or a state dict.
    """

    name = "vgg19_relu3_4"
    tau = PAPER_TAU
    k = PAPER_K

    def __init__(self, weights: str | Path | dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.features = vgg19_relu3_4()
        state = weights if isinstance(weights, dict) else load_vgg_state(weights)
        self.features.load_state_dict(state)
        self.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """(B,) mean squared difference of relu3_4 activations."""
        fx = self.features((x.float() - self.mean) / self.std)
        # the reference is the same tensor for all Adam steps of one denoising step: embed it once
        if self._ref is None or self._ref[0] is not ref:
            with torch.no_grad():
                self._ref = (ref, self.features((ref.float() - self.mean) / self.std))
        return (fx - self._ref[1]).pow(2).flatten(1).mean(1)


def ms_ssim_distance(x: torch.Tensor, ref: torch.Tensor, window_size: int = 11, max_scales: int = 3) -> torch.Tensor:
    """(B,) ``1 - mean over scales of mean SSIM`` (Gaussian window, sigma 1.5), scales halved by 2x2 averaging.

    Scales stop before the image gets smaller than two windows, so 64-px test crops use 1 scale and 512-px crops 3.
    """
    from kornia.metrics import ssim

    vals = []
    a, b = x.float(), ref.float()
    for _ in range(max_scales):
        if min(a.shape[-2:]) < 2 * window_size and vals:
            break
        vals.append(ssim(a, b, window_size, max_val=1.0, padding="valid").flatten(1).mean(1))
        a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    return 1.0 - torch.stack(vals).mean(0)


class SSIMPerceptualLoss(nn.Module):
    """Offline substitute for the VGG loss: multi-scale SSIM distance in VGG-equivalent units.

    ``L_p = (PAPER_TAU / tau_ssim) * (1 - msSSIM)``, so the paper's tau = 0.3 and k = 20 give ``w_id = 0.525`` at
    ``1 - msSSIM = tau_ssim`` and the same relative steepness (see the module docstring).

    Args:
        tau_ssim: the SSIM distance at which the identity weight halves (default 0.05, i.e. msSSIM 0.95).
    """

    name = "ms_ssim"
    tau = PAPER_TAU
    k = PAPER_K

    def __init__(self, tau_ssim: float = DEFAULT_SSIM_TAU) -> None:
        super().__init__()
        if not 0 < tau_ssim < 1:
            raise ValueError(f"tau_ssim must be in (0, 1), got {tau_ssim}")
        self.tau_ssim = float(tau_ssim)
        self.scale = PAPER_TAU / self.tau_ssim

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.scale * ms_ssim_distance(x, ref.detach())


def perceptual_loss(vgg_weights: str | Path | None = None, tau_ssim: float = DEFAULT_SSIM_TAU) -> nn.Module:
    """The paper's VGG loss when ``vgg_weights`` is given, else the offline SSIM substitute."""
    if vgg_weights is not None:
        return VGGPerceptualLoss(vgg_weights)
    return SSIMPerceptualLoss(tau_ssim)
