"""The web UI: the service behind it (directly), and the real page driven in headless Chromium.

pgd with two steps on one small FR model keeps every protection to a few seconds on two CPU cores. The browser test
starts ``fluxguard serve`` as a user would (a subprocess on a free loopback port), uploads scikit-image's astronaut,
waits for the result, checks the before/after images and the similarity table, downloads the protected photo and
saves a screenshot (to ``$FLUXGUARD_TEST_ARTIFACTS`` when set, else the test's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxguard.data import package_faces
from fluxguard.errors import ConfigError, FluxguardError

pytest.importorskip("gradio", reason="the web UI needs gradio: pip install 'fluxguard[web]'")

from fluxguard.app.web import TABLE_HEADERS, WebService  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAST = {"methods": ["pgd"], "fr_models": ["mobileface"], "judges": ["mobileface"], "params": {"steps": 2}}


@pytest.fixture(scope="module")
def service():
    s = WebService(**FAST)
    yield s
    s.close()


@pytest.fixture(scope="module")
def astronaut_half() -> np.ndarray:
    im = Image.fromarray(package_faces()[0].rgb)
    return np.asarray(im.resize((im.width // 2, im.height // 2), Image.LANCZOS))


def jpeg_with_gps(path: Path, rgb: np.ndarray) -> Path:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0)}  # GPSInfo: latitude
    Image.fromarray(rgb).save(path, "JPEG", quality=95, exif=exif)
    with Image.open(path) as im:
        assert im.getexif()  # the input really carries metadata
    return path


# ------------------------------------------------------------------------------------------------ the service
def test_service_protects_strips_metadata_and_reports_every_judge(tmp_path: Path, service, astronaut_half) -> None:
    photo = jpeg_with_gps(tmp_path / "holiday.jpg", astronaut_half)
    seen: list[tuple[str, int, int]] = []
    res = service.protect_files([str(photo)], method="pgd", strength="low", seed=3,
                                progress=lambda s, k, n: seen.append((s, k, n)))
    assert res.messages == []
    assert len(res.files) == 1 and Path(res.files[0]).name == "holiday_protected.jpg"
    with Image.open(res.files[0]) as im:
        assert im.format == "JPEG" and im.size == (astronaut_half.shape[1], astronaut_half.shape[0])
        assert not im.getexif() and "xmp" not in im.info  # no EXIF, no GPS
    assert res.before.shape == res.after.shape == astronaut_half.shape
    assert np.abs(res.after.astype(int) - res.before.astype(int)).max() > 0  # the pixels changed
    assert len(res.rows) == 1 and len(res.rows[0]) == len(TABLE_HEADERS)
    name, face, model, attacked, before, after, threshold, _ = res.rows[0]
    assert (name, face, model, attacked) == ("holiday.jpg", 1, "mobileface", "yes")
    assert before == pytest.approx(1.0, abs=1e-3) and after < before and 0 < threshold < 1
    assert seen and seen[-1][0].startswith("holiday.jpg (1/1): ") and seen[-1][1] == seen[-1][2]
    # how visible the change is, per face, as the status line says it
    assert len(res.looks) == 1 and "CIEDE2000" in res.looks[0] and "outside the faces unchanged" in res.looks[0]
    # the cached Protector was built with the server's fixed steps under the chosen preset
    p = service.protector("pgd", "dodge", "low", None)
    assert p.params()["steps"] == 2 and p.params()["budget"]["name"] == "low"


def test_service_reports_bad_and_faceless_files_by_name(tmp_path: Path, service, astronaut_half) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    empty = tmp_path / "wall.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(empty)
    good = tmp_path / "me.png"
    Image.fromarray(astronaut_half).save(good)

    res = service.protect_files([str(bad), str(empty), str(good)], method="pgd")
    assert [Path(f).name for f in res.files] == ["me_protected.png"]
    assert len(res.messages) == 2
    assert res.messages[0] == "broken.jpg: not a recognised image format"  # the name, not the server's path
    assert res.messages[1] == "wall.png: no face found, nothing to protect"

    with pytest.raises(FluxguardError, match=r"broken\.jpg: .*wall\.png: no face found"):
        service.protect_files([str(bad), str(empty)], method="pgd")


def test_service_refuses_what_it_cannot_do(tmp_path: Path, service, astronaut_half) -> None:
    good = tmp_path / "me.png"
    Image.fromarray(astronaut_half).save(good)
    with pytest.raises(ConfigError, match="upload a photo"):
        service.protect_files([], method="pgd")
    with pytest.raises(ConfigError, match="needs a target photo"):
        service.protect_files([str(good)], method="pgd", mode="impersonate")
    with pytest.raises(ConfigError, match="takes no text edit"):
        service.protect_files([str(good)], method="pgd", edit="red lipstick")
    with pytest.raises(ConfigError, match="not offered"):
        service.protect_files([str(good)], method="wdp")
    with pytest.raises(ConfigError, match="at most 8"):
        service.protect_files([str(good)] * 9, method="pgd")
    big = WebService(**FAST, max_pixels=10_000)
    try:
        with pytest.raises(FluxguardError, match=r"me\.png: .*pixels"):
            big.protect_files([str(good)], method="pgd")
    finally:
        big.close()
    with pytest.raises(ConfigError, match="has a parameter 'bogus'"):
        WebService(methods=["pgd"], params={"bogus": 1})


def test_service_impersonation_moves_towards_the_target(tmp_path: Path, service) -> None:
    astro, hopper = package_faces()[:2]
    me, target = tmp_path / "me.png", tmp_path / "target.jpg"
    Image.fromarray(astro.rgb).save(me)
    Image.fromarray(hopper.rgb).save(target)
    res = service.protect_files([str(me)], method="pgd", mode="impersonate", target=str(target))
    _, _, _, _, before, after, _, _ = res.rows[0]
    assert after > before  # similarity to the target rises


def test_method_controls_follow_the_registry(service) -> None:
    from fluxguard.methods import METHODS

    full = WebService()
    try:
        from fluxguard.defaults import DEFAULT_METHOD

        assert full.methods == METHODS.names() and full.default_method == DEFAULT_METHOD
        # the built-in lite FLUX has no text encoders: no edit box until a real FLUX model is configured
        assert not full.supports_edit("fluxguard") and not full.supports_edit("pgd")
        assert full.strengths("wdp") == ["low", "medium", "high"]
    finally:
        full.close()
    assert service.default_method == "pgd"
    flux = WebService(params={"fluxguard.model": "black-forest-labs/FLUX.1-dev", "steps": 3})
    try:
        assert flux.supports_edit("fluxguard") and not flux.supports_edit("wdp")
        # a scoped parameter reaches its method only; a plain one every method that has it
        assert flux.method_params("fluxguard") == {"model": "black-forest-labs/FLUX.1-dev"}
        assert flux.method_params("wdp") == {} and flux.method_params("pgd") == {"steps": 3}
    finally:
        flux.close()
    with pytest.raises(ConfigError, match="method 'pgd' has no parameter 'model'"):
        WebService(params={"pgd.model": "x"})
    with pytest.raises(ConfigError, match="not offered"):
        WebService(methods=["pgd"], params={"wdp.model": "x"})


def test_old_results_are_pruned(tmp_path: Path) -> None:
    s = WebService(**FAST, workdir=tmp_path / "work")
    old, new = tmp_path / "work" / "old", tmp_path / "work" / "new"
    old.mkdir()
    new.mkdir()
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    s._prune()
    assert not old.exists() and new.exists()
    s.close()
    assert (tmp_path / "work").exists()  # a folder the caller gave is not removed


# ------------------------------------------------------------------------------------------------ the real page
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; .ci/run does it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``fluxguard serve`` on a free loopback port, as a user starts it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "fluxguard", "serve", "--port", str(port), "--methods", "pgd", "--param", "steps=2",
           "--fr-models", "mobileface", "--judges", "mobileface"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"fluxguard serve did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    yield url, proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_serve_listens_on_loopback_only(server) -> None:
    psutil = pytest.importorskip("psutil", reason="needs psutil to list the server's sockets")
    url, proc = server
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    listening = [c.laddr for c in psutil.Process(proc.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert (ip := [a.ip for a in listening if a.port == port]) == ["127.0.0.1"], ip


def test_concurrent_requests_all_succeed_and_memory_stays_bounded(server, tmp_path: Path) -> None:
    """A small version of benchmarks/web_load.py: 12 requests, 4 at a time, through the UI's API."""
    psutil = pytest.importorskip("psutil", reason="needs psutil to read the server's memory")
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    url, proc = server
    photo = tmp_path / "astronaut.png"
    Image.fromarray(package_faces()[0].rgb).resize((256, 256), Image.LANCZOS).save(photo)

    def request(i: int) -> tuple[list, str | None]:
        client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / f"dl{i}"),
                        httpx_kwargs={"timeout": 300})
        _, _, table, files, _ = client.predict([handle_file(str(photo))], "pgd", "dodge", "low", "", None, i,
                                               api_name="/protect")
        return table["data"], (files[0] if isinstance(files, list) else files)

    request(-1)  # warm-up: models loaded, caches filled
    rss = psutil.Process(proc.pid).memory_info().rss
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(request, range(12)))
    for rows, file in results:
        assert rows and rows[0][2] == "mobileface"
        assert file and Path(file).stat().st_size > 0
    grown_mb = (psutil.Process(proc.pid).memory_info().rss - rss) / 2**20
    assert grown_mb < 200, grown_mb


@pytest.mark.browser
def test_browser_upload_protect_download(server, tmp_path: Path) -> None:
    url, _ = server
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install playwright")
    chromium = _chromium()
    artifacts = Path(os.environ.get("FLUXGUARD_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    photo = jpeg_with_gps(tmp_path / "astronaut.jpg", package_faces()[0].rgb)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
            elsewhere: list[str] = []  # the page must not load anything from outside this server
            local = (url, "data:", "blob:")
            page.on("request", lambda r: None if r.url.startswith(local) else elsewhere.append(r.url))
            page.goto(url)
            page.locator("#photos input[type=file]").set_input_files(str(photo))
            page.locator("#photos").get_by_label("astronaut.jpg").wait_for(timeout=30_000)  # the upload finished
            page.locator("#protect").click()
            after = page.locator("#after img")
            after.wait_for(state="visible", timeout=180_000)
            page.locator("#before img").wait_for(state="visible", timeout=10_000)
            page.screenshot(path=str(artifacts / "web_ui_protected.png"), full_page=True)
            table = page.locator("#similarity")
            table.get_by_text("mobileface", exact=True).filter(visible=True).first.wait_for(timeout=10_000)
            for header in ("FR model", "before", "after", "threshold (FAR 1e-2)"):
                assert table.get_by_text(header, exact=True).filter(visible=True).count() >= 1, header
            assert "Protected 1 photo" in page.locator("#status").inner_text()

            row = page.locator("#download tr").filter(has=page.get_by_label("astronaut_protected.jpg"))
            link = row.locator("a").first
            with page.expect_download(timeout=30_000) as dl:
                link.click()
            saved = tmp_path / "downloaded.jpg"
            dl.value.save_as(saved)
            with Image.open(saved) as im:
                assert im.format == "JPEG" and im.size == (512, 512)
                assert not im.getexif()  # EXIF and GPS are gone
                got = np.asarray(im.convert("RGB")).astype(int)
            assert np.abs(got - package_faces()[0].rgb.astype(int)).mean() > 0.1  # not the original back

            # a file that is not an image: a clear message naming it, and the page stays usable
            page.locator("#photos button[aria-label='Clear']").first.click()
            page.locator("#photos input[type=file]").set_input_files(str(bad))
            page.locator("#photos").get_by_label("broken.jpg").wait_for(timeout=30_000)
            page.locator("#protect").click()
            toast = page.locator(".toast-body").filter(has_text="broken.jpg")
            toast.first.wait_for(timeout=60_000)
            assert "not a recognised image format" in toast.first.inner_text()
            page.screenshot(path=str(artifacts / "web_ui_bad_file.png"), full_page=True)
            assert elsewhere == []
        finally:
            browser.close()


def test_serve_refuses_bad_flags_before_starting() -> None:
    from typer.testing import CliRunner

    from fluxguard.cli import app

    for args, message in [(["--methods", "pgd", "--param", "bogus=1"], "has a parameter 'bogus'"),
                          (["--methods", "nope"], "unknown method 'nope'"),
                          (["--fr-models", "nope"], "unknown"),
                          (["--device", "cuda:7"], "cuda:7")]:
        res = CliRunner().invoke(app, ["serve", *args])
        assert res.exit_code == 1 and message in res.output, (args, res.output)
