"""Protection benchmark: every available method through the same black-box evaluation (``fluxguard.eval.runner``).

Rows (every strength is the visibility budget of its name, the same for every method; see
``fluxguard.losses.visibility.BUDGETS``):
  pgd-low, pgd, pgd-high           PGD (MI-FGSM + input diversity; "high" adds JPEG EOT) at each budget
  pgd-plain                        PGD without momentum or input diversity (Madry et al.), medium budget
  fluxguard-low, fluxguard, fluxguard-high   Flux-Guard on the lite FLUX model at each budget
  wdp-low, wdp, wdp-high           WDP on the lite SD model at each budget
  fluxguard-noattack  control: Flux-Guard with its adversarial stage off (adam_steps=0): with residual composition
               the output is the photo itself (PGD needs no such row: the clean control every table has)
  wdp-noattack control: WDP with its adversarial stage off (prot_steps=0); likewise the photo itself

One table: black-box PSR (per judge at FAR 1e-2 and the mean at 1e-1 / 1e-2 / 1e-3) for dodging and
impersonation, with the mean's 95 % interval (Wilson over identities, ``fluxguard.eval.psr.rate_interval``) and each
identity's own rate (``per_identity``), image quality as people see it over the face mask (CIEDE2000, visible share,
colour shift, changes outside the faces; ``fluxguard.eval.quality.face_quality``) and seconds per protected face,
closed by the controls (the clean photo; the ``-noattack`` rows, or a line saying they were not measured); written
as JSON + Markdown to benchmarks/results/protection.{json,md}. Per-row runs (protected photos of real faces, caches,
HTML reports) live in --work, outside the repository; re-running resumes them.

    python benchmarks/protection.py --limit 20                     # every available row
    python benchmarks/protection.py --limit 10 --rows pgd,fluxguard --no-robustness
    python benchmarks/protection.py --limit 10 --rows pgd-plain --append       # add a row to the same table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FARS = ("1e-1", "1e-2", "1e-3")
def lite_available() -> bool:
    from fluxguard.generators.lite_files import lite_dir

    return (lite_dir() / "vae" / "config.json").is_file()


def rows_spec(extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {
        "pgd-plain": {"method": "pgd", "params": {**extra, "momentum": 0.0, "diversity_prob": 0.0}},
        "fluxguard-noattack": {"method": "fluxguard", "params": {"adam_steps": 0}, "needs_lite": True},
        "wdp-noattack": {"method": "wdp", "params": {"prot_steps": 0}, "needs_lite": True},
    }
    for method in ("pgd", "fluxguard", "wdp"):
        for strength, suffix in (("low", "-low"), ("medium", ""), ("high", "-high")):
            params = {**(extra if method == "pgd" else {}), "strength": strength}
            rows[method + suffix] = {"method": method, "params": params, "needs_lite": method != "pgd"}
    return rows


# the attack-off control of each generator method (PGD's is the clean photo itself)
CONTROLS = {"fluxguard": "fluxguard-noattack", "wdp": "wdp-noattack"}


def per_identity(res: dict[str, Any], mode: str) -> dict[str, dict[str, dict[str, float]]]:
    """Each identity's mean-over-judges PSR at every FAR, protected and clean: the independent units behind the
    mean's interval (every black-box judge scores the same identities). ``{"protected"|"clean": {identity: {FAR:
    rate}}}``; the mean over identities is the table's mean PSR when every judge scores every identity."""
    from fluxguard.eval.psr import success

    judges = {j: v["thresholds"] for j, v in res["protocol"]["judges"].items()}
    black = list(res["psr"][mode]["black_box"])
    prot: dict[str, dict[str, dict[str, list[bool]]]] = {}
    for it in res["items"]:
        if it["mode"] != mode:
            continue
        for j, v in it["judges"].items():
            if j in black and not v["white_box"]:
                cos = it["scores"]["protected"][j]
                for far, th in judges[j].items():
                    prot.setdefault(it["identity"], {}).setdefault(far, {}).setdefault(j, []).append(
                        bool(success(cos, th, mode)))
    out: dict[str, dict[str, dict[str, float]]] = {"protected": {}, "clean": {}}
    for ident, by_far in prot.items():
        out["protected"][ident] = {f: sum(sum(v) / len(v) for v in by_j.values()) / len(by_j)
                                   for f, by_j in by_far.items()}
    for ident, rec in res["clean"].items():
        cos = {j: c for j, c in rec[mode]["plain"].items() if j in black and c is not None}
        if cos:
            out["clean"][ident] = {f: sum(bool(success(c, judges[j][f], mode)) for j, c in cos.items()) / len(cos)
                                   for f in judges[next(iter(cos))]}
    return out


def _ci95(rates: dict[str, float], n: int) -> dict[str, list[float] | None]:
    """FAR -> [low, high] of the 95 % Wilson interval over ``n`` identities (None for a missing rate)."""
    from fluxguard.eval.psr import rate_interval

    out: dict[str, list[float] | None] = {}
    for f, v in rates.items():
        iv = rate_interval(v, n) if v is not None and v == v and n > 0 else None
        out[f] = [iv.low, iv.high] if iv else None
    return out


def summary_row(name: str, res: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    n = res["protocol"]["n_identities"]
    row: dict[str, Any] = {"row": name, "method": res["method"], "params": res["params"], **extra,
                           "n_identities": n, "modes": {}}
    for mode, block in res["psr"].items():
        row["modes"][mode] = {
            "judges": {j: {"psr": r["psr"], "clean_psr": r["clean_psr"], "n": r["n"], "extra": r["extra"]}
                       for j, r in block["black_box"].items()},
            "mean": block["mean"]["psr"],
            "clean_mean": block["mean"]["clean_psr"],
            "mean_ci95": _ci95(block["mean"]["psr"], n),
            "clean_mean_ci95": _ci95(block["mean"]["clean_psr"], n),
            "per_identity": per_identity(res, mode),
            "mean_zoo_rotation": block["mean_zoo_rotation"]["psr"],
            "quality": res["quality"][mode],
        }
    row["seconds_per_face"] = res["timing"]["seconds_per_face"]
    row["robustness"] = (
        {m: {t: {"mean": d["mean"], "kept": d["kept"], "clean_mean": d["clean_mean"]} for t, d in v.items()}
         for m, v in res["robustness"].items()}
        if res.get("robustness") else None)
    pur = res.get("purification")
    row["purification"] = (
        {"config": pur["config"], **{m: {"mean": d["mean"], "kept": d["kept"], "clean_mean": d["clean_mean"]}
                                     for m, d in pur.items() if m != "config"}}
        if pur else None)
    row["notes"] = res.get("notes", [])
    return row


def _pct(v: float | None) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"  # None / NaN (kept of a zero PSR): no figure


def _f(v: float | None, d: int = 3) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def _ci(rate: float | None, stored: list[float] | None, n: int) -> str:
    """``64.6 [28.5, 89.3]``: the rate and its 95 % interval over ``n`` identities (computed for reports written
    before the interval was stored)."""
    if rate is None or rate != rate:
        return "–"
    if stored is None:
        from fluxguard.eval.psr import rate_interval

        iv = rate_interval(rate, n)
        stored = [iv.low, iv.high]
    return f"{_pct(rate)} [{_pct(stored[0])}, {_pct(stored[1])}]"


def markdown(report: dict[str, Any]) -> str:
    rows = [r for r in report["rows"] if "modes" in r]
    judges: list[str] = []
    for r in rows:
        for m in r["modes"].values():
            judges += [j for j in m["judges"] if j not in judges]
    held_out = {j for r in rows for m in r["modes"].values() for j, v in m["judges"].items() if v["extra"]}
    head = ["row", "mode", *[f"{j}{' †' if j in held_out else ''} @1e-2" for j in judges], "mean @1e-1",
            "mean @1e-2", "mean @1e-3", "mean @1e-2, 95 % CI", "dE2000", "visible", "max colour shift",
            "outside the faces", "photo PSNR", "s/face"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for mode, m in r["modes"].items():
            q = m["quality"]
            mq, cs = q.get("mask", {}), q.get("colour_shift_max", {})
            lines.append("| " + " | ".join([
                r["row"], mode, *[_pct(m["judges"].get(j, {}).get("psr", {}).get("1e-2")) for j in judges],
                *[f"{_pct(m['mean'].get(f))} ({_pct(m['clean_mean'].get(f))})" for f in FARS],
                _ci(m["mean"].get("1e-2"), m.get("mean_ci95", {}).get("1e-2"), r["n_identities"]),
                _f(mq.get("delta_e_mean"), 2), _pct(mq.get("visible")),
                _f(max(cs.values()) if cs else None, 2),
                "bit-exact" if q.get("changed_outside") == 0 else f"{q.get('changed_outside', '–')} px",
                _f(q["photo"]["psnr"], 2), _f(r["seconds_per_face"], 1)]) + " |")
    if rows:
        # controls: each generator method with its attack off (when not measured, say so), then the clean photo
        missing = [CONTROLS[m] for m in dict.fromkeys(r["method"] for r in rows)
                   if m in CONTROLS and CONTROLS[m] not in {r["row"] for r in rows}]
        for mode, m in rows[0]["modes"].items():
            for name in missing:
                lines.append("| " + " | ".join([f"{name} (control: attack off)", mode, "not measured in this file",
                                                *["–"] * (len(head) - 3)]) + " |")
            lines.append("| " + " | ".join([
                "clean (unprotected)", mode, *[_pct(m["judges"].get(j, {}).get("clean_psr", {}).get("1e-2"))
                                               for j in judges],
                *[_pct(m["clean_mean"].get(f)) for f in FARS],
                _ci(m["clean_mean"].get("1e-2"), m.get("clean_mean_ci95", {}).get("1e-2"), rows[0]["n_identities"]),
                "0", "0.0", "0", "bit-exact", "∞", "–"]) + " |")
    env = report["environment"]
    commands = list(dict.fromkeys(r.get("command", report["command"]) for r in report["rows"]))
    limits = sorted({r["n_identities"] for r in rows})
    out = [
        "# Protection benchmark (black-box PSR %, leave-one-out over the shipped FR zoo)", "",
        *[f"`{c}`" for c in commands], "",
        f"{'/'.join(map(str, limits)) or report['limit']} identities of the eval split of {report['data']}; both "
        "modes; PSR = share of protected "
        "faces that the held-out judge no longer matches to another photo of the person (dodging) / matches to "
        "the target's test photo (impersonation); † = extra judge outside the attack zoo; mean = over every judge "
        "listed, with the clean (unprotected) rate in brackets; 95 % CI = Wilson interval over identities (the "
        "judges score the same identities, so identities are the independent units). Quality on the saved photo "
        "over the face mask (mean CIEDE2000, share of the face whose change exceeds its JND, largest mean colour "
        "shift |dL*|, |da*|, |db*| of any face, pixels changed outside the faces). "
        f"Machine: {env['machine']}, {env['cpus']} CPUs shared with other jobs (load {env['load']}), torch "
        f"{env['torch']}, {env['threads']} thread(s); {report['started']}.", "",
        *lines, "",
    ]
    rob = [r for r in rows if r.get("robustness")]
    if rob:
        names = list(next(iter(rob[0]["robustness"].values())))
        out += ["Robustness: mean black-box PSR @1e-2 after each transform of the saved photo (face re-detected), "
                "and in brackets the share of the untransformed PSR kept.", "",
                "| row | mode | none | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 3)]
        for r in rob:
            for mode, by in r["robustness"].items():
                before = r["modes"][mode]["mean"].get("1e-2")
                out.append("| " + " | ".join([r["row"], mode, _pct(before), *[
                    f"{_pct(by[t]['mean'].get('1e-2'))} ({_pct(by[t]['kept'].get('1e-2'))})" for t in names]]) + " |")
        # the transform alone also breaks some matches: the clean photo's rate after the same transform
        for mode, by in rob[0]["robustness"].items():
            out.append("| " + " | ".join(["clean (unprotected)", mode, _pct(rob[0]["modes"][mode]["clean_mean"].get(
                "1e-2")), *[_pct(by[t]["clean_mean"].get("1e-2")) for t in names]]) + " |")
        out.append("")
    pur = [r for r in rows if r.get("purification")]
    if pur:
        out += [f"Diffusion purification ({json.dumps(pur[0]['purification']['config'], sort_keys=True)}): mean "
                "black-box PSR @1e-2 of the saved photo, after purifying the face, the share kept, and the clean "
                "photo's rate after the same purification.", "",
                "| row | mode | saved | purified | kept | clean purified |", "|---|---|---|---|---|---|"]
        for r in pur:
            for mode, d in r["purification"].items():
                if mode == "config":
                    continue
                out.append("| " + " | ".join([r["row"], mode, _pct(r["modes"][mode]["mean"].get("1e-2")),
                                              _pct(d["mean"].get("1e-2")), _pct(d["kept"].get("1e-2")),
                                              _pct(d["clean_mean"].get("1e-2"))]) + " |")
        out.append("")
    out += [f"- {r['row']}: {r['method']} {json.dumps(r['params'], sort_keys=True)}, {r['n_identities']} identities, "
            f"{r.get('wall_seconds', '–')} s wall for the last invocation (cached work is resumed)" for r in rows]
    out.append("")
    # a run's note holds for the rows of that run only (e.g. "purification check not run" above a purification
    # table filled by other rows): name them
    notes = {n: [r["row"] for r in rows if n in r.get("notes", [])] for r in rows for n in r.get("notes", [])}
    if notes:
        out += [f"- {', '.join(names)}: {n}" for n, names in notes.items()] + [""]
    out += [f"Note: {n}" for n in report.get("notes", [])] + ([""] if report.get("notes") else [])
    skipped = [r for r in report["rows"] if "modes" not in r]
    if skipped:
        out += [f"- {r['row']}: {r['status']}" for r in skipped] + [""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="face folder (default ../shared/faces)")
    ap.add_argument("--limit", type=int, default=20, help="eval identities")
    ap.add_argument("--rows", default="pgd,fluxguard,wdp")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("FLUXGUARD_BENCH_WORK",
                                                                    "/work/cache/fluxguard-eval")),
                    help="per-row evaluation folders (protected photos: never inside the repository)")
    ap.add_argument("--param", action="append", default=[], help="k=v for every PGD row (e.g. steps=20)")
    ap.add_argument("--no-robustness", dest="robustness", action="store_false",
                    help="skip re-scoring after the robustness transforms (on by default: every row's results.json "
                    "is then complete, and a row can share its folder with a full `fluxguard evaluate` run)")
    ap.add_argument("--judges", default=None,
                    help="comma-separated judging FR models (default: every available one, extra held-out ones too)")
    ap.add_argument("--append", action="store_true",
                    help="add these rows to an existing --out report (same-named rows are replaced), so rows run "
                    "by separate invocations share one table")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (kept with --append)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "protection")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from fluxguard.cli.protect import parse_params
    from fluxguard.data import find_faces_dir
    from fluxguard.eval.files import clean_json
    from fluxguard.eval.report import write_reports
    from fluxguard.eval.runner import evaluate

    data = args.data or find_faces_dir()
    if data is None:
        sys.exit("no face folder: pass --data or set FLUXGUARD_DATA")
    extra = parse_params(args.param)
    specs = rows_spec(extra)
    report: dict[str, Any] = {
        "command": "python benchmarks/protection.py " + " ".join(sys.argv[1:]),
        "data": str(data), "limit": args.limit, "started": time.strftime("%Y-%m-%d %H:%M"),
        "environment": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
        "rows": [],
    }
    if args.append and args.out.with_suffix(".json").is_file():
        old = json.loads(args.out.with_suffix(".json").read_text())
        report["rows"] = [r for r in old["rows"] if r["row"] not in args.rows.split(",")]
        report["notes"] = old.get("notes", [])
    report["notes"] = [*report.get("notes", []), *args.note]
    judges = [j.strip() for j in args.judges.split(",") if j.strip()] if args.judges else None
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        spec = specs[name]
        if spec.get("needs_lite") and not lite_available():
            report["rows"].append({"row": name, "status": "not run: the lite generator models are not shipped yet"})
            continue
        params = dict(spec["params"])
        info: dict[str, Any] = {"command": report["command"]}
        # rows that share settings share a folder (e.g. pgd here and a plain `fluxguard evaluate` run): protected
        # photos and embeddings are reused, a smaller --limit takes the first identities of the same order
        tag = hashlib.sha1(json.dumps([spec["method"], params], sort_keys=True).encode()).hexdigest()[:8]
        folder = args.work / ("pgd" if name == "pgd" and not extra else f"{name}-{tag}")
        print(f"[{name}] {spec['method']} {params} -> {folder}", flush=True)
        t0 = time.time()
        res = evaluate(spec["method"], data, folder, mode="both", limit=args.limit, robustness=args.robustness,
                       judges=judges, purification="auto", write_report=False, **params)
        # the folder may hold a run over more identities: this subset's reports get their own names
        write_reports(res, folder, prefix=f"bench-limit{args.limit}-")
        info["wall_seconds"] = round(time.time() - t0, 1)
        info["run_dir"] = str(folder)
        report["rows"].append(clean_json(summary_row(name, res, info)))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(markdown(report))
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
