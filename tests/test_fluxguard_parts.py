"""Flux-Guard's parts without FLUX: perceptual losses, the identity weight, edit masks on real landmark models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import torch_threads

from fluxguard.data import package_faces
from fluxguard.errors import ConfigError, FluxguardError
from fluxguard.faces.align import align_faces, portrait_template
from fluxguard.losses.perceptual import (
    PAPER_TAU,
    SSIMPerceptualLoss,
    VGGPerceptualLoss,
    adaptive_id_weight,
    ms_ssim_distance,
    perceptual_loss,
    vgg19_relu3_4,
)
from fluxguard.methods.edit_mask import (
    Dlib68Landmarker,
    build_edit_mask,
    latent_token_mask,
    region_masks,
    regions_for_prompt,
)

SIZE = 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def crops():
    out = []
    for f in package_faces():
        photo = torch.from_numpy(f.rgb).permute(2, 0, 1).float() / 255
        out.append(align_faces(photo, f.landmarks, SIZE)[0].crop)
    return out


# ------------------------------------------------------------------------------------------ perceptual
def test_vgg_features_layout_and_loading(tmp_path):
    net = vgg19_relu3_4()
    assert len(net) == 18 and isinstance(net[17], torch.nn.ReLU) and isinstance(net[16], torch.nn.Conv2d)
    assert net[16].out_channels == 256 and isinstance(net[4], torch.nn.MaxPool2d)
    # a torchvision-style whole-model state dict (classifier included) loads by its features.* keys
    state = {f"features.{k}": v for k, v in net.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "vgg19.pth")
    loss = VGGPerceptualLoss(tmp_path / "vgg19.pth")
    x = torch.rand(1, 3, 32, 32)
    assert loss(x, x).item() == 0.0 and loss(x, x.flip(-1)).item() > 0
    assert isinstance(perceptual_loss(tmp_path / "vgg19.pth"), VGGPerceptualLoss)
    del state["features.16.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(FluxguardError, match="15 of the 16"):
        VGGPerceptualLoss(tmp_path / "bad.pth")


def test_ssim_substitute_scale_and_weight(crops):
    x = crops[0][None]
    sub = perceptual_loss(None)
    assert isinstance(sub, SSIMPerceptualLoss) and sub.scale == pytest.approx(PAPER_TAU / 0.05)
    assert sub(x, x).item() == pytest.approx(0.0, abs=1e-5)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    d = ms_ssim_distance(noisy, x).item()
    assert 0 < d < 1 and sub(noisy, x).item() == pytest.approx(sub.scale * d, rel=1e-5)
    # the midpoint of the weighting curve sits at the chosen SSIM distance
    assert adaptive_id_weight(sub.scale * 0.05) == pytest.approx(0.525, abs=1e-3)
    # differentiable, and the gradient points towards the reference
    y = noisy.clone().requires_grad_(True)
    sub(y, x).sum().backward()
    assert (y.grad * (noisy - x)).sum() > 0


# ------------------------------------------------------------------------------------------ edit masks
@pytest.mark.parametrize(("prompt", "regions"), [
    ("A person wearing red lipstick and red-purple hair", ["lips", "hair"]),
    ("a face with blue eye shadow", ["eyeshadow"]),
    ("A bearded man with glasses", ["glasses", "beard"]),
    ("green eyes and thick eyebrows", ["brows", "eyes"]),
    ("smiling with facial hair", ["mouth", "beard"]),
    ("heavy makeup", ["lips", "eyeshadow", "cheeks"]),
    ("a tanned face", ["skin"]),
    ("an older face", ["face"]),
])
def test_prompt_regions(prompt, regions):
    assert regions_for_prompt(prompt) == regions


def test_prompt_without_region_is_a_clear_error():
    with pytest.raises(ConfigError, match="names no facial region.*lipstick"):
        regions_for_prompt("A person in a museum")


def _centroid(mask: torch.Tensor) -> np.ndarray:
    ys, xs = np.nonzero(mask.numpy())
    return np.array([xs.mean(), ys.mean()])


def test_facemesh_masks_sit_on_the_face(crops):
    t = portrait_template(SIZE)  # eyes, nose, mouth corners of the aligned crop
    iod = np.linalg.norm(t[1] - t[0])
    for crop in crops:
        lips = build_edit_mask(crop, "red lipstick")
        assert lips.landmarks is not None and lips.regions == ["lips"]
        assert np.linalg.norm(_centroid(lips.mask) - t[3:].mean(0)) < 0.25 * iod
        assert 0.3 < lips.area_percent < 5
        eyes = build_edit_mask(crop, "eyes").mask
        assert np.linalg.norm(_centroid(eyes) - t[:2].mean(0)) < 0.25 * iod
        hair = build_edit_mask(crop, "hair").mask
        assert _centroid(hair)[1] < t[:2, 1].mean() and float(hair[int(t[3, 1]), int(t[3, 0])]) == 0
        both = build_edit_mask(crop, "red lipstick and red-purple hair")
        assert both.area_percent > 10  # -> the authors' T_inj = 5


def test_facemesh_agrees_with_dlib(crops):
    from fluxguard.faces.facemesh import FaceMesh, mesh_to_68

    mesh, dl = FaceMesh.load(download=False), Dlib68Landmarker()
    for crop in crops:
        img = (crop.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        p_mesh = mesh_to_68(mesh(img))
        p_dlib = dl(img)
        inner = slice(17, 68)  # brows, nose, eyes, lips (jaw contours are defined differently)
        err = np.linalg.norm(p_mesh[inner] - p_dlib[inner], axis=1)
        iod = np.linalg.norm(p_dlib[36:42].mean(0) - p_dlib[42:48].mean(0))
        assert err.mean() < 0.08 * iod and err.max() < 0.2 * iod


def test_facemesh_rejects_a_non_face():
    from fluxguard.faces.facemesh import FaceMesh

    with pytest.raises(FluxguardError, match="no face"):
        FaceMesh.load(download=False)(np.full((SIZE, SIZE, 3), 128, np.uint8))


def test_dlib_regions_and_latent_mask(crops):
    img = (crops[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pts = Dlib68Landmarker()(img)
    m = region_masks(pts, SIZE)
    assert set(m) >= {"lips", "eyes", "brows", "nose", "skin", "hair", "beard", "cheeks", "chin", "forehead"}
    assert (m["skin"] & m["lips"]).sum() == 0 and (m["cheeks"] & ~m["skin"].astype(bool)).sum() == 0
    tok = latent_token_mask(torch.from_numpy(m["lips"].astype(np.float32)), 16, 16)
    assert tok.shape == (256, 1) and 0 < float(tok.max()) <= 1


def test_mask_on_an_unaligned_image_with_landmarks():
    f = package_faces()[0]  # the whole 512x512 astronaut photo, the paper's no-alignment setting
    img = torch.from_numpy(f.rgb).permute(2, 0, 1).float() / 255
    lips = build_edit_mask(img, "red lipstick", landmarks5=f.landmarks)
    iod = np.linalg.norm(f.landmarks[1] - f.landmarks[0])
    assert np.linalg.norm(_centroid(lips.mask) - f.landmarks[3:].mean(0)) < 0.25 * iod
