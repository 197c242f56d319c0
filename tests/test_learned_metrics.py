"""LPIPS / FID from user-supplied weights (random stand-ins here) and the ``fluxguard quality`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fluxguard.errors import ConfigError
from fluxguard.eval.learned_metrics import LPIPS, InceptionFID, frechet_distance, gaussian_fit, vgg16_features


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory):
    torch.manual_seed(0)
    vgg = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision dict also has the classifier: ignored
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    d = tmp_path_factory.mktemp("lpips")
    torch.save(vgg, d / "vgg16.pth")
    torch.save(lin, d / "vgg.pth")
    return d / "vgg16.pth", d / "vgg.pth"


def test_lpips_is_zero_for_identical_images_and_grows_with_change(lpips_weights):
    m = LPIPS(*lpips_weights)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        d0 = m(x, x)
        d1 = m(x, (x + 0.02 * noise).clamp(0, 1))
        d2 = m(x, (x + 0.2 * noise).clamp(0, 1))
    assert torch.allclose(d0, torch.zeros(2), atol=1e-6)
    assert (d1 > 0).all() and (d2 > d1).all()
    assert torch.allclose(m(d2.new_ones(1, 3, 32, 32) * 0.3, x[:1, :, :32, :32]),
                          m(x[:1, :, :32, :32], d2.new_ones(1, 3, 32, 32) * 0.3), atol=1e-6)  # symmetric


def test_lpips_rejects_wrong_files(lpips_weights, tmp_path):
    vgg, lin = lpips_weights
    with pytest.raises(ConfigError, match="linear-layer"):
        LPIPS(vgg, vgg)
    with pytest.raises(ConfigError, match="VGG16"):
        LPIPS(lin, lin)
    with pytest.raises(ConfigError, match="not found"):
        LPIPS(tmp_path / "nope.pth", lin)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    expected = 1 + 0 + 4 + (1 + 4 - 2 * 2) + (4 + 4 - 2 * 4) + (9 + 1 - 2 * 3)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)
    f = np.random.default_rng(0).normal(size=(200, 4))
    assert frechet_distance(*gaussian_fit(f), *gaussian_fit(f)) == pytest.approx(0.0, abs=1e-6)


class _StubInception(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        f = x.float().mean(dim=(2, 3))
        return torch.cat([f, f.square() / 255], dim=1)


def test_fid_with_a_torchscript_feature_extractor(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.script(_StubInception()).save(str(path))
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(12)]
    b = [np.clip(im.astype(int) + 60, 0, 255).astype(np.uint8) for im in a]
    fid = InceptionFID(path)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-3)
    assert fid(a, b) > 100
    with pytest.raises(ConfigError, match="not found"):
        InceptionFID(tmp_path / "missing.pt")


def test_cli_quality_on_files_and_folders(tmp_path, astronaut, lpips_weights):
    from fluxguard.cli import app
    from fluxguard.io import save_image

    noisy = np.clip(astronaut.astype(int) + np.random.default_rng(0).integers(-8, 9, astronaut.shape), 0, 255)
    (tmp_path / "orig").mkdir()
    (tmp_path / "prot").mkdir()
    save_image(tmp_path / "orig" / "me.png", astronaut)
    save_image(tmp_path / "prot" / "me_protected.png", noisy.astype(np.uint8))
    runner = CliRunner()
    res = runner.invoke(app, ["quality", str(tmp_path / "orig"), str(tmp_path / "prot"), "--json",
                              "--lpips", f"{lpips_weights[0]},{lpips_weights[1]}"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)["pairs"]
    assert 30 < row["psnr"] < 40 and 0 < row["ssim"] < 1 and row["lpips"] > 0
    res = runner.invoke(app, ["quality", str(tmp_path / "orig" / "me.png"), str(tmp_path / "nope.png")])
    assert res.exit_code != 0 and "two image files or two folders" in res.output
