"""Bounded load test of the web UI: N protection requests, C at a time, on loopback; no request may fail and the
server's memory must stay bounded.

Starts ``fluxguard serve`` as a user would (a subprocess on a free 127.0.0.1 port), then C client threads (each its
own ``gradio_client.Client``, the way C browser tabs would) send the UI's ``/protect`` request with scikit-image's
astronaut until N requests are done. The server's resident memory (its process tree) is sampled every 0.25 s.

Pass/fail (exit code 1 on fail): every request returns a protected file and a similarity table, and the resident
memory after the last request is within ``--rss-growth-mb`` of its value after the warm-up requests (the first C),
so requests do not leak. Requests run one at a time in the server (the others wait in its queue), so latency grows
with C; the table reports it.

    PYTHONPATH=src python benchmarks/web_load.py                        # 50 requests, 4 at a time, pgd 2 steps
    PYTHONPATH=src python benchmarks/web_load.py -n 20 -c 4 --steps 10

Writes ``benchmarks/results/web_load.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=50)
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="pgd steps per request")
    ap.add_argument("--fr-models", default="mobileface")
    ap.add_argument("--rss-growth-mb", type=float, default=200.0)
    ap.add_argument("--scale", type=float, default=1.0, help="resize the 512 px astronaut (0.5: 256 px, faster)")
    ap.add_argument("--timeout", type=float, default=300.0, help="client HTTP timeout per call, seconds")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from gradio_client import Client, handle_file
    from PIL import Image
    from skimage import data

    work = Path(tempfile.mkdtemp(prefix="fluxguard-load-"))
    photo = work / "astronaut.jpg"
    im = Image.fromarray(data.astronaut())
    if args.scale != 1.0:
        im = im.resize((round(im.width * args.scale), round(im.height * args.scale)), Image.LANCZOS)
    im.save(photo, quality=95)
    load_before = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "fluxguard", "serve", "--port", str(port), "--methods", "pgd", "--param",
           f"steps={args.steps}", "--fr-models", args.fr_models, "--judges", args.fr_models,
           "--max-queue", str(max(16, args.concurrency))]
    log = open(work / "serve.log", "wb")  # noqa: SIM115 (open while the server runs)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    t_start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() - t_start > 300:
                raise SystemExit(f"server did not start:\n{(work / 'serve.log').read_text()[-3000:]}") from None
            time.sleep(0.5)
    startup_s = time.monotonic() - t_start
    sproc = psutil.Process(server.pid)

    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), tree_rss(sproc)))
            time.sleep(0.25)

    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def worker() -> None:
        # a browser waits minutes for a response; httpx's default (5 s) is shorter than a busy server's answer
        client = Client(url, verbose=False, analytics_enabled=False, download_files=str(work / "downloads"),
                        httpx_kwargs={"timeout": args.timeout})
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.monotonic()
            entry: dict = {"i": i, "start": t0}
            try:
                before, after, table, files, status = client.predict(
                    [handle_file(str(photo))], "pgd", "dodge", "medium", "", None, i, api_name="/protect")
                rows = table["data"] if isinstance(table, dict) else table
                fname = files if isinstance(files, str) else (files[0] if files else None)
                ok = bool(fname) and Path(fname).is_file() and Path(fname).stat().st_size > 0 and bool(rows)
                entry.update(ok=ok, status=status, rows=len(rows or []))
                if not ok:
                    entry["error"] = f"missing output: files={files!r} rows={rows!r}"
            except Exception as e:  # a failed request is the measurement, not a crash of the benchmark
                entry.update(ok=False, error=f"{type(e).__name__}: {e}")
            entry["end"] = time.monotonic()
            entry["seconds"] = round(entry["end"] - t0, 2)
            with lock:
                results.append(entry)
                done = len(results)
            print(f"request {i}: {'ok' if entry['ok'] else 'FAILED ' + entry['error']} {entry['seconds']} s "
                  f"({done}/{args.requests})", flush=True)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t_run = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t_run
    time.sleep(1.0)
    stop.set()
    sampler.join()
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()
    shutil.rmtree(work, ignore_errors=True)

    results.sort(key=lambda e: e["end"])
    warm_end = results[min(args.concurrency, len(results)) - 1]["end"]
    rss_warm = max((r for t, r in samples if t <= warm_end), default=samples[0][1])
    rss_end = samples[-1][1]
    rss_peak = max(r for _, r in samples)
    mb = 1024 * 1024
    failures = [e for e in results if not e["ok"]]
    lat = sorted(e["seconds"] for e in results)
    growth = (rss_end - rss_warm) / mb
    passed = not failures and len(results) == args.requests and growth <= args.rss_growth_mb
    res = {
        "benchmark": "web_load",
        "command": "python benchmarks/web_load.py " + " ".join(sys.argv[1:]),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "method": f"pgd, {args.steps} steps, attack+judge {args.fr_models}; photo {im.width}x{im.height} "
                  "astronaut JPEG",
        "failed": len(failures),
        "failures": [{"i": e["i"], "error": e["error"]} for e in failures],
        "server_startup_s": round(startup_s, 1),
        "wall_s": round(wall, 1),
        "throughput_per_min": round(60 * len(results) / wall, 2),
        "latency_s": {"median": round(statistics.median(lat), 1), "p90": lat[int(0.9 * (len(lat) - 1))],
                      "max": lat[-1]},
        "rss_mb": {"after_warmup": round(rss_warm / mb, 1), "peak": round(rss_peak / mb, 1),
                   "end": round(rss_end / mb, 1), "growth_after_warmup": round(growth, 1),
                   "allowed_growth": args.rss_growth_mb},
        "passed": passed,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average before {load_before}, "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "web_load.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# Web UI load test (loopback)",
        "",
        f"{args.requests} requests, {args.concurrency} at a time, to `fluxguard serve` ({res['method']}). The server "
        "runs one protection at a time; the others wait in its queue.",
        "",
        "| requests | failed | wall s | per min | latency median / p90 / max s | RSS MB after warm-up / peak / end |",
        "|---|---|---|---|---|---|",
        f"| {args.requests} | {len(failures)} | {res['wall_s']} | {res['throughput_per_min']} | "
        f"{res['latency_s']['median']} / {res['latency_s']['p90']} / {res['latency_s']['max']} | "
        f"{res['rss_mb']['after_warmup']} / {res['rss_mb']['peak']} / {res['rss_mb']['end']} |",
        "",
        f"Result: **{'pass' if passed else 'FAIL'}** ({len(failures)} failed requests; RSS growth after warm-up "
        f"{res['rss_mb']['growth_after_warmup']} MB <= {args.rss_growth_mb} MB). Server start-up "
        f"{res['server_startup_s']} s.",
        "",
        f"Command: `{res['command']}` ({res['machine']}).",
    ]
    (args.out / "web_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
