"""AdvFace on held-out people: utility and privacy of clean, AdvFace (variants A and B) and equal-size Gaussian-noise
templates, measured by :func:`fluxguard.features.evaluate.run_evaluation` on the ``eval`` split.

    python benchmarks/advface.py [--data DIR] [--models mobileface] [--min-cosine 0.9] [--steps 20]
                                 [--detections DIR] [--html-dir DIR] [--limit N]

Uses the shipped shadow decoder of each model and its evaluation attacker from ``<cache>/advface/attackers``
(``--train-attackers`` trains missing ones first, :func:`fluxguard.features.training.train_attacker`). Writes
``benchmarks/results/advface.json`` and ``.md``; the HTML page with the
reconstructions (pictures derived from real people's photos) goes to ``--html-dir`` only, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxguard.data import find_faces_dir  # noqa: E402
from fluxguard.features.advface import AdvFaceConfig  # noqa: E402
from fluxguard.features.decoders import attackers_dir, decoder_path  # noqa: E402
from fluxguard.features.evaluate import markdown_table, run_evaluation  # noqa: E402

OUT = ROOT / "benchmarks" / "results"


def decoder_info(path: Path) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    params = sum(t.numel() for t in load_file(str(path)).values())
    return {"file": path.name, "bytes": path.stat().st_size, "parameters": params,
            **{k: meta.get(k) for k in ("role", "fr_model", "config", "steps", "train_seconds", "data")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--models", default="mobileface")
    p.add_argument("--variants", default="A,B")
    p.add_argument("--min-cosine", type=float, default=None)
    p.add_argument("--budget", type=float, default=None, help="fraction of each model's decision angle")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--detections", type=Path, default=None)
    p.add_argument("--html-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-attackers", action="store_true", help="train missing evaluation attackers first")
    p.add_argument("--name", default="advface", help="results file stem")
    p.add_argument("--render", action="store_true", help="only rewrite the Markdown from the existing JSON")
    args = p.parse_args()
    if args.render:
        render(args.name)
        return
    torch.set_num_threads(args.threads)
    data = args.data or find_faces_dir()
    if data is None:
        sys.exit("no data folder: pass --data or set FLUXGUARD_DATA")
    kw: dict = {}
    if args.min_cosine is not None:
        kw["min_cosine"] = args.min_cosine
    if args.budget is not None:
        kw["budget"] = args.budget
    if args.steps is not None:
        kw["steps"] = args.steps
    configs = {v: AdvFaceConfig(variant=v, **kw) for v in args.variants.upper().split(",")}
    models = args.models.split(",")
    command = "python benchmarks/advface.py " + " ".join(sys.argv[1:])
    t0 = time.perf_counter()
    res = run_evaluation(data, models, configs, limit=args.limit, detections=args.detections, out=args.html_dir,
                         command=command, train_attackers=args.train_attackers,
                         progress=lambda s: print(s, flush=True))
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["machine"] = {"cpu": platform.processor() or platform.machine(), "torch_threads": args.threads,
                      "torch": torch.__version__}
    res["decoders"] = {m: {"shadow": decoder_info(decoder_path("shadow", m)),
                           "attacker": decoder_info(attackers_dir() / f"attacker-{m}.safetensors")} for m in models}
    res["cpu_seconds"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_utime
                               + resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1)
    res["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    render(args.name)


def render(name: str) -> None:
    """Write ``<name>.md`` from ``<name>.json``."""
    res = json.loads((OUT / f"{name}.json").read_text())
    cpu = f", {res['cpu_seconds']:.0f} s CPU" if "cpu_seconds" in res else ""
    lines = ["# AdvFace: utility and privacy on held-out identities", "",
             f"Command: `{res['command']}` ({res['wall_seconds']:.0f} s wall{cpu}, "
             f"{res['machine']['torch_threads']} torch thread(s) on a shared, loaded 2-core CPU).", "",
             res["note"], ""]
    for r in res["models"]:
        d = res["decoders"][r["model"]]
        lines.append(f"- {r['model']}: {r['faces']} eval faces of {r['identities']} identities; judge "
                     f"`{r['judge']}` at its calibrated FAR 1e-2 threshold {r['judge_threshold']:.3f}; shadow "
                     f"{d['shadow']['parameters']} weights ({d['shadow']['bytes'] / 1e6:.2f} MB fp16, best of "
                     f"training at step {d['shadow']['steps']}), attacker {d['attacker']['parameters']} weights "
                     f"(step {d['attacker']['steps']}).")
        for v, s in r["settings"].items():
            if "protection" not in s:
                continue
            c, pr = s["protection"]["config"], s["protection"]
            budget = f" (budget {c['budget']} of the decision angle)" if "budget" in c else ""
            lines.append(f"  - variant {v}: min_cosine {c['min_cosine']}{budget}, {c['steps']} steps"
                         + (f", epsilon {c['epsilon'] * 255:.0f}/255" if v == "A" else "")
                         + f"; {pr['seconds_per_template']:.3f} s/template (wall), "
                           f"{pr['projected_fraction']:.0%} projected onto the cosine floor")
    lines += ["", markdown_table(res), "",
              "Columns: *cos to clean* is the template change (the budget); TAR@1e-2/1e-3 read off the impostor "
              "scores of each setting (ROC), *acc* is 10-fold accuracy on balanced pairs, *TAR@calib thr* uses the "
              "model's shipped FAR 1e-2 threshold (what a deployed system sees). Privacy: SSIM/PSNR of the "
              "attacker's 64 px reconstruction to the real aligned face (lower is more private) and the judge's "
              "match rate of the reconstruction to another photo / the same photo of the person (the attack "
              "success rate; the last row is the ceiling, the real 64 px face itself).", ""]
    (OUT / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
