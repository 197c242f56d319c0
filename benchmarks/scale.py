"""Photos per minute: the local batch vs the same batch on a local Ray (``fluxguard.dist``), and Ray's overhead.

Three measurements on this machine:

1. **local**: ``fluxguard protect``'s loop (``protect_one``) in this process, torch using each of
   ``--local-threads`` thread counts.
2. **ray**: ``dist.protect_photos`` on a local Ray of ``--cpus`` CPUs with ``--workers`` actors sharing them;
   the wall time counts everything the user waits for after ``ray.init`` (actor start, model loads).
   ``ray.init`` itself is reported apart.
3. **overhead**: a stub protector (no model: writes the photo back unchanged) on ``--stub-photos`` photos, locally
   and on one Ray worker; Ray's per-photo overhead = its seconds per photo after the first result minus the local
   seconds per photo; its start-up = time to the first result.

Photos: ``--photos`` real photos from ``../shared/faces`` (evenly spaced in MANIFEST order) when present, else
copies of skimage's astronaut. Method: PGD with ``--steps`` steps against ``--fr-models`` (also the judges).
Ray workers run at niceness 0 (Ray's default is 15, which starves them when anything else runs).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/scale.py [--photos 12] [--steps 5] [--workers 2]

Writes ``benchmarks/results/scale.json`` and ``scale.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


class StubProtector:
    """No model: the photo comes back unchanged (what is left is reading, writing and Ray's own cost)."""

    def params(self) -> dict[str, Any]:
        return {"method": "stub"}

    def protect(self, image: Any, **_: Any) -> Any:
        from fluxguard.api import ProtectionResult

        return ProtectionResult(image=image.rgb, original=image, faces=[], method="stub", mode="dodge", params={},
                                timings={"total": 0.0})


def make_stub() -> StubProtector:
    return StubProtector()


def pick_photos(n: int, tmp: Path) -> tuple[list[Path], str]:
    from fluxguard.data import find_faces_dir, list_photos

    faces = find_faces_dir()
    if faces is not None:
        import csv

        with (faces / "MANIFEST.tsv").open(newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f, delimiter="\t")
            # whole photos, not the 112-160 px aligned chips (too small for the detector)
            small = {r["path"] for r in rows if 250 <= min(int(r["width"]), int(r["height"]))
                     and max(int(r["width"]), int(r["height"])) <= 1024}
        photos = [p.path for p in list_photos(faces)
                  if p.identity is not None and p.path.relative_to(faces).as_posix() in small]
        step = max(1, len(photos) // n)
        # Linked under unique names (identities/<name>/1.jpg -> <name>_1.jpg): outputs go to one flat folder.
        links = tmp / f"photos-{n}"
        links.mkdir()
        picked = []
        for src in photos[::step][:n]:
            picked.append(links / f"{src.parent.name}_{src.name}")
            picked[-1].symlink_to(src)
        return picked, (f"{n} identity photos of {faces.name} 250-1024 px (every {step}th in MANIFEST "
                                    "order)")
    import skimage.data
    from PIL import Image

    im = Image.fromarray(skimage.data.astronaut())
    out = []
    for i in range(n):
        p = tmp / f"astronaut_{i:03d}.png"
        (im.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else im).rotate(i % 7).save(p)
        out.append(p)
    return out, f"{n} rotated/flipped copies of skimage's astronaut (512 px)"


def run_local(inputs: list[Path], make: Any, out: Path, threads: int) -> dict[str, float]:
    """The local batch: build the protector, then protect_one per photo (like ``fluxguard protect``)."""
    import torch

    from fluxguard.batch import BatchJob, protect_one

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    protector = make()
    first = None
    statuses = []
    for p in inputs:
        statuses.append(protect_one(protector, p, BatchJob(out=out))["status"])
        first = first or time.perf_counter() - t0
    return _timing(first or 0.0, time.perf_counter() - t0, len(inputs), statuses)


def run_ray(inputs: list[Path], make: Any, out: Path, workers: int, cpus: float) -> dict[str, float]:
    """The same batch through ``dist.protect_photos`` (results stream back as photos finish)."""
    from fluxguard import dist
    from fluxguard.batch import BatchJob

    t0 = time.perf_counter()
    first = None
    statuses = []
    for entry, _ in dist.protect_photos(inputs, make, BatchJob(out=out), workers=workers, num_cpus=cpus):
        first = first or time.perf_counter() - t0
        statuses.append(entry["status"])
    return _timing(first or 0.0, time.perf_counter() - t0, len(inputs), statuses)


def _timing(first: float, wall: float, n: int, statuses: list[str]) -> dict[str, float]:
    """Start-up = until the first photo is done (model loads, worker start, that photo); the steady rate is the
    rest of the photos over the rest of the time."""
    return {"photos": n, "protected": statuses.count("protected"), "wall_s": round(wall, 2),
            "startup_s": round(first, 2), "photos_per_min": round(60 * n / wall, 2),
            "s_per_photo_after_start": round((wall - first) / max(n - 1, 1), 3),
            "photos_per_min_after_start": round(60 * (n - 1) / max(wall - first, 1e-9), 2) if n > 1 else None}


def write_markdown(result: dict[str, Any], out: Path) -> str:
    """``scale.md`` from the result (``--from-json`` rewrites it without measuring again)."""
    o, rows = result["overhead"], result["runs"]
    added = o["ray_added_ms_per_photo"]
    per_photo = (f"{added} ms added per photo" if added > 0 else
                 f"no per-photo cost measurable ({added} ms, within this shared machine's noise)")
    md = [
        "# Scale-out: photos per minute, local vs local Ray",
        "",
        f"`{result['command']}` ({result['machine']}; load average {result['load_average_before'][0]} before, "
        f"{result['load_average_after'][0]} after). {result['photos']}; {result['method']}.",
        "",
        "| run | photos | protected | wall s | start-up s | photos/min | photos/min after start-up |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [f"| {r['run']} | {r['photos']} | {r['protected']} | {r['wall_s']} | {r['startup_s']} | "
           f"{r['photos_per_min']} | {r['photos_per_min_after_start']} |" for r in rows]
    md += [
        "",
        "Start-up = until the first photo is done: model loads and that photo (local); worker start, model loads "
        f"and that photo (Ray). `ray.init` took another {o['ray_init_s']} s, not in the table.",
        "",
        f"Ray overhead (stub protector that writes the photo back unchanged, {o['stub_photos']} photos, 1 worker): "
        f"{o['ray_ms_per_photo']} ms per photo after start-up vs {o['local_ms_per_photo']} ms locally (read + "
        f"write), i.e. {per_photo}; {o['ray_startup_s']} s to start the pipeline and its worker.",
    ]
    text = "\n".join(md) + "\n"
    (out / "scale.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=12)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--fr-models", default="mobilefacenet,mobileface")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (shared by its workers)")
    ap.add_argument("--local-threads", default="1", help="torch threads of the local runs (one run each)")
    ap.add_argument("--stub-photos", type=int, default=60, help="photos of the overhead runs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--from-json", action="store_true", help="only rewrite scale.md from OUT/scale.json")
    args = ap.parse_args()
    if args.from_json:
        print(write_markdown(json.loads((args.out / "scale.json").read_text()), args.out))
        return

    import ray
    import torch

    from fluxguard import dist
    from fluxguard.api import Protector

    models = [m for m in args.fr_models.split(",") if m]
    make = functools.partial(Protector, "pgd", fr_models=models, judges=models, steps=args.steps)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fluxguard-scale-"))
    rows: list[dict[str, Any]] = []
    try:
        inputs, photo_note = pick_photos(args.photos, tmp)
        stub_inputs, _ = pick_photos(args.stub_photos, tmp)
        for threads in (int(t) for t in args.local_threads.split(",")):
            r = run_local(inputs, make, tmp / f"local-{threads}", threads)
            rows.append({"run": f"local (1 process, {threads} torch thread{'s' if threads > 1 else ''})", **r})
            print(rows[-1], file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        dist.start_local(args.cpus, env={"OMP_NUM_THREADS": "1"}, system_config={"worker_niceness": 0}, attempts=5)
        init_s = time.perf_counter() - t0
        cpus = args.cpus / args.workers
        r = run_ray(inputs, make, tmp / "ray", args.workers, cpus)
        rows.append({"run": f"local Ray ({args.workers} workers x {cpus:g} CPU)", **r})
        print(rows[-1], file=sys.stderr, flush=True)

        stub_local = run_local(stub_inputs, make_stub, tmp / "stub-local", 1)
        stub_ray = run_ray(stub_inputs, make_stub, tmp / "stub-ray", 1, 1.0)
        print("stub", stub_local, stub_ray, file=sys.stderr, flush=True)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    local_ms = 1000 * stub_local["wall_s"] / args.stub_photos
    ray_ms = 1000 * stub_ray["s_per_photo_after_start"]
    result = {
        "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), torch {torch.__version__}, "
                   f"ray {ray.__version__}",
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
        "photos": photo_note,
        "method": f"pgd, {args.steps} steps, attacked and judged by {', '.join(models)}",
        "runs": rows,
        "overhead": {
            "stub_photos": args.stub_photos,
            "stub_local": stub_local,
            "stub_ray_1_worker": stub_ray,
            "local_ms_per_photo": round(local_ms, 1),
            "ray_ms_per_photo": round(ray_ms, 1),
            "ray_added_ms_per_photo": round(ray_ms - local_ms, 1),
            "ray_init_s": round(init_s, 1),
            "ray_startup_s": stub_ray["startup_s"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_markdown(result, args.out))


if __name__ == "__main__":
    main()
