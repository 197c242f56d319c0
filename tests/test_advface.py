"""AdvFace: protected templates, their budget, determinism, and that they resist a separately trained inverter."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyRecognizer

from fluxguard.errors import ConfigError, FluxguardError
from fluxguard.features.advface import AdvFace, AdvFaceConfig, gaussian_like, project_to_cap, rotate_by
from fluxguard.features.decoders import (
    AttackerDecoder,
    ShadowDecoder,
    decoder_path,
    load_decoder,
    reconstruction_loss,
    save_decoder,
    ssim,
)
from fluxguard.features.faceset import recon_landmarks
from fluxguard.features.templates import TemplateSet


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- geometry of the budget -------------------------------------------------------------------------------------


def test_cap_projection_and_rotation() -> None:
    z, w = unit(50, 64, 0), unit(50, 64, 1)
    theta = math.acos(0.8)
    p = project_to_cap(w, z, theta)
    cos = (p * z).sum(-1)
    assert torch.allclose(p.norm(dim=-1), torch.ones(50), atol=1e-5)
    assert (cos >= 0.8 - 1e-5).all()
    assert torch.allclose(cos, torch.full((50,), 0.8), atol=1e-4)  # random w lie outside: moved onto the edge
    inside = project_to_cap(z, z, theta)
    assert torch.allclose(inside, z)
    angles = torch.linspace(0, 1.2, 50)
    r = rotate_by(z, angles, torch.Generator().manual_seed(0))  # same seed as z: the parallel draw case
    assert torch.allclose((r * z).sum(-1), torch.cos(angles), atol=1e-4)


def test_gaussian_baseline_matches_the_change() -> None:
    z = unit(20, 128, 0)
    prot = rotate_by(z, torch.linspace(0.1, 0.6, 20), torch.Generator().manual_seed(1))
    g = torch.from_numpy(gaussian_like(z.numpy(), prot.numpy(), torch.Generator().manual_seed(2)))
    assert torch.allclose((g - z).norm(dim=-1), (prot - z).norm(dim=-1), atol=1e-4)
    assert ((g * prot).sum(-1) < 0.99).all()  # another direction


def test_config_rejects_bad_budgets() -> None:
    with pytest.raises(ConfigError):
        AdvFaceConfig(variant="C")
    with pytest.raises(ConfigError):
        AdvFaceConfig(min_cosine=1.0)
    with pytest.raises(ConfigError):
        AdvFaceConfig(epsilon=2.0)
    with pytest.raises(ConfigError):
        AdvFaceConfig(steps=-1)
    with pytest.raises(ConfigError):
        AdvFaceConfig(budget=1.0)


def test_budget_is_relative_to_the_decision_angle() -> None:
    """Default budget: the same fraction of each model's decision angle, so a narrow score scale gets a small turn."""
    cfg = AdvFaceConfig(budget=0.5)
    assert cfg.min_cosine is None
    with pytest.raises(ConfigError, match="not set"):
        _ = cfg.max_angle
    assert cfg.for_threshold(0.0).min_cosine == pytest.approx(math.cos(math.pi / 4), abs=1e-4)
    assert cfg.for_threshold(0.0).max_angle == pytest.approx(0.5 * math.acos(0.0), abs=1e-3)
    # a model that accepts at 0.91 (dlib-resnet) gets a far tighter floor than one that accepts at 0.34 (mobileface)
    wide, narrow = AdvFaceConfig().for_threshold(0.34), AdvFaceConfig().for_threshold(0.91)
    assert narrow.min_cosine > 0.98 > 0.92 > wide.min_cosine > 0.9
    assert AdvFaceConfig(min_cosine=0.8).for_threshold(0.91).min_cosine == 0.8  # explicit floors win
    with pytest.raises(ConfigError, match="threshold"):
        AdvFaceConfig().for_threshold(None)


# --- decoders ---------------------------------------------------------------------------------------------------


def test_decoders_shapes_and_file_round_trip(tmp_path: Path) -> None:
    z = unit(3, 32)
    for net in (ShadowDecoder(32, widths=(16, 8, 8, 8), bottleneck=16), AttackerDecoder(32, widths=(8, 8, 8),
                                                                                        hidden=16)):
        net.eval()
        with torch.no_grad():
            y = net(z)
        assert y.shape == (3, 3, 64, 64) and 0 <= float(y.min()) and float(y.max()) <= 1
        path = save_decoder(net, TinyRecognizer, role="shadow", path=tmp_path / "d.safetensors")
        back, meta = load_decoder(path)
        assert meta["fr_model"] == "tiny" and meta["role"] == "shadow"
        with torch.no_grad():
            assert torch.allclose(back(z), y, atol=5e-3)  # fp16 file


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    b = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ref = structural_similarity(a[0].permute(1, 2, 0).double().numpy(), b[0].permute(1, 2, 0).double().numpy(),
                                channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, win_size=7)
    assert float(ssim(a, b)[0]) == pytest.approx(ref, abs=2e-3)


# --- a small trained pair on synthetic faces --------------------------------------------------------------------


def _synthetic(n: int, seed: int) -> torch.Tensor:
    """Smooth random colour images (64 px): coarse 4x4 fields upsampled."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, 3, 4, 4, generator=g) * 1.5
    return torch.sigmoid(F.interpolate(c, size=(64, 64), mode="bicubic", align_corners=False))


def _train(net: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(z), (32,), generator=g)
        loss, _ = reconstruction_loss(net(z[idx]), y[idx], w_ssim=0.0)  # L1 only: seconds, not minutes
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny FR model, a shadow decoder and an attacker (other architecture, disjoint data) trained in seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster, and much faster on a busy machine
    try:
        fr = TinyRecognizer(0)
        images = _synthetic(640, 0)
        with torch.no_grad():
            z = fr(images, torch.as_tensor(recon_landmarks()).expand(len(images), 5, 2))
        shadow = _train(ShadowDecoder(32, widths=(32, 16, 16, 8), bottleneck=32), z[:256], images[:256], 150, 0)
        attacker = _train(AttackerDecoder(32, widths=(16, 16, 8), hidden=64), z[256:512], images[256:512], 150, 1)
    finally:
        torch.set_num_threads(threads)
    d = tmp_path_factory.mktemp("advface")
    return {"fr": fr, "shadow": save_decoder(shadow, TinyRecognizer, "shadow", d / "shadow-tiny.safetensors"),
            "attacker": attacker, "z": z[512:], "images": images[512:], "dir": d}


def test_protect_shapes_budget_and_determinism(trained_pair: dict) -> None:
    z = trained_pair["z"][:24]
    for variant in ("A", "B"):
        cfg = AdvFaceConfig(variant=variant, min_cosine=0.85, steps=5, epsilon=6 / 255, batch=16, seed=3)
        adv = AdvFace(trained_pair["fr"], cfg, shadow=trained_pair["shadow"])
        res = adv.run(z)
        out = torch.from_numpy(res.templates)
        assert out.shape == z.shape and out.dtype == torch.float32
        assert torch.allclose(out.norm(dim=-1), torch.ones(len(z)), atol=1e-5)
        assert ((out * z).sum(-1) >= 0.85 - 1e-5).all()  # the cosine floor holds
        assert np.allclose(res.cosine, (out * z).sum(-1).numpy(), atol=1e-5)
        assert not torch.allclose(out, z, atol=1e-3)  # it did change them
        if variant == "A":
            assert 0 < res.info["max_abs_image_delta"] <= 6 / 255 + 1e-6  # the image budget holds
        again = adv.protect(z.numpy())
        assert np.array_equal(again, res.templates)  # deterministic for a seed
        other = AdvFace(trained_pair["fr"], AdvFaceConfig(variant=variant, min_cosine=0.85, steps=5, batch=16, seed=4),
                        shadow=trained_pair["shadow"]).protect(z.numpy())
        assert not np.allclose(other, res.templates)
        assert np.array_equal(adv.protect(z[:0].numpy()), np.zeros((0, 32), np.float32))


def test_attacker_error_rises_under_protection(trained_pair: dict) -> None:
    z, images, attacker = trained_pair["z"], trained_pair["images"], trained_pair["attacker"]

    def attack_error(t: np.ndarray | torch.Tensor) -> float:
        with torch.no_grad():
            return float((attacker(torch.as_tensor(t)) - images).abs().mean())

    clean = attack_error(z)
    for variant in ("A", "B"):
        cfg = AdvFaceConfig(variant=variant, min_cosine=0.8, steps=10, batch=64)
        with torch.no_grad():  # protect() must work under a caller's no_grad
            res = AdvFace(trained_pair["fr"], cfg, shadow=trained_pair["shadow"]).run(z)
        assert res.shadow_ssim.mean() < 0.9  # the shadow's own view changed
        protected = attack_error(res.templates)
        assert protected > clean * 1.03, variant
        # and more than isotropic noise of the same size does
        noise = attack_error(gaussian_like(z.numpy(), res.templates, torch.Generator().manual_seed(0)))
        assert protected > noise, variant


def test_wrong_model_or_weights_is_an_error(trained_pair: dict, tmp_path: Path) -> None:
    class OtherTiny(TinyRecognizer):
        spec = TinyRecognizer.spec.__class__(**{**TinyRecognizer.spec.__dict__, "name": "other-tiny"})

    with pytest.raises(FluxguardError, match="inverts 'tiny' templates"):
        AdvFace(OtherTiny(0), shadow=trained_pair["shadow"])
    net, _ = load_decoder(trained_pair["shadow"])
    attacker_file = save_decoder(net, TinyRecognizer, "attacker", tmp_path / "a.safetensors")
    with pytest.raises(FluxguardError, match="shadow decoder is needed"):
        AdvFace(trained_pair["fr"], shadow=attacker_file)
    adv = AdvFace(trained_pair["fr"], AdvFaceConfig(steps=1), shadow=trained_pair["shadow"])
    # the tiny model's FAR 1e-2 threshold (0.6) scales the default budget
    assert adv.config.min_cosine == pytest.approx(math.cos(0.35 * math.acos(0.6)), abs=1e-4)
    with pytest.raises(FluxguardError, match="templates are"):
        adv.protect(np.ones((2, 31), np.float32))
    ts = TemplateSet(embeddings=trained_pair["z"][:2].numpy(), model="mobileface", model_sha256="x",
                     sources=np.array(["a.jpg", "b.jpg"]), face_index=np.zeros(2, int), boxes=np.zeros((2, 4)),
                     landmarks=np.zeros((2, 5, 2)))
    with pytest.raises(FluxguardError, match="cannot be mixed"):
        adv.protect(ts)


def test_template_file_round_trip(tmp_path: Path) -> None:
    ts = TemplateSet(embeddings=unit(3, 8).numpy(), model="mobileface", model_sha256="ab" * 32,
                     sources=np.array(["x.jpg", "x.jpg", "y.png"]), face_index=np.array([0, 1, 0]),
                     boxes=np.zeros((3, 4)), landmarks=np.ones((3, 5, 2)), fluxguard_version="0")
    p = ts.save(tmp_path / "t.npz")
    back = TemplateSet.load(p)
    assert np.array_equal(back.embeddings, ts.embeddings) and list(back.sources) == ["x.jpg", "x.jpg", "y.png"]
    assert back.model == "mobileface" and back.protection is None
    prot = back.with_protection(back.embeddings[::-1].copy(), {"variant": "B"})
    prot.save(tmp_path / "p.npz")
    assert TemplateSet.load(tmp_path / "p.npz").protection == {"variant": "B"}
    with pytest.raises(FluxguardError, match="exists"):
        ts.save(p)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FluxguardError, match="cannot read"):
        TemplateSet.load(tmp_path / "bad.npz")
    with pytest.raises(FluxguardError, match="cannot be mixed"):
        ts.check_same_model(TemplateSet(**{**ts.__dict__, "model": "faceres"}))


# --- shipped shadow decoders and the CLI ------------------------------------------------------------------------


def shipped() -> list[str]:
    from fluxguard.features import shadow_models

    return shadow_models()


def test_shipped_shadows_match_the_zoo() -> None:
    from fluxguard.features.decoders import fr_weights_sha256
    from fluxguard.recognition import FR_MODELS

    names = shipped()
    assert names  # mobileface at least (one CPU-sized decoder per trained model)
    total = 0
    for name in names:
        net, meta = load_decoder(decoder_path("shadow", name))
        assert meta["fr_model"] == name and meta["fr_weights_sha256"] == fr_weights_sha256(FR_MODELS[name])
        dim = FR_MODELS[name].spec.embedding_size
        assert net(unit(2, dim)).shape == (2, 3, 64, 64)
        total += decoder_path("shadow", name).stat().st_size
    assert total < 2.5e6 * len(names)  # small: about 1 MB each


@pytest.fixture(scope="module")
def small_faces(faces_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small folder laid out like ../shared/faces (MANIFEST.tsv + links to the photos): a few identities of the
    attacker half of the training split and of the eval split."""
    from fluxguard.data import list_photos, split_of
    from fluxguard.features.faceset import half_of

    groups: dict[str, list] = {}
    for ph in list_photos(faces_dir):
        if ph.identity is not None:
            groups.setdefault(ph.identity, []).append(ph)
    want = {"train": 24, "eval": 16}
    chosen: list = []
    for ident in sorted(groups):
        split = split_of(ident)
        if len(groups[ident]) < 2 or want.get(split, 0) <= 0 or (split == "train" and half_of(ident) != "attacker"):
            continue
        chosen += groups[ident]
        want[split] -= len(groups[ident])
    root = tmp_path_factory.mktemp("small_faces")
    rows = ["path\tidentity\tsource_repo"]
    for ph in chosen:
        rel = ph.path.relative_to(faces_dir)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(ph.path)
        rows.append(f"{rel.as_posix()}\t{ph.identity}\t{ph.source}")
    (root / "MANIFEST.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.data
@pytest.mark.slow
def test_cli_evaluate_trains_its_attacker_then_reports(small_faces: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """From a clean cache: `fluxguard features evaluate` trains the missing attacker (other architecture, attacker
    half of the training split), then measures utility and privacy and writes the report."""
    import json

    from typer.testing import CliRunner

    from fluxguard.cli import app
    from fluxguard.features.decoders import attackers_dir

    monkeypatch.setenv("FLUXGUARD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    args = ["features", "evaluate", "--data", str(small_faces), "--models", "mobileface", "--steps", "3",
            "--out", str(out), "--json"]
    r = CliRunner().invoke(app, [*args, "--no-train-attackers"])
    assert r.exit_code != 0 and "no evaluation attacker" in r.output  # no attacker yet: says how to get one
    r = CliRunner().invoke(app, [*args, "--attacker-steps", "20"])  # trains the missing attacker by default
    assert r.exit_code == 0, r.output
    attacker, meta = load_decoder(attackers_dir() / "attacker-mobileface.safetensors")
    assert str(tmp_path) in str(attackers_dir())
    assert isinstance(attacker, AttackerDecoder) and meta["role"] == "attacker" and "attacker half" in meta["data"]
    _, shadow_meta = load_decoder(decoder_path("shadow", "mobileface"))
    assert "shadow half" in shadow_meta["data"]
    res = json.loads((out / "advface_eval.json").read_text())
    (m,) = res["models"]
    rows = m["settings"]
    assert set(rows) == {"clean", "gauss_A", "A", "gauss_B", "B"}
    for name, row in rows.items():
        assert 0.0 <= row["privacy"]["ssim"] <= 1.0, name
        assert row["utility"]["genuine_pairs"] > 0
    assert rows["clean"]["template_change"]["cosine_min"] == pytest.approx(1.0, abs=1e-4)
    floor = AdvFace("mobileface").config.min_cosine
    assert rows["B"]["template_change"]["cosine_min"] >= floor - 1e-3
    page = (out / "advface_eval.html").read_text()
    assert "attacker reconstructions" in page and page.count("data:image/png;base64,") >= 2


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    from fluxguard.data import package_faces

    d = tmp_path_factory.mktemp("photos")
    for f in package_faces():
        Image.fromarray(f.rgb).save(d / f"{f.name}.png")
    return d


def test_cli_extract_then_protect(photo_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fluxguard.cli import app

    model = "mobileface" if "mobileface" in shipped() else shipped()[0]
    runner = CliRunner()
    out = tmp_path / "t.npz"
    r = runner.invoke(app, ["features", "extract", str(photo_dir), "--model", model, "--out", str(out)])
    assert r.exit_code == 0, r.output
    ts = TemplateSet.load(out)
    assert ts.model == model and len(ts) == 2 and len(ts.model_sha256) == 64
    assert sorted(ts.sources) == ["astronaut.png", "grace_hopper.png"]
    prot = tmp_path / "p.npz"
    r = runner.invoke(app, ["features", "protect", str(out), str(prot), "--variant", "B", "--min-cosine", "0.9",
                            "--steps", "5"])
    assert r.exit_code == 0, r.output
    p = TemplateSet.load(prot)
    assert p.protection["variant"] == "B" and p.model == model
    assert (np.einsum("nd,nd->n", p.embeddings, ts.embeddings) >= 0.9 - 1e-5).all()
    # the output exists: refused without --overwrite
    r = runner.invoke(app, ["features", "protect", str(out), str(prot)])
    assert r.exit_code != 0 and "exists" in r.output
    # protecting already protected templates, another model's shadow, or a mismatching --model: clear errors
    r = runner.invoke(app, ["features", "protect", str(prot), str(tmp_path / "q.npz")])
    assert r.exit_code != 0 and "already protected" in r.output
    from fluxguard.recognition import FR_MODELS

    other = next(m for m in ("dlib-resnet", "mobilefacenet") if m != model)
    net, _ = load_decoder(decoder_path("shadow", model))
    foreign = save_decoder(net, FR_MODELS[other], "shadow", tmp_path / f"shadow-{other}.safetensors")
    r = runner.invoke(app, ["features", "protect", str(out), str(tmp_path / "q.npz"), "--shadow", str(foreign)])
    assert r.exit_code != 0 and f"inverts '{other}' templates" in r.output
    r = runner.invoke(app, ["features", "protect", str(out), str(tmp_path / "q.npz"), "--model", other])
    assert r.exit_code != 0 and "cannot be mixed" in r.output
    assert not (tmp_path / "q.npz").exists()


def test_verification_metrics_on_known_scores() -> None:
    from fluxguard.features.evaluate import match_rates, verification_metrics

    # 4 people x 2 photos on orthogonal axes; the second photo of each person is a bit off-axis
    base = np.eye(8, dtype=np.float32)[:4]
    other = base + 0.3 * np.roll(base, 1, axis=0)
    emb = np.concatenate([base, other / np.linalg.norm(other, axis=1, keepdims=True)])
    ids = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    genuine = np.array([[i, i + 4] for i in range(4)] + [[i + 4, i] for i in range(4)])
    impostor = np.array([[i, j] for i in range(8) for j in range(8) if ids[i] != ids[j]])
    m = verification_metrics(emb, emb, genuine, impostor, calibrated=0.5)
    assert m["tar"]["1e-2"] is None  # 48 impostor pairs cannot resolve FAR 1e-2
    assert m["accuracy"] == 1.0
    assert m["calibrated"]["tar"] == 1.0 and m["calibrated"]["far"] < 0.2
    shuffled = verification_metrics(emb[::-1].copy(), emb, genuine, impostor, calibrated=0.5)  # wrong gallery
    assert shuffled["calibrated"]["tar"] < 0.5
    r = match_rates(emb, emb, ids, threshold=0.5)
    assert r["match_same"] == 1.0 and r["match_other"] == 1.0 and r["other_pairs"] == 8


def test_missing_attacker_says_how_to_train_one(tmp_path: Path) -> None:
    from fluxguard.features.evaluate import evaluate_model

    with pytest.raises(FluxguardError, match="--no-train-attackers"):
        evaluate_model("mobileface", None, {}, attacker=tmp_path / "attacker-mobileface.safetensors")  # type: ignore[arg-type]
