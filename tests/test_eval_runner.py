"""The evaluation runner and its reports, on a small fake face folder with tiny stand-in FR models (offline, fast),
plus one end-to-end CLI run on the real photos (``data``, ``slow``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fluxguard.data import package_faces, split_of
from fluxguard.errors import ConfigError
from fluxguard.eval.purification import Purifier, make_purifier
from fluxguard.eval.robustness import TRANSFORMS
from fluxguard.eval.runner import evaluate
from fluxguard.eval.scoring import match_face
from fluxguard.faces.align import ARCFACE_112
from fluxguard.faces.types import Face
from fluxguard.recognition.base import CropSpec, FaceRecognizer, RecognizerSpec

PGD_FAST = {"steps": 2, "crop_size": 64}
SCALE = 0.4  # fake photos are ~200 px


class SmallFR(FaceRecognizer):
    """A very small frozen random conv net on a 48 px ArcFace crop (centred, so cosines spread like a real
    model's); a stand-in where only the protocol is under test."""

    spec = RecognizerSpec(name="small", family="test", embedding_size=32, input="48x48 RGB",
                          crop=CropSpec(48, tuple(map(tuple, (ARCFACE_112 * 48 / 112).tolist()))), source="random",
                          source_sha256="-", license="-", weights_file=None)

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(256, 32))
        for prm in self.net.parameters():
            prm.data = torch.randn(prm.shape, generator=g) / np.sqrt(max(1, prm[0].numel()))
        with torch.no_grad():
            self.register_buffer("center", self.net(torch.zeros(1, 3, 48, 48)))
        self.freeze()

    def embed_crop(self, crop: torch.Tensor) -> torch.Tensor:
        return self.net(crop * 2 - 1) - self.center


def _fr(name: str, seed: int, family: str | None = None, thresholds: dict | None = None) -> SmallFR:
    """A tiny random FR model with its own name, family and thresholds."""
    spec = replace(SmallFR.spec, name=name, family=family or f"family-{name}",
                   thresholds=thresholds or {"1e-1": 0.2, "1e-2": 0.4, "1e-3": 0.6})
    cls = type(f"FR_{name.replace('-', '_')}", (SmallFR,), {"spec": spec})
    return cls(seed)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine run ~10x faster single-threaded (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _eval_names(n: int) -> list[str]:
    names, i = [], 0
    while len(names) < n:
        if split_of(f"person_{i}") == "eval":
            names.append(f"person_{i}")
        i += 1
    return names


class ShapeDetector:
    """A stand-in detector that knows the landmarks of each fake photo by its (unique) size, and of the centre
    crop ``crop0.9`` makes of it; every other image has no face."""

    def __init__(self) -> None:
        self.known: dict[tuple[int, int], np.ndarray] = {}
        self.calls = 0

    def add(self, rgb: np.ndarray, landmarks: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        self.known[(h, w)] = landmarks
        ch, cw = max(1, round(h * 0.9)), max(1, round(w * 0.9))
        self.known[(ch, cw)] = landmarks - np.array([(w - cw) // 2, (h - ch) // 2])

    def __call__(self, rgb: np.ndarray) -> list[Face]:
        self.calls += 1
        lm = self.known.get(rgb.shape[:2])
        if lm is None:
            return []
        lo, hi = lm.min(0), lm.max(0)
        pad = 0.6 * (hi - lo).max()
        return [Face(box=np.array([lo[0] - pad, lo[1] - pad, hi[0] + pad, hi[1] + pad]), landmarks=lm, score=0.99)]


def _pad(rgb: np.ndarray, extra: int) -> np.ndarray:
    return np.pad(rgb, ((0, extra), (0, 0), (0, 0)), mode="edge")


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> tuple[Path, ShapeDetector, list]:
    """Two eval identities with two photos each, one impersonation target pair; all from package images."""
    root = tmp_path_factory.mktemp("faces")
    det = ShapeDetector()
    faces = package_faces(mirrored=True)  # astronaut, grace_hopper, astronaut_mirrored, grace_hopper_mirrored
    a, b = _eval_names(2)
    layout = [(f"identities/{a}/1.png", faces[0], 0), (f"identities/{a}/2.png", faces[2], 2),
              (f"identities/{b}/1.png", faces[1], 0), (f"identities/{b}/2.png", faces[3], 2),
              ("portraits/t/target.png", faces[0], 4), ("portraits/t/test.png", faces[2], 6)]
    for rel, f, extra in layout:
        # small (fast quality metrics), and every photo its own size so the stand-in detector can tell them apart
        h, w = f.rgb.shape[:2]
        small = np.asarray(Image.fromarray(f.rgb).resize((round(w * SCALE), round(h * SCALE)), Image.LANCZOS))
        rgb = _pad(small, extra)
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(p)
        det.add(rgb, f.landmarks * np.array([small.shape[1] / w, small.shape[0] / h]))
    return root, det, [("portraits/t/target.png", "portraits/t/test.png")]


def _models() -> dict:
    return {"fr-a": _fr("fr-a", 0), "fr-b": _fr("fr-b", 1), "fr-c": _fr("fr-c", 2),
            # held out: outside the attack zoo, but of fr-a's family
            "fr-a2": _fr("fr-a2", 3, family="family-fr-a (second weight set)"),
            # held out, its own family
            "fr-x": _fr("fr-x", 4)}


class SpyPGD:
    """Records the FR models every PGD instance is constructed with, and counts protect_faces calls."""

    def __init__(self, monkeypatch) -> None:
        from fluxguard.methods.pgd import PGD

        self.constructed: list[tuple[str, tuple[str, ...]]] = []
        self.calls = 0
        init, protect = PGD.__init__, PGD.protect_faces
        spy = self

        def spy_init(obj, recognizers, *, mode="dodge", **kw):
            spy.constructed.append((str(getattr(mode, "value", mode)), tuple(r.name for r in recognizers)))
            init(obj, recognizers, mode=mode, **kw)

        def spy_protect(obj, crops, **kw):
            spy.calls += 1
            return protect(obj, crops, **kw)

        monkeypatch.setattr(PGD, "__init__", spy_init)
        monkeypatch.setattr(PGD, "protect_faces", spy_protect)


def _run(fake_data, out: Path, **kw):
    root, det, targets = fake_data
    args = {"mode": "both", "robustness": False, "purification": None, "models": _models(),
            "attack_models": ["fr-a", "fr-b", "fr-c"], "detector": det, "targets": targets, **PGD_FAST}
    args.update(kw)
    return evaluate("pgd", root, out, **args)


@pytest.fixture(scope="module")
def full_run(fake_data, tmp_path_factory):
    """One complete run (robustness + purification with a tiny random SD backend) shared by the report tests."""
    from fluxguard.generators.sd import random_backend

    out = tmp_path_factory.mktemp("run")
    purifier = Purifier(random_backend("tiny"), "random:tiny", size=64, strength=0.5, num_steps=4)
    res = _run(fake_data, out, robustness=True, purification=purifier, white_box=True, judges=["fr-a", "fr-b", "fr-c"])
    return out, res


def test_leave_one_out_inside_runner(fake_data, tmp_path, monkeypatch) -> None:
    spy = SpyPGD(monkeypatch)
    res = _run(fake_data, tmp_path / "run")
    zoos = {("fr-b", "fr-c"), ("fr-a", "fr-c"), ("fr-a", "fr-b")}
    # one method instance per (mode, rotation), each the zoo minus exactly one model
    assert sorted(spy.constructed) == sorted((m, z) for m in ("dodge", "impersonate") for z in zoos)
    for it in res["items"]:
        for judge, how in it["judges"].items():
            assert not how["white_box"]
            assert judge not in it["zoo_tag"].split("minus-")[1].split("+") or judge == it["zoo_tag"][6:]
            zoo_models = {m for m in ("fr-a", "fr-b", "fr-c") if m not in it["zoo_tag"][6:].split("+")}
            assert judge not in zoo_models  # the judge never attacked the photo it scores
    bb = res["psr"]["dodge"]["black_box"]
    assert {j: r["zoos"] for j, r in bb.items() if not r["extra"]} == {
        "fr-a": ["minus-fr-a"], "fr-b": ["minus-fr-b"], "fr-c": ["minus-fr-c"]}
    # a held-out judge of fr-a's family only scores the rotation without fr-a; one of its own family scores all
    assert bb["fr-a2"]["zoos"] == ["minus-fr-a"] and bb["fr-a2"]["extra"]
    assert sorted(bb["fr-x"]["zoos"]) == ["minus-fr-a", "minus-fr-b", "minus-fr-c"] and bb["fr-x"]["extra"]
    assert bb["fr-a"]["n"] == 2 and bb["fr-x"]["n"] == 6
    assert res["psr"]["dodge"]["white_box"] == {}
    assert res["protocol"]["n_identities"] == 2


def test_thresholds_decide_success(fake_data, tmp_path) -> None:
    models = _models()
    # cosines lie in [-1, 1]: 2 accepts nothing, -2 accepts everything, 0.3 splits
    models["fr-a"] = _fr("fr-a", 0, thresholds={"1e-1": 2.0, "1e-2": -2.0, "1e-3": 0.3})
    res = _run(fake_data, tmp_path / "run", models=models, judges=["fr-a", "fr-b"])
    for mode in ("dodge", "impersonate"):
        row = res["psr"][mode]["black_box"]["fr-a"]
        cos = [it["scores"]["protected"]["fr-a"] for it in res["items"]
               if it["mode"] == mode and "fr-a" in it["judges"]]
        clean = [res["clean"][s["identity"]][mode]["plain"]["fr-a"] for s in res["protocol"]["identities"]]
        assert len(cos) == 2
        if mode == "dodge":  # success = below the threshold
            assert row["psr"]["1e-1"] == 1.0 and row["psr"]["1e-2"] == 0.0
            assert row["psr"]["1e-3"] == pytest.approx(np.mean(np.array(cos) < 0.3))
            assert row["clean_psr"]["1e-3"] == pytest.approx(np.mean(np.array(clean) < 0.3))
        else:  # success = above the threshold
            assert row["psr"]["1e-1"] == 0.0 and row["psr"]["1e-2"] == 1.0
            assert row["psr"]["1e-3"] == pytest.approx(np.mean(np.array(cos) > 0.3))
            assert row["clean_psr"]["1e-3"] == pytest.approx(np.mean(np.array(clean) > 0.3))
        assert row["thresholds"] == {"1e-1": 2.0, "1e-2": -2.0, "1e-3": 0.3}


def test_reports_exist_and_parse(full_run) -> None:
    out, res = full_run
    data = json.loads((out / "results.json").read_text())
    for key in ("method", "params", "protocol", "psr", "robustness", "purification", "quality", "timing", "items",
                "clean", "notes"):
        assert key in data
    assert set(data["psr"]) == {"dodge", "impersonate"}
    assert set(data["robustness"]["dodge"]) == set(TRANSFORMS)
    assert data["purification"]["config"]["backend"] == "random:tiny"
    assert set(data["psr"]["dodge"]["white_box"]) == {"fr-a", "fr-b", "fr-c"}  # labelled extra, never mixed in
    assert 0 < data["quality"]["dodge"]["face"]["ssim"] < 1 and data["quality"]["dodge"]["photo"]["psnr"] > 20
    assert data["timing"]["n"] == 2 * 2 * 4  # 2 identities x 2 modes x (3 rotations + the full zoo)
    md = (out / "results.md").read_text()
    assert "| judge | attacked with | n | PSR@1e-1 |" in md and "|---|" in md
    page = (out / "report.html").read_text()
    assert page.count("<img") >= 3 and "data:image/jpeg;base64," in page and "data:image/png;base64," in page
    assert "<link" not in page and "<script" not in page and "http://" not in page and "https://" not in page


def test_scores_go_through_saved_8bit_photo(full_run) -> None:
    out, res = full_run
    it = next(i for i in res["items"] if i["mode"] == "dodge" and i["zoo_tag"] == "minus-fr-a")
    png = out / "items" / "dodge" / "minus-fr-a" / f"{it['identity']}.png"
    rgb = np.asarray(Image.open(png).convert("RGB"))
    src = np.asarray(Image.open(Path(res["data_dir"]) / it["source"]).convert("RGB"))
    assert rgb.shape == src.shape and not np.array_equal(rgb, src)
    assert it["scores"]["protected"]["redetected"]
    for name in TRANSFORMS:
        assert set(it["scores"]["transforms"][name]) >= {"fr-a", "redetected"}


def test_resume_skips_finished_work(fake_data, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    first = _run(fake_data, out, mode="dodge")
    spy = SpyPGD(monkeypatch)
    again = _run(fake_data, out, mode="dodge")
    assert spy.calls == 0 and spy.constructed == []  # nothing protected twice, no method even built
    assert again["psr"] == first["psr"]
    victim = out / "items" / "dodge" / "minus-fr-b" / f"{first['items'][0]['identity']}.json"
    victim.unlink()
    _run(fake_data, out, mode="dodge")
    assert spy.calls == 1 and spy.constructed == [("dodge", ("fr-a", "fr-c"))]
    with pytest.raises(ConfigError, match="other settings"):
        _run(fake_data, out, mode="dodge", steps=3)
    # a re-fitted crop template of an attacked model makes other photos: never resumed into the same folder
    models = _models()
    spec = models["fr-b"].spec
    moved = replace(spec, crop=CropSpec(48, tuple((x + 1.0, y) for x, y in spec.crop.template)))
    models["fr-b"] = type(type(models["fr-b"]).__name__, (SmallFR,), {"spec": moved})(1)  # same class name
    with pytest.raises(ConfigError, match="attack_models"):
        _run(fake_data, out, mode="dodge", models=models)


def test_match_face_follows_resize_and_centre_crop() -> None:
    box = np.array([100.0, 120.0, 200.0, 240.0])
    near = Face(box=box / 2, landmarks=np.zeros((5, 2)), score=0.9)
    other = Face(box=np.array([0.0, 0.0, 30.0, 30.0]), landmarks=np.zeros((5, 2)), score=0.99)
    assert match_face([other, near], box, (400, 400), (200, 200)) is near
    shifted = Face(box=box - 20, landmarks=np.zeros((5, 2)), score=0.9)
    assert match_face([other, shifted], box, (400, 400), (360, 360)) is shifted
    assert match_face([other], box, (400, 400), (400, 400)) is None


@pytest.mark.data
@pytest.mark.slow
def test_cli_evaluate_pgd_end_to_end(faces_dir, tmp_path) -> None:
    out = tmp_path / "pgd"
    cmd = [sys.executable, "-m", "fluxguard", "evaluate", "--method", "pgd", "--data", str(faces_dir), "--out",
           str(out), "--limit", "2", "--param", "steps=2", "--no-robustness", "--purification", "none"]
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500,
                          env={**__import__("os").environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["n_identities"] == 2
    for mode in ("dodge", "impersonate"):
        bb = res["psr"][mode]["black_box"]
        assert {"dlib-resnet", "mobilefacenet", "mobileface", "faceres"} <= set(bb)
        assert all(r["n"] >= 2 for r in bb.values())
    assert "<img" in (out / "report.html").read_text()
    shutil.rmtree(out / "cache", ignore_errors=True)


def test_purification_auto_without_backend_leaves_a_note(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "fluxguard.generators.lite", None)  # as in a build without the lite models
    notes: list[str] = []
    assert make_purifier("auto", 0, "cpu", notes) is None
    assert "purification check not run" in notes[0]
    assert make_purifier(None, 0, "cpu", notes) is None and "skipped" in notes[1]
