"""LPIPS and FID from weights the user supplies (neither can be downloaded here, and neither ships with fluxguard).

- LPIPS (Zhang et al. 2018, VGG variant): the torchvision VGG16 ImageNet state dict (``vgg16-397923af.pth``) for
  the backbone and the ``lpips`` package's linear-layer file ``weights/v0.1/vgg.pth``. Features at relu1_2, relu2_2,
  relu3_3, relu4_3 and relu5_3 are unit-normalised over channels, their squared difference weighted per channel by
  the linear layers, averaged over space and summed over layers, as the reference implementation does.
- FID: a TorchScript Inception feature extractor called as ``model(uint8 images, return_features=True)`` returning
  (N, 2048), the convention of NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN3 metrics, clean-fid), then the
  Fréchet distance between the two sets' Gaussian fits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fluxguard.errors import ConfigError

# torchvision VGG16 ``features`` layout: conv channels, "M" = max-pool; LPIPS taps the ReLUs ending each block
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in ``features``
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def _load(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found", path=path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            c_in = int(v)
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS distance (VGG) of (B, 3, H, W) images in [0, 1]; lower = more similar, 0 for identical images.

    Args:
        vgg16_weights: torchvision VGG16 state dict (keys ``features.N.weight``; the classifier is ignored).
        linear_weights: the lpips package's ``vgg.pth`` (keys ``linK.model.1.weight``, K = 0..4).
    """

    def __init__(self, vgg16_weights: str | Path | dict, linear_weights: str | Path | dict) -> None:
        super().__init__()
        vgg = vgg16_weights if isinstance(vgg16_weights, dict) else _load(vgg16_weights, "VGG16 weights")
        lin = linear_weights if isinstance(linear_weights, dict) else _load(linear_weights, "LPIPS linear weights")
        self.features = vgg16_features()
        feats = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
        missing = set(self.features.state_dict()) - set(feats)
        if missing:
            raise ConfigError(f"not a torchvision VGG16 state dict (missing {sorted(missing)[:3]}...)")
        self.features.load_state_dict({k: feats[k] for k in self.features.state_dict()})
        try:
            self.lins = nn.ParameterList([nn.Parameter(lin[f"lin{k}.model.1.weight"].float().reshape(1, -1, 1, 1))
                                          for k in range(len(LPIPS_TAPS))])
        except KeyError as e:
            raise ConfigError(f"not an LPIPS vgg.pth linear-layer file (missing {e})") from None
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x * 2 - 1 - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
            if i == LPIPS_TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(((a - b).square() * w).sum(1).mean((1, 2))
                   for a, b, w in zip(self._taps(x), self._taps(y), self.lins, strict=True))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), the FID formula (Heusel et al. 2017)."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as the reference code does
        eps = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise ConfigError("FID needs at least two images per set")
    return f.mean(0), np.cov(f, rowvar=False)


class InceptionFID:
    """FID between two image sets with a user-supplied TorchScript Inception (``inception-2015-12-05.pt``)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("Inception TorchScript file not found", path=path)
        self.model = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def features(self, images: list[np.ndarray], batch: int = 16) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch):
            x = torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in
                             images[i : i + batch]])
            x = torch.nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.model(x.round().clamp(0, 255).to(torch.uint8), return_features=True).float().numpy())
        return np.concatenate(out)

    def __call__(self, a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return frechet_distance(*gaussian_fit(self.features(a)), *gaussian_fit(self.features(b)))
