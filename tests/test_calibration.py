"""Identity splits, impostor/genuine pairing, thresholds at FAR, verification metrics, and the CLI around them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fluxguard.data import package_faces, split_of
from fluxguard.errors import FluxguardError
from fluxguard.recognition.calibration import FaceRecord, pair_indices, thresholds_at, verification


def test_split_is_deterministic_and_roughly_40_30_30() -> None:
    assert split_of("Tom_Hanks") == split_of("Tom_Hanks")
    names = [f"person_{i}" for i in range(20000)]
    shares = {s: sum(split_of(n) == s for n in names) / len(names) for s in ("calib", "eval", "train")}
    assert abs(shares["calib"] - 0.4) < 0.015 and abs(shares["eval"] - 0.3) < 0.015
    assert abs(shares["train"] - 0.3) < 0.015


def _rec(ident: str, source: str) -> FaceRecord:
    return FaceRecord(f"{ident}/x", Path("x"), ident, source, np.zeros((5, 2)))


def test_impostors_stay_within_one_source() -> None:
    recs = [_rec("a", "s1"), _rec("a", "s2"), _rec("b", "s1"), _rec("c", "s2")]
    gen, imp = pair_indices(recs)
    assert gen.tolist() == [[0, 1]]
    assert sorted(map(tuple, imp.tolist())) == [(0, 2), (1, 3)]


def test_thresholds_give_the_requested_far() -> None:
    rng = np.random.default_rng(0)
    imp = rng.normal(0, 0.1, 100_000)
    th = thresholds_at(imp)
    for far, t in th.items():
        assert (imp > t).mean() <= float(far)
        assert (imp > t).mean() > 0.9 * float(far)
    assert th["1e-1"] < th["1e-2"] < th["1e-3"]
    with pytest.raises(FluxguardError, match="too few"):
        thresholds_at(imp[:500])


def test_verification_metrics() -> None:
    rng = np.random.default_rng(1)
    gen, imp = rng.normal(2, 1, 2000), rng.normal(0, 1, 20000)
    v = verification(gen, imp, thresholds_at(imp))
    assert abs(v["dprime"] - 2) < 0.1
    assert abs(v["auc"] - 0.921) < 0.01  # Phi(2 / sqrt 2)
    assert v["tar"]["1e-1"] > v["tar"]["1e-2"] > v["tar"]["1e-3"]


@pytest.fixture
def app():
    from fluxguard.cli import app  # an import error is a failure: a broken CLI must not pass as a skip

    return app


def test_models_json_lists_real_shipped_models(app) -> None:
    res = CliRunner().invoke(app, ["models", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    shipped = [r for r in rows if r["shipped"]]
    assert len(shipped) >= 4
    for r in rows:
        assert {"name", "embedding_size", "input", "source", "licence", "shipped", "thresholds"} <= set(r)
    assert {r["name"] for r in rows if not r["shipped"]} == {"faceres-deep", "faceplugin-mfn512"}


def test_calibrate_rejects_unknown_model_and_tiny_data(app, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path), "--models", "nope"])
    assert res.exit_code == 1 and "valid names" in res.output and "mobilefacenet" in res.output
    # a tiny data folder: two calib identities, two photos each (the package faces and their mirror images)
    names = [n for n in (f"p{i}" for i in range(100)) if split_of(n) == "calib"][:2]
    lms = {}
    for ident, face in zip(names, package_faces(), strict=True):
        for k, rgb, lm in ((1, face.rgb, face.landmarks), (2, face.rgb[:, ::-1], None)):
            d = tmp_path / "identities" / ident
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(rgb)).save(d / f"{k}.png")
            if lm is None:
                lm = face.landmarks.copy()
                lm[:, 0] = rgb.shape[1] - 1 - lm[:, 0]
                lm = lm[[1, 0, 2, 4, 3]]
            lms[f"identities/{ident}/{k}.png"] = lm.tolist()
    (tmp_path / "lm.json").write_text(json.dumps(lms))
    out = tmp_path / "th.json"
    res = CliRunner().invoke(app, ["calibrate", "--data", str(tmp_path), "--landmarks", str(tmp_path / "lm.json"),
                                   "--models", "mobileface", "--out", str(out)])
    # 4 photos give 4 impostor pairs: far too few for FAR 1e-1..1e-3, which must be a clean error, not a traceback
    assert res.exit_code == 1 and "too few for FAR" in res.output, res.output
    assert not out.exists()
