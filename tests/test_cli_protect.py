"""``fluxguard protect`` end to end: inputs, presets, strict flags, outputs, summary, resume, kill -9, seeds, exit
codes. Real faces that ship in packages (scikit-image's astronaut, matplotlib's Grace Hopper), pgd with two steps on
one small FR model, so the whole file runs in about a minute on two CPU cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fluxguard.cli import app
from fluxguard.data import package_faces

REPO = Path(__file__).resolve().parents[1]
FAST = ["--method", "pgd", "--param", "steps=2", "--fr-models", "mobileface", "--judges", "mobileface",
        "--device", "cpu"]
SUMMARY = "fluxguard-summary.json"


@pytest.fixture(scope="module")
def faces() -> dict[str, np.ndarray]:
    """The package faces at half size (faces about 50 px wide: still found, four times faster)."""
    out = {}
    for f in package_faces():
        im = Image.fromarray(f.rgb)
        out[f.name] = np.asarray(im.resize((im.width // 2, im.height // 2), Image.LANCZOS))
    return out


def write(path: Path, rgb: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format=fmt, **({"quality": 95} if fmt in (None, "JPEG") else {}))
    return path


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["protect", *args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def summary(out: Path) -> dict:
    return json.loads((out / SUMMARY).read_text())


def by_name(record: dict) -> dict[str, dict]:
    return {Path(e["input"]).name: e for e in record["photos"]}


# ------------------------------------------------------------------------------------------------ inputs / outputs
def test_files_folders_globs_names_formats_and_summary(tmp_path: Path, faces) -> None:
    a, h = faces["astronaut"], faces["grace_hopper"]
    single = write(tmp_path / "in" / "me.jpg", a)
    write(tmp_path / "folder" / "hopper.png", h)
    (tmp_path / "folder" / "notes.txt").write_text("not a photo: folders only contribute image files")
    write(tmp_path / "globbed" / "astro.webp", a, "WEBP")
    write(tmp_path / "globbed" / "really_png.jpeg", h, "PNG")  # the content decides the format, not the name
    write(tmp_path / "globbed" / "skip.bmp", a)  # not matched by the pattern
    out = tmp_path / "out"

    code, text = run(str(single), str(tmp_path / "folder"), str(tmp_path / "globbed" / "*.[jw]*"), "--out", str(out),
                     *FAST)
    assert code == 0, text
    produced = sorted(p.name for p in out.iterdir())
    assert produced == sorted([SUMMARY, "me_protected.jpg", "hopper_protected.png", "astro_protected.webp",
                               "really_png_protected.png"])
    for name, fmt in [("me_protected.jpg", "JPEG"), ("hopper_protected.png", "PNG"),
                      ("astro_protected.webp", "WEBP"), ("really_png_protected.png", "PNG")]:
        with Image.open(out / name) as im:
            assert im.format == fmt
            assert not im.getexif() and "xmp" not in im.info  # no metadata written
    with Image.open(out / "me_protected.jpg") as im:
        assert im.size == (a.shape[1], a.shape[0])

    rec = summary(out)
    assert rec["method"] == "pgd" and rec["mode"] == "dodge" and rec["seed"] == 0 and "finished" in rec
    assert rec["counts"] == {"protected": 4, "skipped": 0, "no_face": 0, "unreadable": 0, "failed": 0}
    assert rec["params"]["steps"] == 2 and rec["params"]["fr_models"] == ["mobileface"]
    e = by_name(rec)["me.jpg"]
    assert e["status"] == "protected" and e["output"] == str(out / "me_protected.jpg")
    sim = e["faces"][0]["similarity"]["mobileface"]
    assert sim["before"] == pytest.approx(1.0, abs=1e-3) and sim["after"] < sim["before"] and sim["attacked"]
    assert len(e["faces"][0]["landmarks"]) == 5 and e["timings"]["total"] > 0
    # two steps leave every face matched, and the console says so rather than letting the numbers imply protection
    assert "4 of 4 faces are still matched to their unprotected photo" in " ".join(text.split())


def test_recursive_mirrors_subfolders_and_skips_its_own_output(tmp_path: Path, faces) -> None:
    root = tmp_path / "holiday"
    write(root / "day1" / "face.png", faces["astronaut"])
    write(root / "day2" / "face.png", faces["grace_hopper"])  # the same file name in another sub-folder
    out = root / "protected"  # inside the input folder: a re-run must not protect the protected copies
    code, text = run(str(root), "-r", "--out", str(out), *FAST)
    assert code == 0, text
    assert (out / "day1" / "face_protected.png").is_file() and (out / "day2" / "face_protected.png").is_file()
    code, text = run(str(root), "-r", "--out", str(out), *FAST)
    assert code == 0, text
    assert summary(out)["counts"] == {"protected": 0, "skipped": 2, "no_face": 0, "unreadable": 0,
                                      "failed": 0}


# ------------------------------------------------------------------------------------------------ presets / flags
def test_every_method_has_presets_of_real_parameters() -> None:
    from fluxguard.methods import METHODS

    for name in METHODS.names():
        cls = METHODS[name]
        assert set(cls.presets) == {"low", "medium", "high"}, name
        defaults = cls.config_class()
        for preset, values in cls.presets.items():
            assert values, (name, preset)
            assert set(values) <= set(cls.parameter_names()), (name, preset)
            assert values["budget"] == preset, (name, preset)  # a strength is the visibility budget of its name
            if preset == "medium":  # medium is the method's (paper's) defaults
                own = {k: v for k, v in values.items() if k != "budget"}
                assert all(getattr(defaults, k) == pytest.approx(v) for k, v in own.items()), name


def test_strength_preset_and_param_override(tmp_path: Path, faces) -> None:
    photo = write(tmp_path / "me.png", faces["astronaut"])
    # --strength low is the low visibility budget; --param steps=2 overrides the steps and keeps the preset's budget
    code, text = run(str(photo), "--out", str(tmp_path / "o"), "--strength", "low", *FAST)
    assert code == 0, text
    params = summary(tmp_path / "o")["params"]
    assert params["strength"] == "low"
    assert params["steps"] == 2
    assert params["budget"]["name"] == "low"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--param", "bogus=1"], "no parameter 'bogus'"),
        (["--param", "steps"], "key=value"),
        (["--edit", "red lipstick"], "does not support text edits"),
        (["--model", "black-forest-labs/FLUX.1-schnell"], "--model does not apply"),
        (["--strength", "extreme"], "no strength 'extreme'"),
        (["--mode", "sideways"], "unknown mode"),
        (["--mode", "impersonate"], "needs --target"),
        (["--target", "x.png"], "only used with --mode impersonate"),
        (["--device", "quantum"], "unknown device"),
        (["--method", "nope"], "unknown method 'nope'"),
    ],
)
def test_unsupported_flags_are_errors_not_ignored(tmp_path: Path, args: list[str], message: str) -> None:
    photo = tmp_path / "me.png"
    Image.new("RGB", (8, 8)).save(photo)
    base = ["--method", "pgd", "--param", "steps=2"] if "--method" not in args else []
    code, text = run(str(photo), "--out", str(tmp_path / "o"), *base, *args)
    assert code == 1, text
    assert message in " ".join(text.split()), text
    assert "Traceback" not in text
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_device_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    photo = tmp_path / "me.png"
    Image.new("RGB", (8, 8)).save(photo)
    code, text = run(str(photo), "--out", str(tmp_path / "o"), "--method", "pgd", "--device", "cuda")
    assert code == 1 and "no CUDA GPU" in " ".join(text.split()), text


# ------------------------------------------------------------------------------------- never overwrite / resume
def test_never_overwrites_and_resumes(tmp_path: Path, faces) -> None:
    src = tmp_path / "in"
    write(src / "a.png", faces["astronaut"])
    write(src / "b.jpg", faces["grace_hopper"])
    out = tmp_path / "out"
    assert run(str(src), "--out", str(out), *FAST)[0] == 0
    a_out, b_out = out / "a_protected.png", out / "b_protected.jpg"
    a_bytes, a_mtime = a_out.read_bytes(), a_out.stat().st_mtime_ns
    first = by_name(summary(out))

    b_out.unlink()  # as if the first run had stopped before b
    code, text = run(str(src), "--out", str(out), *FAST)
    assert code == 0, text
    rec = summary(out)
    assert rec["counts"] == {"protected": 1, "skipped": 1, "no_face": 0, "unreadable": 0, "failed": 0}
    second = by_name(rec)
    assert second["a.png"]["status"] == "skipped" and second["b.jpg"]["status"] == "protected"
    assert second["a.png"]["faces"] == first["a.png"]["faces"]  # what the first run measured is kept
    # one summary for both runs: which photo each run did, and the earlier run's seconds stay the earlier run's
    first_run = first["a.png"]["run"]
    assert second["a.png"]["run"] == first_run and second["a.png"]["timings"] == first["a.png"]["timings"]
    assert second["b.jpg"]["run"] == rec["started"] != first_run
    assert [r["started"] for r in rec["runs"]] == [first_run, rec["started"]]
    assert [r["counts"]["protected"] for r in rec["runs"]] == [2, 1]
    table_row = next(line for line in text.splitlines() if line.startswith("│ a.png"))
    assert "earlier run" in table_row
    assert a_out.read_bytes() == a_bytes and a_out.stat().st_mtime_ns == a_mtime  # untouched
    assert b_out.is_file()

    # an output path equal to the input is refused, even with --overwrite
    before = (src / "a.png").read_bytes()
    code, text = run(str(src / "a.png"), "--out", str(src), "--suffix", "", "--overwrite", *FAST)
    assert code == 4, text
    assert "would replace the input" in by_name(summary(src))["a.png"]["message"]
    assert (src / "a.png").read_bytes() == before


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fluxguard", "protect", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def test_kill_9_leaves_only_whole_files_and_a_rerun_finishes(tmp_path: Path, faces) -> None:
    src = tmp_path / "in"
    names = []
    for i in range(5):
        rgb = faces["astronaut"] if i % 2 == 0 else faces["grace_hopper"]
        names.append(write(src / f"p{i}.png", rgb).name)
    out = tmp_path / "out"
    cmd = _cli(str(src), "--out", str(out), *FAST)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(p.name.endswith("_protected.png") for p in out.iterdir()):
                break
            time.sleep(0.05)
        else:
            err = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else ""
            pytest.fail(f"no output appeared: {err}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    images = [p for p in visible if p.name != SUMMARY]
    assert images and len(images) < len(names)  # killed mid-run
    for p in images:  # every image present is whole
        with Image.open(p) as im, Image.open(src / p.name.replace("_protected", "")) as original:
            im.load()
            assert im.size == original.size
    if (out / SUMMARY).exists():  # written atomically after each photo: always valid JSON
        assert json.loads((out / SUMMARY).read_text())["photos"]

    done = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    rec = summary(out)
    assert rec["counts"]["protected"] + rec["counts"]["skipped"] == len(names)
    assert rec["counts"]["skipped"] >= len(images)
    assert sorted(p.name for p in out.iterdir()) == sorted([SUMMARY] + [n.replace(".png", "_protected.png")
                                                                          for n in names])  # no leftovers


# ------------------------------------------------------------------------------------------------ seeds / exit codes
def test_same_seed_same_bytes(tmp_path: Path, faces) -> None:
    photo = write(tmp_path / "me.png", faces["astronaut"])
    outs = []
    for i, seed in enumerate(["7", "7", "8"]):
        o = tmp_path / f"o{i}"
        assert run(str(photo), "--out", str(o), "--seed", seed, *FAST, "--param", "diversity_prob=1.0")[0] == 0
        outs.append((o / "me_protected.png").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]  # input diversity draws differ with the seed


def test_exit_codes_of_each_readme_case(tmp_path: Path, faces) -> None:
    """README: 0 all protected, 1 bad arguments, 2 unreadable photos, 3 no face, 4 failed; 4 > 2 > 3 in a batch."""
    good = write(tmp_path / "good.png", faces["grace_hopper"])
    blank = write(tmp_path / "blank.png", np.full((160, 160, 3), 200, np.uint8))  # no face in it
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is a text file with a .jpg name")
    missing = tmp_path / "missing.png"

    def status(out: str, name: str) -> str:
        return by_name(summary(tmp_path / out))[name]["status"]

    assert run(str(good), "--out", str(tmp_path / "ok"), *FAST)[0] == 0
    code, text = run(str(good), "--out", str(tmp_path / "bad_arg"), *FAST, "--strength", "extreme")
    assert code == 1, text
    for name, path in (("missing", missing), ("broken", broken)):
        code, text = run(str(path), "--out", str(tmp_path / name), *FAST)
        assert code == 2, text
        assert status(name, path.name) == "unreadable"
    assert "no such file" in by_name(summary(tmp_path / "missing"))["missing.png"]["message"]
    assert "not a recognised image format" in by_name(summary(tmp_path / "broken"))["broken.jpg"]["message"]
    code, text = run(str(blank), "--out", str(tmp_path / "o1"), *FAST)
    assert code == 3, text
    assert status("o1", "blank.png") == "no_face"

    # a batch with an unreadable photo and one without a face: 2 wins over 3, and the batch goes on
    code, text = run(str(good), str(blank), str(broken), "--out", str(tmp_path / "o2"), *FAST)
    assert code == 2, text
    assert [status("o2", n) for n in ("good.png", "blank.png", "broken.jpg")] == ["protected", "no_face",
                                                                                 "unreadable"]
    assert (tmp_path / "o2" / "good_protected.png").is_file()  # one bad photo does not stop the batch
    assert "Traceback" not in text

    # a photo that fails while being written (its output would replace it) wins over an unreadable one: 4
    code, text = run(str(good), str(missing), "--out", str(tmp_path), "--suffix", "", *FAST)
    assert code == 4, text
    rec = by_name(json.loads((tmp_path / SUMMARY).read_text()))
    assert rec["good.png"]["status"] == "failed" and rec["missing.png"]["status"] == "unreadable"


def test_impersonation_summary_records_the_target(tmp_path: Path, faces) -> None:
    import hashlib

    photo = write(tmp_path / "me.png", faces["astronaut"])
    target = write(tmp_path / "someone.jpg", faces["grace_hopper"])
    code, text = run(str(photo), "--out", str(tmp_path / "o"), "--mode", "impersonate", "--target", str(target),
                     *FAST)
    assert code == 0, text
    rec = summary(tmp_path / "o")
    assert rec["mode"] == "impersonate"
    assert rec["target"] == {"path": str(target), "sha256": hashlib.sha256(target.read_bytes()).hexdigest()}


def test_demo_writes_outputs_only_into_out(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FLUXGUARD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code, text = run("--demo", "--out", str(out), *FAST)
    assert code == 0, text
    assert sorted(p.name for p in out.rglob("*")) == ["astronaut_protected.png", SUMMARY]
    assert summary(out)["photos"][0]["input"] == str(tmp_path / "cache" / "demo" / "astronaut.png")


def test_grayscale_png_stays_grayscale(tmp_path: Path, faces) -> None:
    grey = np.asarray(Image.fromarray(faces["astronaut"]).convert("L"))
    photo = tmp_path / "grey.png"
    Image.fromarray(grey).save(photo)
    code, text = run(str(photo), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, text
    with Image.open(tmp_path / "o" / "grey_protected.png") as im:
        assert im.mode == "L"  # one channel: no tint
        out = np.asarray(im)
    assert out.shape == grey.shape and 0 < np.abs(out.astype(int) - grey).max() <= 255


@pytest.mark.parametrize(("fmt", "ext"), [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_heic_and_avif_photos_are_protected_in_their_format_without_metadata(tmp_path: Path, faces, fmt: str,
                                                                              ext: str) -> None:
    from fluxguard.io import can_write

    astronaut = faces["astronaut"]  # skimage's astronaut at half size
    if not can_write(fmt):
        pytest.skip(f"this Pillow has no {fmt} writer")  # pillow-heif / a Pillow built with libavif
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x8825] = {2: (48.0, 51.0, 24.0)}  # GPS latitude: what must not leak
    photo = tmp_path / f"IMG_0001{ext}"
    Image.fromarray(astronaut).save(photo, format=fmt, quality=90, exif=exif.tobytes())
    with Image.open(photo) as im:
        assert im.format == fmt and im.getexif()  # the input really carries the metadata
    out = tmp_path / "out"
    code, text = run(str(photo), "--out", str(out), "--method", "pgd", "--param", "steps=1", "--fr-models",
                     "mobileface", "--judges", "mobileface")
    assert code == 0, text
    entry = summary(out)["photos"][0]
    assert entry["status"] == "protected" and len(entry["faces"]) == 1 and "note" not in entry
    dest = out / f"IMG_0001_protected{ext}"
    assert entry["output"] == str(dest)
    with Image.open(dest) as im:
        assert im.format == fmt and im.size == (astronaut.shape[1], astronaut.shape[0])
        assert not im.getexif() and not im.info.get("exif") and not im.info.get("xmp")
        protected = np.asarray(im.convert("RGB"))
    assert np.abs(protected.astype(int) - astronaut).mean() < 8  # the same photo, lossy-coded, plus the change


def test_threads_pin_the_pixels_whatever_the_machine_would_choose(tmp_path: Path, faces) -> None:
    """Same seed and the same --threads: the same bytes, even when the process default (what auto starts from)
    differs; the summary records the thread count used."""
    from conftest import torch_threads

    photo = write(tmp_path / "me.png", faces["astronaut"])
    outs = []
    for default_threads in (2, 1):
        o = tmp_path / f"o{default_threads}"
        with torch_threads(default_threads):
            code, text = run(str(photo), "--out", str(o), "--threads", "1", *FAST, "--param", "diversity_prob=1.0")
        assert code == 0, text
        assert summary(o)["threads"] == 1 and summary(o)["runs"][-1]["threads"] == 1
        outs.append((o / "me_protected.png").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize(("busy", "usable", "default", "chosen"),
                         [(0.1, 2, 2, 2), (1.0, 2, 2, 1), (1.6, 2, 2, 1), (0.4, 8, 4, 4), (3.0, 8, 8, 5)])
def test_auto_threads_leave_out_the_busy_cores(monkeypatch, busy: float, usable: int, default: int,
                                              chosen: int) -> None:
    from conftest import torch_threads

    from fluxguard import threads

    monkeypatch.setattr(threads, "busy_cpus", lambda sample_s=0: busy)
    monkeypatch.setattr(threads, "usable_cpus", lambda: usable)
    with torch_threads(default):
        assert threads.choose_threads("auto") == chosen
        assert threads.choose_threads(3) == 3  # a number is used as given


@pytest.mark.parametrize(("args", "message"), [(["--threads", "0"], "--threads takes a number"),
                                               (["--threads", "two"], "--threads takes a number"),
                                               (["--threads", "2", "--ray", "local"], "--ray-cpus")])
def test_bad_threads_are_argument_errors(tmp_path: Path, args: list[str], message: str) -> None:
    photo = tmp_path / "me.png"
    Image.new("RGB", (8, 8)).save(photo)
    code, text = run(str(photo), "--out", str(tmp_path / "o"), "--method", "pgd", *args)
    assert code == 1 and message in " ".join(text.split()), text


def test_a_format_without_a_safe_writer_is_written_as_png_and_said(tmp_path: Path, faces) -> None:
    photo = tmp_path / "animated.gif"
    Image.fromarray(faces["astronaut"]).save(photo)  # GIF: a palette would quantise the protective change away
    code, text = run(str(photo), "--out", str(tmp_path / "o"), *FAST)
    assert code == 0, text
    entry = summary(tmp_path / "o")["photos"][0]
    assert entry["output"].endswith("animated_protected.png") and entry["note"].startswith("GIF input written as PNG")
    assert "GIF input written as PNG" in " ".join(text.split())
