"""The shipped lite generators: they load through the ordinary backends, reconstruct real faces, sample, and the
default protection (Flux-Guard on the lite models) lowers the similarity seen by an FR model it did not attack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxguard.eval.quality import psnr, ssim
from fluxguard.faces.align import align_faces
from fluxguard.generators.lite import LITE_SIZE, lite_dir, load_lite_flux, load_lite_sd

# MTCNN (fluxguard.faces.detect.detect_faces) landmarks of skimage.data.astronaut(), fixed here so the test needs
# no detector.
ASTRONAUT_LANDMARKS = np.array(
    [[205.01, 101.73], [246.76, 103.71], [224.67, 128.96], [201.72, 139.25], [245.27, 141.86]]
)
# Measured on the shipped weights minus a margin of ~1 dB / 0.02: the astronaut values by this module's round trip
# (no results file holds them), the held-out mean by benchmarks/lite.py (benchmarks/results/lite.json).
ASTRONAUT_PSNR_FLOOR = 32.0  # measured 33.2 dB
ASTRONAUT_SSIM_FLOOR = 0.94  # measured 0.961
HELDOUT_PSNR_FLOOR = 31.0  # 435 eval-split crops: 33.3 dB mean


@pytest.fixture(scope="module")
def flux():
    return load_lite_flux()


@pytest.fixture(scope="module")
def sd():
    return load_lite_sd()


@pytest.fixture(scope="module")
def astronaut_crop(astronaut) -> torch.Tensor:
    photo = torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255
    return align_faces(photo, ASTRONAUT_LANDMARKS, LITE_SIZE)[0].crop[None]


def _to8(t: torch.Tensor) -> np.ndarray:
    return (t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _scores(a: torch.Tensor, b: torch.Tensor) -> list[tuple[float, float]]:
    return [(psnr(_to8(x), _to8(y)), ssim(_to8(x), _to8(y))) for x, y in zip(a, b, strict=True)]


def test_weights_are_small_fp16_and_load_frozen(flux, sd):
    files = [p for p in lite_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    from safetensors import safe_open

    for p in lite_dir().rglob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, p
    assert flux.name == "lite" and flux.text_free
    for module in (flux.vae, flux.transformer, sd.unet, sd.vae):
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
    cfg = flux.vae.config
    assert cfg.scaling_factor != 1.0 and cfg.shift_factor is not None  # set from the training latents
    assert flux.transformer.config.in_channels == 4 * cfg.latent_channels
    assert sd.unet.config.in_channels == cfg.latent_channels
    assert sd.scheduler.config.prediction_type == "epsilon"
    assert sd.null_embedding.shape[-1] == sd.unet.config.cross_attention_dim


def test_astronaut_face_roundtrip(flux, astronaut_crop):
    with torch.no_grad():
        rec = flux.decode(flux.encode(astronaut_crop), LITE_SIZE, LITE_SIZE)
    ((p, s),) = _scores(astronaut_crop, rec)
    assert p >= ASTRONAUT_PSNR_FLOOR and s >= ASTRONAUT_SSIM_FLOOR, (p, s)


def test_decoder_gradient_reaches_latent(flux, astronaut_crop):
    with torch.no_grad():
        z = flux.encode(astronaut_crop)
    z.requires_grad_(True)
    (flux.decode(z, LITE_SIZE, LITE_SIZE) - astronaut_crop).square().mean().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.data
def test_heldout_faces_roundtrip(flux, faces_dir):
    from fluxguard.data import list_photos, photos_in_split
    from fluxguard.faces.detect import detect_faces, primary_face
    from fluxguard.io import load_image

    photos = [p for p in photos_in_split(list_photos(faces_dir), "eval") if p.identity]
    photos = sorted(photos, key=lambda p: str(p.path))[::40][:6]
    crops = []
    for ph in photos:
        rgb = load_image(ph.path).rgb
        face = primary_face(detect_faces(rgb))
        if face is not None:
            photo = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
            crops.append(align_faces(photo, face.landmarks, LITE_SIZE)[0].crop)
    assert len(crops) >= 4
    x = torch.stack(crops)
    with torch.no_grad():
        rec = flux.decode(flux.encode(x), LITE_SIZE, LITE_SIZE)
    scores = _scores(x, rec)
    assert np.mean([p for p, _ in scores]) >= HELDOUT_PSNR_FLOOR, scores


def test_flow_sample_is_finite_and_in_range(flux):
    from fluxguard.generators.flux import flux_timesteps

    n = LITE_SIZE // (2 * flux.vae_scale_factor)
    z = torch.randn(1, n * n, flux.transformer.config.in_channels, generator=torch.Generator().manual_seed(0))
    ts = flux_timesteps(8, n * n)
    cond = flux.conditioning(None)
    with torch.no_grad():
        for t, t2 in zip(ts[:-1], ts[1:], strict=True):
            z = z + (t2 - t) * flux.velocity(z, t, cond, 1.0, LITE_SIZE, LITE_SIZE)
        img = flux.decode(z, LITE_SIZE, LITE_SIZE)
    assert torch.isfinite(z).all() and z.abs().max() < 20
    assert img.shape == (1, 3, LITE_SIZE, LITE_SIZE) and img.std() > 0.02  # not a flat image


def test_unet_ddim_sample(sd):
    h = LITE_SIZE // sd.vae_scale_factor
    x = torch.randn(1, sd.unet.config.in_channels, h, h, generator=torch.Generator().manual_seed(0))
    ts = [int(t) for t in sd.timesteps(6)]
    with torch.no_grad():
        for t, t2 in zip(ts, [*ts[1:], -1], strict=True):
            x = sd.ddim_step(x, sd.predict_noise(x, t, sd.uncond(1)), t, t2)
        img = sd.decode(x, clamp=True)
    assert torch.isfinite(x).all() and x.abs().max() < 20
    assert img.std() > 0.02


def test_fluxguard_on_lite_reconstructs_without_attack(flux, astronaut_crop):
    """Inversion + trajectory-controlled regeneration with no adversarial step gives the face back."""
    from fluxguard.methods.fluxguard import FluxGuard
    from fluxguard.recognition import load_recognizer

    method = FluxGuard([load_recognizer("mobileface")], backend=flux, adam_steps=0)
    assert method.config.num_steps == 10 and method.crop_size == LITE_SIZE
    res = method.protect_faces(astronaut_crop)
    with torch.no_grad():
        vae_rec = flux.decode(flux.encode(astronaut_crop), LITE_SIZE, LITE_SIZE)
    ((p, _),) = _scores(vae_rec, res.crops)
    assert p >= 30.0, p
    print(f"lite Flux-Guard regeneration vs VAE reconstruction: {p:.2f} dB")


def test_fluxguard_on_lite_lowers_blackbox_similarity(astronaut):
    """Flux-Guard on the lite models at the default budget, on a real face, judged by an FR model it did not
    attack."""
    from fluxguard.api import Protector

    p = Protector("fluxguard", fr_models=["mobileface", "mobilefacenet"], judges=["dlib-resnet", "mobileface"])
    assert p.method_name == "fluxguard" and p.method.config.model == "lite" and p.method.budget.name == "medium"
    res = p.protect(astronaut, seed=0)
    assert res.image.shape == astronaut.shape
    (face,) = res.faces
    judged = face.similarity["dlib-resnet"]
    assert not judged["attacked"]
    # dlib-resnet moves little (its threshold, 0.91, is close to 1 as well); the attacked model clearly
    assert judged["after"] < judged["before"] - 0.002, judged
    assert face.similarity["mobileface"]["after"] < face.similarity["mobileface"]["before"] - 0.05
    assert face.quality["changed_outside"] == 0 and face.quality["delta_e_mean"] < 2.1
