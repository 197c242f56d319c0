"""Template inversion networks: an FR template (unit vector) -> the ArcFace-aligned face (64 px, RGB [0, 1]).

Two deliberately different architectures:

* :class:`ShadowDecoder` (the defender's shadow model, shipped): DCGAN-style, bottleneck MLP to a 4x4 grid and
  stride-2 transposed convolutions with BatchNorm and LeakyReLU.
* :class:`AttackerDecoder` (the evaluation attacker, never the shadow): MLP to an 8x8 grid, residual blocks with
  GroupNorm and SiLU, sub-pixel (PixelShuffle) upsampling, trained on the other half of the identities.

Both are trained with L1 + (1 - SSIM) by ``scripts/train_advface.py``. Saved files are fp16 safetensors whose
metadata name the FR model (and the sha256 of its weights) the decoder inverts, so that a decoder is never used on
another model's templates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fluxguard.errors import FluxguardError

if TYPE_CHECKING:
    from fluxguard.recognition.base import FaceRecognizer

FORMAT = "fluxguard-advface-decoder/1"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights" / "advface"


class ShadowDecoder(nn.Module):
    """DCGAN-style template inverter: ``(B, dim)`` unit templates -> ``(B, 3, 64, 64)`` images in [0, 1].

    Bottleneck MLP to a 4x4 grid, then stride-2 transposed convolutions (BatchNorm, LeakyReLU) up to 64 px, with
    one 3x3 refinement convolution at 16 px.
    """

    def __init__(self, dim: int, widths: tuple[int, ...] = (128, 64, 48, 32), bottleneck: int = 128) -> None:
        super().__init__()
        self.dim, self.widths, self.bottleneck = dim, tuple(widths), bottleneck
        self.fc = nn.Sequential(nn.Linear(dim, bottleneck), nn.LeakyReLU(0.2), nn.Linear(bottleneck, widths[0] * 16))
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0]), nn.LeakyReLU(0.2)]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.LeakyReLU(0.2)]
            if i == 1:
                layers += [nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.out = nn.ConvTranspose2d(widths[-1], 3, 4, stride=2, padding=1)

    @property
    def config(self) -> dict:
        return {"arch": "shadow", "dim": self.dim, "widths": list(self.widths), "bottleneck": self.bottleneck}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(len(z), self.widths[0], 4, 4)
        return torch.sigmoid(self.out(self.body(h)))


class _ResBlock(nn.Module):
    def __init__(self, ch: int, groups: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                 nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class AttackerDecoder(nn.Module):
    """Residual sub-pixel template inverter (a different design from the shadow): ``(B, dim)`` -> ``(B, 3, 64, 64)``.

    MLP to an 8x8 grid, a residual block (GroupNorm, SiLU) per scale, 3x3 convolution + PixelShuffle upsampling.
    """

    def __init__(self, dim: int, widths: tuple[int, ...] = (64, 32, 24), hidden: int = 256) -> None:
        super().__init__()
        self.dim, self.widths, self.hidden = dim, tuple(widths), hidden
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, widths[0] * 64))
        layers: list[nn.Module] = [_ResBlock(widths[0])]
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers += [nn.Conv2d(cin, cout * 4, 3, padding=1), nn.PixelShuffle(2)]
            if i == 0:
                layers += [_ResBlock(cout)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Sequential(nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], 12, 3, padding=1),
                                 nn.PixelShuffle(2))

    @property
    def config(self) -> dict:
        return {"arch": "attacker", "dim": self.dim, "widths": list(self.widths), "hidden": self.hidden}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(len(z), self.widths[0], 8, 8)
        return 0.5 + 0.5 * torch.tanh(self.out(self.body(h)))


ARCHS: dict[str, type[nn.Module]] = {"shadow": ShadowDecoder, "attacker": AttackerDecoder}


def build_decoder(arch: str, dim: int, **kwargs: object) -> nn.Module:
    """A fresh decoder of architecture ``arch`` (``"shadow"`` or ``"attacker"``) for ``dim``-d templates."""
    if arch not in ARCHS:
        raise FluxguardError(f"unknown decoder architecture {arch!r}; valid: {', '.join(ARCHS)}")
    return ARCHS[arch](dim, **kwargs)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image mean SSIM of (B, C, H, W) images in [0, 1]: Gaussian window, valid region (as in Wang et al. 2004).

    A separable window (kornia's 2-D filter made training several times slower on CPU); differentiable.
    """
    c = x.shape[1]
    t = torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = (g / g.sum()).repeat(5 * c, 1, 1, 1)  # (5C, 1, 1, k)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    blur = F.conv2d(F.conv2d(stack, g, groups=5 * c), g.transpose(-1, -2), groups=5 * c)
    mx, my, xx, yy, xy = blur.split(c, dim=1)
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                        w_ssim: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 + ``w_ssim`` (1 - SSIM), and its parts (detached) for logging."""
    l1 = F.l1_loss(pred, target)
    if w_ssim == 0:
        return l1, {"l1": l1.detach()}
    s = ssim(pred, target).mean()
    return l1 + w_ssim * (1 - s), {"l1": l1.detach(), "ssim": s.detach()}


# --- files ------------------------------------------------------------------------------------------------------


def fr_weights_sha256(model: type[FaceRecognizer] | FaceRecognizer) -> str:
    """sha256 of the FR model's weights file (what the templates were made with), or of its source when absent."""
    from fluxguard.recognition.sources import sha256_file

    path = model.local_weights()
    return sha256_file(path) if path.is_file() else model.spec.source_sha256


def decoder_path(role: str, fr_model: str) -> Path:
    """Where the shipped decoder of ``role`` for FR model ``fr_model`` lives."""
    return WEIGHTS_DIR / f"{role}-{fr_model}.safetensors"


def attackers_dir() -> Path:
    """Folder of the evaluation attackers, in the user cache: trained where the evaluation runs
    (:func:`fluxguard.features.training.train_attacker`, ``fluxguard features evaluate`` when one is missing), as an
    attacker trains its own inverter; they are not shipped (about 2.6 MB each, beyond the repository's budget)."""
    from fluxguard.recognition.sources import cache_dir

    return cache_dir() / "advface" / "attackers"


def save_decoder(net: nn.Module, fr_model: type[FaceRecognizer], role: str, path: Path | None = None,
                 extra: dict[str, str] | None = None) -> Path:
    """Write ``net`` as fp16 safetensors with the metadata that ties it to ``fr_model`` (atomic)."""
    from safetensors.torch import save_file

    path = decoder_path(role, fr_model.spec.name) if path is None else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "role": role, "fr_model": fr_model.spec.name,
            "fr_weights_sha256": fr_weights_sha256(fr_model), "config": json.dumps(net.config), **(extra or {})}
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(path)
    return path


def load_decoder(path: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """A decoder file -> (the network in fp32 eval mode with frozen weights, its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FluxguardError("decoder weights not found", path=path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise FluxguardError(f"not an AdvFace decoder file (format {meta.get('format')!r})", path=path)
    cfg = json.loads(meta["config"])
    arch = cfg.pop("arch")
    net = build_decoder(arch, **cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    net.load_state_dict(state)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, meta
