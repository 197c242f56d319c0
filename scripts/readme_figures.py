"""Pictures for the README: a protected sample face at 100 %, its change amplified, and what FR models say; the web UI.

    PYTHONPATH=src python scripts/readme_figures.py                      # the default method and strength
    PYTHONPATH=src python scripts/readme_figures.py --method pgd --strength medium --web   # + docs/images/web_ui.jpg

Protects scikit-image's astronaut (public domain) with the public API, then writes
``docs/images/astronaut_<method>_<strength>.png`` (face region at 100 %, no resampling: before | after |
|after - before| x 10) and a ``.json`` beside it with the per-model similarities, the face's quality as people see it
(CIEDE2000, colour shift, visible share) and the parameters, which the README quotes. With ``--web`` it
also starts ``fluxguard serve`` (that method only, every shipped FR model), protects the same photo in headless
Chromium (Debian ``chromium`` + playwright) and saves a screenshot of the page as ``docs/images/web_ui.jpg``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default=None, help="default: fluxguard.defaults.DEFAULT_METHOD")
    ap.add_argument("--strength", default="medium")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--web", action="store_true", help="also a screenshot of the web UI")
    args = ap.parse_args()
    from fluxguard.defaults import DEFAULT_METHOD

    args.method = args.method or DEFAULT_METHOD
    if args.web:
        web_screenshot(args)

    import torch
    from skimage import data

    import fluxguard

    torch.set_num_threads(1)
    rgb = data.astronaut()
    t0 = time.perf_counter()
    res = fluxguard.protect(rgb, method=args.method, strength=args.strength, seed=args.seed)
    seconds = time.perf_counter() - t0
    face = res.faces[0].face
    from fluxguard.eval.contact_sheet import face_window

    y0, y1, x0, x1 = face_window(rgb.shape, face.box, margin=0.45)
    before, after = rgb[y0:y1, x0:x1], res.image[y0:y1, x0:x1]
    diff = np.clip(np.abs(after.astype(int) - before.astype(int)) * 10, 0, 255).astype(np.uint8)
    tiles = [Image.fromarray(a) for a in (before, after, diff)]
    tw, th = tiles[0].size
    canvas = Image.new("RGB", (3 * tw + 20, th + 24), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, ("before", "after", "|change| x 10"), strict=True)):
        canvas.paste(tile, (i * (tw + 10), 24))
        draw.text((i * (tw + 10) + 4, 6), label, fill="black")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"astronaut_{args.method}_{args.strength}"
    canvas.save(args.out / f"{stem}.png", optimize=True)  # PNG: 100 % means no codec either
    record = {
        "command": "python scripts/readme_figures.py " + " ".join(sys.argv[1:]),
        "method": args.method,
        "strength": args.strength,
        "params": res.params,
        "similarity": res.faces[0].similarity,
        "quality": res.faces[0].quality,
        "psnr_db": round(float(10 * np.log10(255.0**2 / np.mean((res.image.astype(float) - rgb) ** 2))), 2),
        "seconds": round(seconds, 1),
        "torch_threads": 1,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def web_screenshot(args: argparse.Namespace) -> None:
    import os
    import shutil
    import socket
    import subprocess
    import tempfile
    import urllib.request

    from playwright.sync_api import sync_playwright
    from skimage import data

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="fluxguard-fig-"))
    photo = work / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo, quality=95)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "fluxguard", "serve", "--port", str(port), "--methods",
                               args.method], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("#photos input[type=file]").set_input_files(str(photo))
            page.locator("#photos").get_by_label("astronaut.jpg").wait_for(timeout=60_000)
            page.get_by_label(args.strength, exact=True).check()
            page.locator("#protect").click()
            page.locator("#after img").wait_for(state="visible", timeout=600_000)
            page.wait_for_timeout(1000)
            args.out.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out / "web_ui.jpg"), full_page=True, type="jpeg", quality=85)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
