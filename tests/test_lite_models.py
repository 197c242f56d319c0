"""The shipped lite generators: they load, reconstruct real faces, and their transformer / UNet run and sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxguard.eval.quality import psnr, ssim
from fluxguard.faces.align import align_faces
from fluxguard.generators.lite import (
    LITE_SIZE,
    decode_latents,
    encode_latents,
    lite_dir,
    load_lite_flux,
    load_lite_sd,
    load_lite_vae,
)

# MTCNN (fluxguard.faces.detect.detect_faces) landmarks of skimage.data.astronaut(), fixed here so the test needs
# no detector.
ASTRONAUT_LANDMARKS = np.array(
    [[205.01, 101.73], [246.76, 103.71], [224.67, 128.96], [201.72, 139.25], [245.27, 141.86]]
)
# Measured by benchmarks/lite.py / this file's tests on the shipped weights (README), minus a margin of ~1.5 dB.
ASTRONAUT_PSNR_FLOOR = 28.0
HELDOUT_PSNR_FLOOR = 27.0


@pytest.fixture(scope="module")
def flux():
    return load_lite_flux()


@pytest.fixture(scope="module")
def sd():
    return load_lite_sd()


def _roundtrip(vae, crops: torch.Tensor) -> list[tuple[float, float]]:
    with torch.no_grad():
        rec = decode_latents(vae, encode_latents(vae, crops))
    to8 = lambda t: (t.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)  # noqa: E731
    return [(psnr(to8(a), to8(b)), ssim(to8(a), to8(b))) for a, b in zip(crops, rec, strict=True)]


def test_weights_are_small_fp16_and_load_frozen(flux, sd):
    files = [p for p in lite_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    from safetensors import safe_open

    for p in lite_dir().rglob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, p
    for module in (flux.vae, flux.transformer, sd.unet, load_lite_vae()):
        assert not module.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters())
    cfg = flux.vae.config
    assert cfg.scaling_factor != 1.0 and cfg.shift_factor is not None  # set from the training latents
    assert flux.transformer.config.in_channels == 4 * cfg.latent_channels
    assert sd.unet.config.in_channels == cfg.latent_channels
    assert flux.scheduler.config.use_dynamic_shifting
    assert sd.scheduler.config.beta_schedule == "scaled_linear" and sd.scheduler.config.prediction_type == "epsilon"


def test_astronaut_face_roundtrip(flux, astronaut):
    photo = torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255
    crop = align_faces(photo, ASTRONAUT_LANDMARKS, LITE_SIZE)[0].crop
    ((p, s),) = _roundtrip(flux.vae, crop[None])
    assert p >= ASTRONAUT_PSNR_FLOOR, (p, s)
    assert s >= 0.85, (p, s)


def test_decoder_gradient_reaches_latent(flux, astronaut):
    photo = torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255
    crop = align_faces(photo, ASTRONAUT_LANDMARKS, LITE_SIZE)[0].crop[None]
    with torch.no_grad():
        z = encode_latents(flux.vae, crop)
    z.requires_grad_(True)
    (decode_latents(flux.vae, z) - crop).square().mean().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.data
def test_heldout_faces_roundtrip(flux, faces_dir):
    detect = pytest.importorskip("fluxguard.faces.detect", reason="needs the MTCNN detector (branch detector)")
    from fluxguard.data import list_photos, photos_in_split
    from fluxguard.faces.detect import load_rgb

    photos = [p for p in photos_in_split(list_photos(faces_dir), "eval") if p.identity]
    photos = sorted(photos, key=lambda p: str(p.path))[::40][:6]
    crops = []
    for ph in photos:
        rgb = load_rgb(ph.path)
        faces = detect.detect_faces(rgb)
        if faces:
            photo = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
            crops.append(align_faces(photo, faces[0].landmarks, LITE_SIZE)[0].crop)
    assert len(crops) >= 4
    scores = _roundtrip(flux.vae, torch.stack(crops))
    assert np.mean([p for p, _ in scores]) >= HELDOUT_PSNR_FLOOR, scores


def _tokens(flux, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    from diffusers import FluxPipeline

    c = flux.vae.config.latent_channels
    h = w = LITE_SIZE // 2 ** (len(flux.vae.config.block_out_channels) - 1)
    noise = torch.randn(batch, c, h, w, generator=gen)
    tok = FluxPipeline._pack_latents(noise, batch, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, "cpu", torch.float32)
    return tok, ids, (c, h, w)


def _velocity(flux, tok, ids, t):
    b = tok.shape[0]
    return flux.transformer(
        hidden_states=tok,
        encoder_hidden_states=flux.prompt_embeds.expand(b, -1, -1),
        pooled_projections=flux.pooled_prompt_embeds.expand(b, -1),
        timestep=t.expand(b),
        img_ids=ids,
        txt_ids=flux.text_ids,
    ).sample


def test_transformer_forward_shape(flux):
    cfg = flux.transformer.config
    assert flux.prompt_embeds.shape[::2] == (1, cfg.joint_attention_dim)
    assert flux.pooled_prompt_embeds.shape == (1, cfg.pooled_projection_dim)
    tok, ids, _ = _tokens(flux, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = _velocity(flux, tok, ids, torch.tensor(0.7))
    assert v.shape == tok.shape and torch.isfinite(v).all()


def test_flow_sample_is_finite_and_in_range(flux):
    from diffusers import FluxPipeline

    gen = torch.Generator().manual_seed(0)
    tok, ids, (c, h, w) = _tokens(flux, 1, gen)
    sched = flux.scheduler
    steps = 6
    mu = 0.5 + (1.15 - 0.5) * (tok.shape[1] - 256) / (4096 - 256)  # FluxPipeline's calculate_shift
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    with torch.no_grad():
        for t in sched.timesteps:
            tok = sched.step(_velocity(flux, tok, ids, t / 1000), t, tok, return_dict=False)[0]
        z = FluxPipeline._unpack_latents(tok, h * 8, w * 8, 8)
        img = decode_latents(flux.vae, z)
    assert torch.isfinite(z).all() and z.abs().max() < 20
    assert img.shape == (1, 3, LITE_SIZE, LITE_SIZE) and 0 <= img.min() and img.max() <= 1
    assert img.std() > 0.02  # not a flat image


def test_unet_forward_and_ddim_sample(sd):
    cfg = sd.unet.config
    assert sd.null_embeds.shape[0] == 1 and sd.null_embeds.shape[2] == cfg.cross_attention_dim
    h = LITE_SIZE // 2 ** (len(sd.vae.config.block_out_channels) - 1)
    x = torch.randn(1, cfg.in_channels, h, h, generator=torch.Generator().manual_seed(0))
    sd.scheduler.set_timesteps(6)
    with torch.no_grad():
        eps = sd.unet(x, 500, encoder_hidden_states=sd.null_embeds).sample
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        for t in sd.scheduler.timesteps:
            x = sd.scheduler.step(sd.unet(x, t, encoder_hidden_states=sd.null_embeds).sample, t, x).prev_sample
        img = decode_latents(sd.vae, x)
    assert torch.isfinite(x).all() and x.abs().max() < 20
    assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.02
