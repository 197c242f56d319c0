"""Thread count of ``fluxguard protect --demo``, on an idle machine and with one core busy with other work.

Each run is the real command in a fresh process (models loaded, the default method on the lite models, one
512 px photo): ``python -m fluxguard protect --demo --out TMP --threads T --json``, timed from start to exit.
``T`` is ``auto`` (the default: the cores not busy when the run starts), ``1``, and torch's own default (all
physical cores: what ``protect`` used before ``--threads`` existed). "Loaded" runs start a busy loop on one core
(another process, as a second job on a laptop would) a second before the command and stop it after.

    python benchmarks/threads.py [--repeats 3] [--conditions idle,loaded] [--threads auto,1,default]

Writes ``benchmarks/results/threads.json`` and ``threads.md``. Wall times only mean something on a machine that
runs nothing else: the load average before each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
BUSY_LOOP = "while True: pass"


def protect_demo(threads: str, loaded: bool) -> dict:
    """One ``protect --demo`` run: wall seconds, the threads it used, its output's sha256."""
    import hashlib

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"),
                                                                   os.environ.get("PYTHONPATH")) if p)}
    background = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if loaded else None
    try:
        if background is not None:
            time.sleep(1.0)  # the busy loop is running when fluxguard looks at the machine
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "fluxguard", "protect", "--demo", "--out", out,
                                   "--threads", threads, "--json"], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if done.returncode != 0:
                raise RuntimeError(f"protect --demo --threads {threads} failed:\n{done.stderr[-2000:]}")
            record = json.loads(done.stdout)
            sha = hashlib.sha256((Path(out) / "astronaut_protected.png").read_bytes()).hexdigest()
    finally:
        if background is not None:
            background.kill()
            background.wait()
    return {"wall_s": round(wall, 2), "threads_used": record["threads"], "load_before": round(load_before, 2),
            "output_sha256": sha[:16], "protect_s": record["photos"][0]["timings"]["total"]}


def markdown(result: dict) -> str:
    lines = [
        f"# `protect --demo`: thread count, idle and with one core busy ({result['cpus']} CPUs, "
        f"torch {result['torch']}, default {result['torch_default_threads']} threads)",
        "",
        "| machine | --threads | threads used | wall s (median) | wall s, each run | load before | output sha256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        runs = row["runs"]
        lines.append(f"| {row['condition']} | {row['threads']} | {sorted({r['threads_used'] for r in runs})} | "
                     f"{statistics.median(r['wall_s'] for r in runs):.1f} | "
                     f"{', '.join(str(r['wall_s']) for r in runs)} | "
                     f"{', '.join(str(r['load_before']) for r in runs)} | "
                     f"{', '.join(sorted({r['output_sha256'] for r in runs}))} |")
    lines += ["", f"Command: `{result['command']}`", "",
              "Wall time is the whole command (process start, imports, model loads, protection, writing). 'idle': the "
              "benchmark adds no load (other jobs may run: see the 1-minute load average before each run); 'loaded': "
              "a busy loop holds one core during the run. Same --threads, same output bytes; a different thread "
              "count changes float rounding and so the bytes."]
    if result.get("note"):
        lines += ["", f"**{result['note']}**"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--conditions", default="idle,loaded")
    ap.add_argument("--threads", default="auto,1,default", help="'default' = torch's own thread count")
    ap.add_argument("--note", default="", help="a line for threads.md (e.g. what else ran on the machine)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    default = torch.get_num_threads()
    rows = []
    for condition in args.conditions.split(","):
        for threads in args.threads.split(","):
            value = str(default) if threads == "default" else threads
            runs = []
            for i in range(args.repeats):
                runs.append(protect_demo(value, loaded=condition == "loaded"))
                print(condition, threads, i, runs[-1], flush=True)
            rows.append({"condition": condition, "threads": threads if threads != "default" else
                         f"{value} (torch default)", "runs": runs})
    result = {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_default_threads": default,
              "machine": platform.machine(), "command": f"python benchmarks/threads.py --repeats {args.repeats} "
              f"--conditions {args.conditions} --threads {args.threads}",
              "note": args.note, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "threads.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
