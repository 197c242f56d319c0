"""WDP, the SD backend and diffusion purification on tiny random Stable Diffusion models (CPU, offline).

The tiny models are built in code, saved, and reloaded through ``SDBackend.from_pretrained`` (the path users take
with ``stabilityai/stable-diffusion-2-base``). Until the FR zoo lands, a small frozen random conv net stands in for
the surrogate face-recognition models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fluxguard.errors import ConfigError
from fluxguard.faces.align import crop_template
from fluxguard.recognition.base import CropSpec, FaceRecognizer, RecognizerSpec

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from fluxguard.eval.purification import PurificationConfig, purify  # noqa: E402
from fluxguard.generators.sd import NULL_EMBEDDING_FILE, SDBackend, random_backend  # noqa: E402
from fluxguard.methods.wdp import (  # noqa: E402
    WDP,
    SelfAttentionProbe,
    WDPConfig,
    ddim_inversion,
    learn_null_embeddings,
    schedule,
    self_attention_probe,
)

SIZE = 64  # tiny VAE: 8x8 latents
FAST = {"crop_size": SIZE, "null_optimization_steps": 5, "prot_steps": 6}


@pytest.fixture(autouse=True)
def _threads():
    # Other jobs share 2 cores; one thread is both fastest and steadiest for these tiny models.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class RandomConvFR(FaceRecognizer):
    """Stand-in surrogate FR model: a frozen random conv net on a 32 px ArcFace-style crop."""

    spec = RecognizerSpec(
        name="random-conv",
        family="test",
        embedding_size=32,
        input="32x32 RGB, [-1, 1]",
        crop=CropSpec(32, tuple(map(tuple, crop_template(32)))),
        source="random weights (tests)",
        source_sha256="",
        license="n/a",
        weights_file=None,
    )

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 32),
        )
        self.freeze()

    def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
        return self.net(crop * 2 - 1)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _clip_tokenizer_dir(folder: Path) -> Path:
    """A tiny CLIP BPE vocabulary written without the hub: 2 x 256 byte symbols, two merges, then bos/eos last."""
    chars = _byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    config = {"model_max_length": 77, **special, "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD2-style pipeline (UNet, VAE, CLIP text encoder + tokenizer, scheduler) saved like the hub folder."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    tokenizer = CLIPTokenizer.from_pretrained(str(_clip_tokenizer_dir(root / "tok")))
    net = random_backend("tiny", seed=0)
    torch.manual_seed(0)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    # SD2-base ships a PNDM scheduler config; the backend must turn it into DDIM as the authors do.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
        skip_prk_steps=True,
    )
    pipe = StableDiffusionPipeline(
        vae=net.vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=net.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "sd")
    return root / "sd"


@pytest.fixture(scope="session")
def backend(sd_folder: Path) -> SDBackend:
    return SDBackend.from_pretrained(sd_folder, device="cpu")


@pytest.fixture(scope="session")
def face() -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(data.astronaut()[:256, 128:384].copy()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(img, size=SIZE, mode="area")


# ------------------------------------------------------------------------------------------------ backend


def test_backend_loads_folder_and_computes_empty_prompt_once(sd_folder: Path, backend: SDBackend) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(sd_folder), subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(str(sd_folder), subfolder="text_encoder").eval()
    ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = enc(ids)[0]
    assert backend.null_embedding.shape == (1, 77, 32)
    torch.testing.assert_close(backend.null_embedding, expected)
    assert not hasattr(backend, "text_encoder")
    assert type(backend.scheduler).__name__ == "DDIMScheduler"
    assert backend.scheduler.config.clip_sample is False  # PNDM never clipped; DDIM's default would
    assert [int(t) for t in backend.timesteps(20)][-4:] == [151, 101, 51, 1]
    assert all(not p.requires_grad for p in backend.unet.parameters())


def test_text_encoder_free_folder_round_trip(tmp_path: Path, backend: SDBackend) -> None:
    folder = backend.save_pretrained(tmp_path / "lite")
    assert (folder / NULL_EMBEDDING_FILE).is_file() and not (folder / "text_encoder").exists()
    again = SDBackend.from_pretrained(folder, device="cpu")
    torch.testing.assert_close(again.null_embedding, backend.null_embedding)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eps_again = again.predict_noise(z, 101, again.uncond(1))
        torch.testing.assert_close(eps_again, backend.predict_noise(z, 101, backend.uncond(1)))
    (folder / NULL_EMBEDDING_FILE).unlink()
    with pytest.raises(ConfigError, match="null_embedding"):
        SDBackend.from_pretrained(folder, device="cpu")


def test_ddim_step_matches_diffusers_scheduler(backend: SDBackend) -> None:
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    backend.timesteps(20)
    for t in (951, 101, 51, 1):
        ref = backend.scheduler.step(eps, t, z).prev_sample
        torch.testing.assert_close(backend.ddim_step(z, eps, t, t - 50), ref)


# ------------------------------------------------------------------------------------------------ WDP stages


@pytest.mark.parametrize("consistent", [False, True])
def test_learned_null_embeddings_reconstruct_better_than_empty_prompt(
    backend: SDBackend, face: torch.Tensor, consistent: bool
) -> None:
    cfg = WDPConfig(crop_size=SIZE, consistent_timesteps=consistent)
    inv, regen = schedule(backend, cfg)
    assert inv == [(1, 51), (51, 101), (101, 151)]
    assert regen == ([(151, 101), (101, 51), (51, 1)] if consistent else [(101, 51), (51, 1), (1, -49)])
    with torch.no_grad():
        z0 = backend.encode(face, generator=torch.Generator().manual_seed(8888))
    inverted = ddim_inversion(backend, z0, inv)
    assert len(inverted) == 4
    steps = cfg.null_optimization_steps  # the paper's 20
    embs, history = learn_null_embeddings(backend, inverted, regen, steps=steps, lr=cfg.null_lr)
    assert len(embs) == 3 and len(history) == 3 * steps
    assert not torch.equal(embs[0], embs[-1])  # one embedding carried on and snapshotted per timestep

    def errors(embeddings: list[torch.Tensor]) -> list[float]:
        """MSE of each regenerated latent to the inversion latent it should land on (z2, z1, z0)."""
        z, out = inverted[-1], []
        with torch.no_grad():
            for (t, t_to), emb, target in zip(regen, embeddings, inverted[-2::-1], strict=True):
                z = backend.ddim_step(z, backend.predict_noise(z, t, emb), t, t_to)
                out.append((z - target).pow(2).mean().item())
        return out

    plain, learned = errors([backend.uncond(1)] * 3), errors(embs)
    assert all(lo < hi for lo, hi in zip(learned, plain, strict=True)), (learned, plain)
    assert learned[0] < 0.7 * plain[0] and learned[1] < 0.7 * plain[1], (learned, plain)
    if consistent:
        assert learned[2] < 0.5 * plain[2], (learned, plain)  # the face latent itself comes back
    # The authors' schedule ends with a move from t=1 to alpha_0 that barely changes the latent, so its output stays
    # near the t=51 inversion latent; it still beats the empty prompt, only by less.


def test_self_attention_loss_zero_for_identical_branches(backend: SDBackend) -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)  # two faces
    emb = backend.uncond(4)
    n_self = sum(k.endswith("attn1.processor") for k in backend.unet.attn_processors)
    assert n_self == 4
    with torch.no_grad():
        default_out = backend.predict_noise(torch.cat([z, z]), 101, emb)
        probe = SelfAttentionProbe(batch=2)
        with self_attention_probe(backend.unet, probe):
            same = backend.predict_noise(torch.cat([z, z]), 101, emb)
            assert torch.equal(probe.value(z.device), torch.zeros(2))
            probe.reset()
            z_other = z.clone()
            z_other[1] += 0.5 * torch.randn(4, 8, 8, generator=g)
            backend.predict_noise(torch.cat([z, z_other]), 101, emb)
            loss = probe.value(z.device)
    assert loss[0] == 0 and loss[1] > 0  # per face: only the perturbed face has a structure loss
    # the recording processor is plain attention maths: same output as the default SDPA processor
    torch.testing.assert_close(same, default_out, atol=1e-5, rtol=1e-5)
    assert all(type(p).__name__ != "RecordingAttnProcessor" for p in backend.unet.attn_processors.values())


def test_adversarial_stage_lowers_identity_similarity(backend: SDBackend, face: torch.Tensor) -> None:
    fr = RandomConvFR()
    # lambda_adv raised from 0.003 and the "high" budget: random stand-in FR nets give tiny gradients, and this checks
    # the mechanism.
    kw = {**FAST, "lambda_adv": 1.0, "adv_lr": 0.05, "budget": "high"}
    stages: list[tuple[str, int, int]] = []
    clean = WDP([fr], backend=backend, **{**kw, "prot_steps": 0}).protect_faces(face)
    res = WDP([fr], backend=backend, **kw).protect_faces(face, progress=lambda s, i, n: stages.append((s, i, n)))
    assert res.crops.shape == face.shape and 0 <= res.crops.min() and res.crops.max() <= 1
    assert len(res.history) == kw["prot_steps"]
    h0, h1 = res.history[0], res.history[-1]
    assert h0["self_attn_loss"] == 0.0 and h1["self_attn_loss"] > 0  # both branches start identical
    assert h1["cos/random-conv"] < h0["cos/random-conv"]
    assert res.info["final_similarity"]["random-conv"][0] < clean.info["final_similarity"]["random-conv"][0] - 0.0005
    # without adversarial iterations the output is the input (residual composition)
    assert torch.equal(clean.crops, face)
    assert stages[-1] == ("adversarial", kw["prot_steps"], kw["prot_steps"])
    assert ("null-text", 15, 15) in stages and stages[0][0] == "inversion"


def test_impersonation_moves_towards_target_and_batches_independently(backend: SDBackend, face: torch.Tensor) -> None:
    fr = RandomConvFR()
    target = torch.flip(face, dims=[1])  # a different "identity": colour channels reversed
    kw = {**FAST, "lambda_adv": 1.0, "adv_lr": 0.05, "prot_steps": 4}
    m = WDP([fr], mode="impersonate", backend=backend, **kw)
    with pytest.raises(ConfigError, match="target"):
        m.protect_faces(face)
    single = m.protect_faces(face, target=target)
    assert single.history[-1]["cos/random-conv"] > single.history[0]["cos/random-conv"]
    pair = m.protect_faces(torch.cat([face, face.flip(-1)]), target=target)
    torch.testing.assert_close(pair.crops[:1], single.crops, atol=2e-4, rtol=0)


def test_determinism_and_reference_cache(backend: SDBackend, face: torch.Tensor) -> None:
    fr = RandomConvFR()
    kw = {**FAST, "prot_steps": 3, "null_optimization_steps": 2, "lambda_adv": 1.0}
    a = WDP([fr], backend=backend, **kw).protect_faces(face, generator=torch.Generator().manual_seed(5))
    b = WDP([fr], backend=backend, **kw).protect_faces(face, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.crops, b.crops) and a.history == b.history
    c = WDP([fr], backend=backend, cache_reference_branch=True, **kw).protect_faces(
        face, generator=torch.Generator().manual_seed(5)
    )
    # the same losses at the same latent (later iterations drift apart: AdamW turns the batch-size rounding
    # differences of near-zero gradients into full steps)
    for key in ("loss", "identity_loss", "self_attn_loss"):
        assert c.history[0][key] == pytest.approx(a.history[0][key], rel=1e-5, abs=1e-7)
    assert c.history[-1]["self_attn_loss"] > 0


def test_config_and_registry() -> None:
    from fluxguard.generators import GENERATORS
    from fluxguard.methods import METHODS

    assert METHODS["wdp"] is WDP and GENERATORS["sd"] is SDBackend
    cfg = WDPConfig()
    assert (cfg.diffusion_steps, cfg.start_step, cfg.prot_steps, cfg.lambda_adv) == (20, 17, 30, 0.003)
    with pytest.raises(ConfigError):
        WDP([RandomConvFR()], start_step=20)
    with pytest.raises(ConfigError, match="wdp has no parameter 'no_such_knob'"):
        WDP([RandomConvFR()], no_such_knob=1)
    assert WDP([RandomConvFR()], prot_steps=7).params()["prot_steps"] == 7
    with pytest.raises(ConfigError, match="aligned portrait crops"):  # windows of a photo are for pgd
        WDP([RandomConvFR()]).protect_faces(torch.rand(1, 3, 64, 64), landmarks=torch.zeros(1, 5, 2))


# ------------------------------------------------------------------------------------------------ purification


def test_purification_changes_image_and_is_deterministic(backend: SDBackend, face: torch.Tensor) -> None:
    batch = torch.cat([face, face.flip(-1)])
    cfg = PurificationConfig(strength=0.3, num_steps=10)
    a = purify(batch, backend, config=cfg, generator=torch.Generator().manual_seed(0))
    b = purify(batch, backend, config=cfg, generator=torch.Generator().manual_seed(0))
    c = purify(batch, backend, config=cfg, generator=torch.Generator().manual_seed(1))
    assert a.shape == batch.shape and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - batch).abs().mean() > 0.01
    assert not torch.allclose(a, c)
    per_face = purify(batch[1:], backend, config=cfg, generator=torch.Generator().manual_seed(0))
    assert per_face.shape == (1, 3, SIZE, SIZE)
    assert np.isfinite(a.numpy()).all()

