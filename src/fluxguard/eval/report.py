"""Evaluation reports: ``results.json`` (the source of truth), ``results.md`` (tables) and ``report.html``.

The HTML page is self-contained and works offline: thumbnails are inline base64 JPEGs, plots are matplotlib (Agg)
PNGs inlined the same way, and the only styling is a small inline ``<style>`` block.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fluxguard.eval.files import clean_json, item_path, write_atomic
from fluxguard.eval.protocol import FARS, MAIN_FAR

MODE_TITLE = {"dodge": "dodging", "impersonate": "impersonation"}


def _pct(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}"


def _num(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


# ------------------------------------------------------------------------------------------------------ tables
def psr_table(results: Mapping[str, Any], mode: str, white_box: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the PSR table of one mode (percent; clean rates beside)."""
    block = results["psr"][mode]
    rows_src = block["white_box"] if white_box else block["black_box"]
    head = ["judge", "attacked with", "n", *[f"PSR@{f}" for f in FARS], *[f"clean@{f}" for f in FARS],
            "cos clean → protected"]
    rows = []
    for j, r in rows_src.items():
        zoo = ", ".join(r["zoos"])
        rows.append([j + (" †" if r.get("extra") else ""), zoo, str(r["n"]),
                     *[_pct(r["psr"].get(f)) for f in FARS], *[_pct(r["clean_psr"].get(f)) for f in FARS],
                     f"{_num(r['clean_mean_cos'])} → {_num(r['mean_cos'])}"])
    if not white_box and rows_src:
        m = block["mean"]
        rows.append(["**mean**", f"{len(m['judges'])} judges", "", *[_pct(m["psr"].get(f)) for f in FARS],
                     *[_pct(m["clean_psr"].get(f)) for f in FARS], ""])
        z = block.get("mean_zoo_rotation")
        if z and len(z["judges"]) != len(m["judges"]):
            rows.append(["mean (zoo rotation only)", f"{len(z['judges'])} judges", "",
                         *[_pct(z["psr"].get(f)) for f in FARS], *[_pct(z["clean_psr"].get(f)) for f in FARS], ""])
    return head, rows


def _seen(q: Mapping[str, Any]) -> str:
    """One line of a face's quality as people see it (older records without it: face SSIM / PSNR)."""
    if q.get("delta_e_mean") is None:
        return f"face SSIM {_num(q.get('face_ssim'))}, PSNR {_num(q.get('face_psnr'), 1)} dB"
    return (f"dE2000 {_num(q['delta_e_mean'], 2)}, visible {100 * q['visible']:.0f} %, dL* {q['dL']:+.2f} "
            f"da* {q['da']:+.2f} db* {q['db']:+.2f}")


def quality_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Quality as people see it over the face mask (CIEDE2000, visible share, colour shift, PSNR outside the
    masks), then the classic face-box and photo figures."""
    head = ["mode", "n", "dE2000 mean", "dE2000 p95", "visible", "max |dL*| / |da*| / |db*|", "PSNR outside",
            "mask SSIM", "face PSNR", "face SSIM", "photo PSNR", "photo SSIM"]
    rows = []
    for mode, q in results["quality"].items():
        f, p = q["face"], q["photo"]
        m = q.get("mask", {})
        cs = q.get("colour_shift_max", {})
        shift = " / ".join(_num(cs.get(k), 2) for k in ("dL", "da", "db"))
        vis = m.get("visible")
        rows.append([MODE_TITLE.get(mode, mode), str(q["n"]), _num(m.get("delta_e_mean"), 2),
                     _num(m.get("delta_e_p95"), 2), "–" if vis is None else f"{100 * vis:.1f} %", shift,
                     "bit-exact" if q.get("changed_outside") == 0 else _num(m.get("psnr_outside"), 1),
                     _num(m.get("ssim_mask")), _num(f["psnr"], 2), _num(f["ssim"]),
                     _num(p["psnr"], 2), _num(p["ssim"])])
    return head, rows


def derived_table(results: Mapping[str, Any], key: str) -> tuple[list[str], list[list[str]]]:
    """Robustness (``key="robustness"``) or purification table at the main FAR: mean black-box PSR, the share of
    the untransformed PSR kept, and the clean rate after the same transform."""
    data = results.get(key)
    if not data:
        return [], []
    modes = [m for m in results["modes"] if m in data]
    head = ["transform"]
    for m in modes:
        t = MODE_TITLE.get(m, m)
        head += [f"{t} PSR@{MAIN_FAR}", f"{t} kept", f"{t} clean@{MAIN_FAR}"]
    rows = [["none (saved PNG)"]]
    for m in modes:
        before = results["psr"][m]["mean"]["psr"].get(MAIN_FAR)
        clean = results["psr"][m]["mean"]["clean_psr"].get(MAIN_FAR)
        rows[0] += [_pct(before), "100.0" if before else "–", _pct(clean)]
    if key == "purification":
        names = ["purified"]
        get = {m: {"purified": data[m]} for m in modes}
    else:
        names = list(data[modes[0]]) if modes else []
        get = {m: data[m] for m in modes}
    for name in names:
        row = [name]
        for m in modes:
            d = get[m][name]
            row += [_pct(d["mean"].get(MAIN_FAR)), _pct(d["kept"].get(MAIN_FAR)), _pct(d["clean_mean"].get(MAIN_FAR))]
        rows.append(row)
    return head, rows


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _protocol_lines(results: Mapping[str, Any]) -> list[str]:
    p = results["protocol"]
    params = ", ".join(f"{k}={_short(v)}" for k, v in results["params"].items() if k != "method")
    t = results["timing"]
    lines = [
        f"- method: `{results['method']}` ({params}); strength: {results.get('strength')}; seed {results['seed']}",
        f"- {p['n_identities']} identities of the `{p['split']}` split (source photo protected, a different photo "
        "of the same person as reference); impersonation targets: "
        + (", ".join(f"{x['photo']} → {x['test']}" for x in p["targets"]) or "none"),
        f"- attack zoo: {', '.join(p['attack_models'])}; black-box: each judge scores photos protected against the "
        "zoo minus its own family († = judge outside the zoo, scores every rotation that excludes its family)",
        "- thresholds (cosine at FAR 1e-1 / 1e-2 / 1e-3): "
        + "; ".join(f"{j} {' / '.join(_num(v['thresholds'].get(f)) for f in FARS)}" for j, v in p["judges"].items()),
        f"- scoring: {p['scoring']}",
        f"- time: {_num(t['seconds_per_face'], 1)} s per protected face (method "
        f"{_num(t['method_seconds_per_face'], 1)} s; n={t['n']}; device {results['environment']['device']}, "
        f"{results['environment']['threads']} threads)",
    ]
    return lines


def markdown(results: Mapping[str, Any]) -> str:
    """results.md: the protocol in a few lines, then every table."""
    parts = [f"# fluxguard evaluation: {results['method']}", "", *_protocol_lines(results), ""]
    for mode in results["modes"]:
        parts += [f"## Black-box PSR (%), {MODE_TITLE.get(mode, mode)}", "",
                  _md_table(*psr_table(results, mode)), ""]
        if results["psr"][mode]["white_box"]:
            parts += [f"### White-box PSR (%), {MODE_TITLE.get(mode, mode)} (extra: the judge is attacked)", "",
                      _md_table(*psr_table(results, mode, white_box=True)), ""]
    parts += ["## Image quality (protected vs source)", "", _md_table(*quality_table(results)), ""]
    head, rows = derived_table(results, "robustness")
    if rows:
        parts += [f"## Robustness (mean black-box PSR % at FAR {MAIN_FAR} after each transform; kept = after / "
                  "before)", "", _md_table(head, rows), ""]
    head, rows = derived_table(results, "purification")
    if rows:
        cfg = results["purification"]["config"]
        parts += [f"## Diffusion purification ({cfg['backend']}, strength {cfg['strength']}, {cfg['num_steps']} DDIM "
                  f"steps, {cfg['crop']} px crop)", "", _md_table(head, rows), ""]
    if results.get("notes"):
        parts += ["## Notes", "", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------- HTML
def _b64(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _jpeg(rgb: np.ndarray, quality: int = 85) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return _b64(buf.getvalue(), "image/jpeg")


def _png_fig(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return _b64(buf.getvalue(), "image/png")


def _plots(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(title, data URL) of every plot: per-model similarity bars, PSR bars, robustness bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = []
    for mode in results["modes"]:
        rows = results["psr"][mode]["black_box"]
        if not rows:
            continue
        names = list(rows)
        x = np.arange(len(names))
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        ax = axes[0]
        clean = [rows[j]["clean_mean_cos"] or 0 for j in names]
        prot = [rows[j]["mean_cos"] or 0 for j in names]
        ax.bar(x - 0.2, clean, 0.4, label="clean", color="#999999")
        ax.bar(x + 0.2, prot, 0.4, label="protected", color="#3b6fb6")
        for i, j in enumerate(names):
            th = rows[j]["thresholds"].get(MAIN_FAR)
            if th is not None:
                ax.hlines(th, i - 0.45, i + 0.45, colors="#c0392b", linestyles="--",
                          label=f"threshold FAR {MAIN_FAR}" if i == 0 else None)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_ylabel("mean cosine to reference")
        ax.set_title(f"{MODE_TITLE.get(mode, mode)}: similarity per judge (black-box)")
        ax.legend(fontsize=8)
        ax = axes[1]
        for k, far in enumerate(FARS):
            ax.bar(x + (k - 1) * 0.27, [100 * (rows[j]["psr"].get(far) or 0) for j in names], 0.27,
                   label=f"FAR {far}")
        ax.scatter(x, [100 * (rows[j]["clean_psr"].get(MAIN_FAR) or 0) for j in names], color="k", marker="_",
                   s=200, label=f"clean @ {MAIN_FAR}", zorder=3)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_ylabel("PSR (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{MODE_TITLE.get(mode, mode)}: black-box PSR")
        ax.legend(fontsize=8)
        out.append((f"Similarity and PSR per judge: {MODE_TITLE.get(mode, mode)}", _png_fig(fig)))
    rob = results.get("robustness")
    if rob:
        modes = [m for m in results["modes"] if m in rob]
        names = ["none", *rob[modes[0]]]
        fig, ax = plt.subplots(figsize=(11, 3.4))
        x = np.arange(len(names))
        for k, m in enumerate(modes):
            vals = [results["psr"][m]["mean"]["psr"].get(MAIN_FAR)] + [rob[m][t]["mean"].get(MAIN_FAR) for t in
                                                                        names[1:]]
            ax.bar(x + (k - 0.5 * (len(modes) - 1)) * 0.4, [100 * (v or 0) for v in vals], 0.4,
                   label=MODE_TITLE.get(m, m))
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_ylabel(f"mean black-box PSR @ {MAIN_FAR} (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Robustness to what happens to a posted photo")
        ax.legend(fontsize=8)
        out.append(("Robustness", _png_fig(fig)))
    return out


def _face_crop(rgb: np.ndarray, box: Sequence[float], size: int = 160) -> np.ndarray:
    from PIL import Image

    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, side = (x0 + x1) / 2, (y0 + y1) / 2, 1.6 * max(x1 - x0, y1 - y0)
    a0, b0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    a1, b1 = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    crop = rgb[b0:b1, a0:a1] if a1 > a0 and b1 > b0 else rgb
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC))


def _thumbnails(results: Mapping[str, Any], out_dir: Path, per_mode: int = 6) -> list[str]:
    """HTML figures: source face, protected face, amplified difference, with the judges' cosines."""
    from fluxguard.io import load_image

    data = Path(results["data_dir"])
    figs = []
    for mode in results["modes"]:
        seen = 0
        for it in results["items"]:
            if it["mode"] != mode or seen >= per_mode:
                continue
            bb = [j for j, v in it["judges"].items() if not v["white_box"]]
            if not bb:
                continue
            src_p = data / it["source"]
            prot_p = item_path(out_dir, mode, it["zoo_tag"], it["identity"], ".png")
            if not (src_p.is_file() and prot_p.is_file()):
                continue
            src, prot = load_image(src_p).rgb, load_image(prot_p).rgb
            a, b = _face_crop(src, it["face"]["box"]), _face_crop(prot, it["face"]["box"])
            diff = np.clip(np.abs(a.astype(np.int16) - b.astype(np.int16)) * 8, 0, 255).astype(np.uint8)
            cl = results["clean"][it["identity"]][mode]["plain"]
            sims = "<br>".join(
                f"{html.escape(j)}: {_num(cl.get(j))} → {_num(it['scores']['protected'].get(j))}" for j in bb)
            tgt = f"<br>target {html.escape(it['target']['photo'])}" if it.get("target") else ""
            figs.append(
                f"<figure><div class='row'><img alt='source' src='{_jpeg(a)}'><img alt='protected' src='{_jpeg(b)}'>"
                f"<img alt='difference x8' src='{_jpeg(diff)}'></div><figcaption><b>{html.escape(it['identity'])}"
                f"</b> ({MODE_TITLE.get(mode, mode)}, {html.escape(it['zoo_tag'])}): source / protected / |diff| x8"
                f"{tgt}<br>{_seen(it['quality'])}<br>cos clean → protected:<br>{sims}</figcaption>"
                "</figure>")
            seen += 1
    return figs


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c).replace('**', '')}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th:first-child,td:first-child{text-align:left}thead{background:#f0f0f0}
figure{display:inline-block;margin:.5em;vertical-align:top;font-size:.8em;max-width:500px}
.row img{margin-right:2px}img.plot{max-width:100%}li{margin:.2em 0}"""


def html_report(results: Mapping[str, Any], out_dir: Path) -> str:
    """report.html: tables, plots and before/after thumbnails in one offline page."""
    title = f"fluxguard evaluation: {results['method']}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>"]
    parts += [f"<li>{html.escape(line[2:]).replace('`', '')}</li>" for line in _protocol_lines(results)]
    parts.append("</ul>")
    for mode in results["modes"]:
        parts.append(f"<h2>Black-box PSR (%), {MODE_TITLE.get(mode, mode)}</h2>")
        parts.append(_html_table(*psr_table(results, mode)))
        if results["psr"][mode]["white_box"]:
            parts.append(f"<h3>White-box PSR (%), {MODE_TITLE.get(mode, mode)} (extra: the judge is attacked)</h3>")
            parts.append(_html_table(*psr_table(results, mode, white_box=True)))
    parts += ["<h2>Image quality</h2>", _html_table(*quality_table(results))]
    for key, label in (("robustness", "Robustness"), ("purification", "Diffusion purification")):
        head, rows = derived_table(results, key)
        if rows:
            parts += [f"<h2>{label} (mean black-box PSR % at FAR {MAIN_FAR}; kept = after / before)</h2>",
                      _html_table(head, rows)]
    for t, url in _plots(results):
        parts.append(f"<h2>{html.escape(t)}</h2><img class='plot' alt='{html.escape(t)}' src='{url}'>")
    thumbs = _thumbnails(results, out_dir)
    if thumbs:
        parts += ["<h2>Before / after</h2>", *thumbs]
    if results.get("notes"):
        parts += ["<h2>Notes</h2><ul>", *[f"<li>{html.escape(n)}</li>" for n in results["notes"]], "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(results: Mapping[str, Any], out_dir: str | Path, *, prefix: str = "") -> dict[str, Path]:
    """Write results.json, results.md and report.html into ``out_dir`` (the evaluation folder: thumbnails are read
    from its ``items/``), each name preceded by ``prefix``; returns their paths."""
    out = Path(out_dir)
    paths = {"json": out / f"{prefix}results.json", "md": out / f"{prefix}results.md",
             "html": out / f"{prefix}report.html"}
    write_atomic(paths["json"], json.dumps(clean_json(results), indent=1, allow_nan=False).encode())
    clean = json.loads(paths["json"].read_text())  # the tables are made from exactly what was saved
    write_atomic(paths["md"], markdown(clean).encode())
    write_atomic(paths["html"], html_report(clean, out).encode())
    return paths
