"""fluxguard.dist: the Ray paths give the local batch's results, resume, and survive a killed worker.

One local Ray (2 CPUs) serves the whole session; the pixel work is real (MTCNN, PGD with 2 steps against
mobilefacenet) on small copies of skimage's astronaut.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_threads
from PIL import Image

from fluxguard.batch import BatchJob, expand_inputs
from fluxguard.errors import FluxguardError, MissingDependencyError

TESTS = Path(__file__).resolve().parent
FACE_PHOTOS = ("a", "b", "c")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Local runs use one torch thread, as the Ray workers do (OMP_NUM_THREADS=1 below): another thread count
    changes float rounding, and these tests compare Ray's outputs with local ones byte for byte. Session-scoped so
    it is in place before the session fixtures that compute local results."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'fluxguard[dist]')")
    pytest.importorskip("ray.data")
    if not ray.is_initialized():
        from fluxguard.dist import start_local

        # Workers import the picklable stand-ins from tests/dist_helpers.py. Niceness 0: Ray's default (15)
        # starves the workers whenever other jobs share the machine.
        start_local(2, paths=[TESTS], env={"OMP_NUM_THREADS": "1"}, system_config={"worker_niceness": 0})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def library(tmp_path_factory, astronaut) -> Path:
    """Three face photos (PNG, JPEG), one without a face and one that is not an image."""
    d = tmp_path_factory.mktemp("library")
    im = Image.fromarray(astronaut).resize((256, 256), Image.BILINEAR)
    im.save(d / "a.png")
    im.transpose(Image.FLIP_LEFT_RIGHT).save(d / "b.jpg", quality=95)
    im.rotate(5).save(d / "c.png")
    Image.new("RGB", (64, 64), (200, 100, 50)).save(d / "noface.png")
    (d / "broken.jpg").write_bytes(b"not an image")
    return d


CLI_ARGS = ["--method", "pgd", "-p", "steps=2", "--fr-models", "mobilefacenet", "--seed", "7", "--json"]


@pytest.fixture(scope="session")
def reference(library, tmp_path_factory) -> tuple[Path, dict]:
    """The local batch (``fluxguard protect`` without --ray): its output folder and summary."""
    from typer.testing import CliRunner

    from fluxguard.batch import EXIT_UNREADABLE, SUMMARY_NAME
    from fluxguard.cli import app

    out = tmp_path_factory.mktemp("local")
    res = CliRunner().invoke(app, ["protect", str(library), "--out", str(out), *CLI_ARGS])
    assert res.exit_code == EXIT_UNREADABLE, res.output  # broken.jpg cannot be read; the batch goes on
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["counts"] == {"protected": 3, "skipped": 0, "no_face": 1, "unreadable": 1, "failed": 0}
    return out, summary


def _outputs(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.name.endswith(".json")}


def _comparable(e: dict) -> dict:
    """A summary entry without what differs between two runs (timings, the run's time, the output folder)."""
    return {k: (Path(v).name if k == "output" else v) for k, v in e.items() if k not in ("timings", "run")}


@pytest.mark.ray
def test_rerun_after_a_stopped_driver_and_a_killed_worker_loses_nothing(ray_cluster, library, reference,
                                                                         tmp_path) -> None:
    from dist_helpers import make_crash_once, make_protector

    from fluxguard import dist

    out = tmp_path / "out"
    inputs = expand_inputs([str(library)])
    job = BatchJob(out=out, seed=7)
    run = dist.protect_photos(inputs, make_protector, job, workers=1, batch_size=1)
    next(run)
    run.close()  # the driver goes away after its first result
    partial = _outputs(out)
    done_before = {n.split("_protected")[0] for n in partial}
    assert 0 < len(done_before) < len(FACE_PHOTOS)
    mtimes = {n: (out / n).stat().st_mtime_ns for n in partial}

    # The re-run resumes, and one of its workers dies (as if OOM-killed) on a photo still to do.
    victim = sorted(set(FACE_PHOTOS) - done_before)[0]
    marker = tmp_path / "crashed"
    make = functools.partial(make_crash_once, str(marker), victim)
    entries = [e for e, _ in dist.protect_photos(inputs, make, job, workers=2)]
    assert marker.exists()  # a worker really died
    assert sorted(e["input"] for e in entries) == sorted(map(str, inputs))  # each photo reported exactly once
    status = {Path(e["input"]).stem: e["status"] for e in entries}
    assert all(status[s] == "skipped" for s in done_before)
    # photos the dead worker had finished come back as skipped from its retried batch
    assert all(status[s] in ("protected", "skipped") for s in set(FACE_PHOTOS) - done_before)
    assert _outputs(out) == _outputs(reference[0])  # nothing lost, nothing different
    assert {n: (out / n).stat().st_mtime_ns for n in mtimes} == mtimes  # finished outputs untouched
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


@pytest.mark.ray
def test_cli_protect_with_ray_matches_the_local_batch(ray_cluster, library, reference, tmp_path) -> None:
    from typer.testing import CliRunner

    from fluxguard.batch import SUMMARY_NAME
    from fluxguard.cli import app

    ref_out, ref = reference
    args = ["protect", str(library), "--out", str(tmp_path), *CLI_ARGS, "--ray", "local", "--ray-workers", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output  # the same exit code: broken.jpg is unreadable, the others went through
    got = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert got["counts"] == ref["counts"] and got["params"] == ref["params"]
    assert [_comparable(e) for e in got["photos"]] == [_comparable(e) for e in ref["photos"]]  # input order
    assert _outputs(tmp_path) == _outputs(ref_out)  # byte-identical protected photos


@pytest.mark.ray
def test_worker_setup_errors_reach_the_driver(ray_cluster, library, tmp_path) -> None:
    from fluxguard import dist
    from fluxguard.api import Protector

    make = functools.partial(Protector, "pgd", fr_models=["mobilefacenet"], judges=["mobilefacenet"], epsilon=3)
    with pytest.raises(FluxguardError, match="no parameter 'epsilon'"):
        list(dist.protect_photos(expand_inputs([str(library)]), make, BatchJob(out=tmp_path), workers=1))


def _template_store(d: Path) -> Path:
    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, 128)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    d.mkdir()
    for i, n in enumerate((50, 30, 1)):
        np.save(d / f"shard-{i:03d}.npy", unit(n))
    from safetensors.numpy import save_file

    save_file({"embeddings": unit(20), "ids": np.arange(20, dtype=np.int64)}, str(d / "shard-100.safetensors"),
              metadata={"model": "mobileface"})
    return d


def _read_store(d: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    out = {}
    for p in sorted(d.iterdir()):
        if p.suffix == ".npy":
            out[p.name] = {"embeddings": np.load(p)}
        elif p.suffix == ".safetensors":
            out[p.name] = load_file(str(p))
    return out


@pytest.mark.ray
def test_template_store_on_ray_matches_local_and_resumes(ray_cluster, tmp_path) -> None:
    from dist_helpers import make_gaussian
    from safetensors import safe_open

    from fluxguard import dist

    store = _template_store(tmp_path / "store")
    make = functools.partial(make_gaussian, 0.05)
    local = dist.protect_template_store(store, tmp_path / "local", make, seed=3, chunk=16)
    assert local["counts"] == {"protected": 4, "skipped": 0, "failed": 0} and local["templates"] == 101
    on_ray = dist.protect_template_store(store, tmp_path / "ray", make, ray="local", workers=2, seed=3, chunk=16,
                                         describe={"method": "gaussian", "sigma": 0.05})
    assert on_ray["counts"] == local["counts"]
    a, b, clean = _read_store(tmp_path / "local"), _read_store(tmp_path / "ray"), _read_store(store)
    assert a.keys() == b.keys() == clean.keys()
    for name in a:
        for k in a[name]:
            np.testing.assert_array_equal(a[name][k], b[name][k])
        cos = (a[name]["embeddings"] * clean[name]["embeddings"]).sum(1)
        assert 0.5 < cos.min() and cos.max() < 1 - 1e-4  # changed, but still the same identity
    np.testing.assert_array_equal(b["shard-100.safetensors"]["ids"], np.arange(20))  # other tensors kept
    with safe_open(str(tmp_path / "ray" / "shard-100.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    assert meta["model"] == "mobileface" and json.loads(meta["fluxguard_protection"])["method"] == "gaussian"
    e = {Path(x["input"]).name: x for x in on_ray["shards"]}
    assert e["shard-000.npy"]["count"] == 50 and 0.5 < e["shard-000.npy"]["cosine_min"] < 1

    (tmp_path / "ray" / "shard-001.npy").unlink()  # as if the run had stopped before this shard
    again = dist.protect_template_store(store, tmp_path / "ray", make, seed=3, chunk=16)  # here: same result
    assert again["counts"] == {"protected": 1, "skipped": 3, "failed": 0}
    np.testing.assert_array_equal(np.load(tmp_path / "ray" / "shard-001.npy"), a["shard-001.npy"]["embeddings"])
    summary = json.loads((tmp_path / "ray" / dist.TEMPLATE_SUMMARY_NAME).read_text())
    assert summary["counts"] == again["counts"] and len(summary["shards"]) == 4


def test_template_shard_errors_are_reported(tmp_path) -> None:
    from dist_helpers import make_gaussian

    from fluxguard import dist

    store = tmp_path / "store"
    store.mkdir()
    np.save(store / "bad.npy", np.zeros(5, np.float32))  # 1-D: not a template matrix
    np.save(store / "good.npy", np.eye(3, dtype=np.float32))
    rec = dist.protect_template_store(store, tmp_path / "out", make_gaussian)
    by = {Path(e["input"]).name: e for e in rec["shards"]}
    assert by["bad.npy"]["status"] == "failed" and "(N, D)" in by["bad.npy"]["message"]
    assert by["good.npy"]["status"] == "protected"


def test_missing_ray_is_a_clear_error(monkeypatch, library, tmp_path) -> None:
    from typer.testing import CliRunner

    from fluxguard import dist
    from fluxguard.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"fluxguard\[dist\]"):
        dist.connect("local")
    res = CliRunner().invoke(app, ["protect", str(library / "a.png"), "--out", str(tmp_path), "--ray", "local"])
    assert res.exit_code == 1 and "pip install 'fluxguard[dist]'" in res.output
    assert not list(tmp_path.glob("a_protected*"))


@pytest.mark.ray
def test_workers_the_cluster_cannot_hold_are_refused(ray_cluster, library, tmp_path) -> None:
    from fluxguard import dist

    inputs = expand_inputs([str(library)])
    if not ray_cluster.cluster_resources().get("GPU"):
        with pytest.raises(FluxguardError, match="no GPU"):
            next(dist.protect_photos(inputs, make_stub_never_built, BatchJob(out=tmp_path), device="cuda"))
        with pytest.raises(FluxguardError, match="asks for 1 GPU"):
            next(dist.protect_photos(inputs, make_stub_never_built, BatchJob(out=tmp_path), num_gpus=1))
    with pytest.raises(FluxguardError, match="asks for 3 CPU"):
        next(dist.protect_photos(inputs, make_stub_never_built, BatchJob(out=tmp_path), num_cpus=3))


def make_stub_never_built() -> None:
    raise AssertionError("no worker may start when the cluster cannot hold it")


@pytest.mark.ray
def test_features_protect_store_with_advface_on_ray(ray_cluster, tmp_path) -> None:
    from typer.testing import CliRunner

    from fluxguard.cli import app

    rng = np.random.default_rng(1)
    store = tmp_path / "store"
    store.mkdir()
    for i, n in enumerate((6, 4)):
        x = rng.standard_normal((n, 256)).astype(np.float32)  # mobileface templates are 256-d unit rows
        np.save(store / f"part-{i}.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
    args = ["features", "protect", str(store), "--model", "mobileface", "--steps", "2", "--seed", "5"]
    local = CliRunner().invoke(app, [*args[:3], str(tmp_path / "local"), *args[3:]])
    assert local.exit_code == 0, local.output
    on_ray = CliRunner().invoke(app, [*args[:3], str(tmp_path / "ray"), *args[3:], "--ray", "local",
                                      "--ray-workers", "2"])
    assert on_ray.exit_code == 0, on_ray.output
    for name in ("part-0.npy", "part-1.npy"):
        a, b = np.load(tmp_path / "local" / name), np.load(tmp_path / "ray" / name)
        np.testing.assert_array_equal(a, b)
        cos = (a * np.load(store / name)).sum(1)
        assert cos.max() < 1 - 1e-4 and cos.min() >= 0.9 - 1e-3  # protected, within the default cosine floor
    summary = json.loads((tmp_path / "ray" / "fluxguard-templates-summary.json").read_text())
    assert summary["protection"]["method"].lower().startswith("advface") and summary["templates"] == 10
    no_model = CliRunner().invoke(app, [*args[:3], str(tmp_path / "x"), "--ray", "local"])
    assert no_model.exit_code == 1 and "--model" in no_model.output
