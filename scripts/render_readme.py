"""Render README.md's benchmark figures from the results files, so that no measured number is typed by hand.

Two kinds of generated text in README.md; everything else there is hand-written:

* blocks (tables): the lines between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``, rendered by the
  function registered with ``@block("NAME")``;
* inline figures inside prose: ``<!-- f:NAME -->value<!-- /f -->``, the value rendered by ``@figure("NAME")``.
  Markdown hides the comments; a marker must not start a line (that would open an HTML block).

Sources: ``benchmarks/results/*.json``, ``docs/images/*.json``, ``src/fluxguard/recognition/thresholds.json`` and
the shipped ``src/fluxguard/weights/lite/`` folder (its size). Every PSR is shown with its 95 % interval (Wilson
over identities, :func:`fluxguard.eval.psr.rate_interval`), and a sentence says one method beats another only when
the intervals do not overlap (:meth:`~fluxguard.eval.psr.RateInterval.beats`). A protection table lists its
controls: the clean photo and each generator method with its attack off (``<method>-noattack`` rows of
``benchmarks/protection.py``; "not measured in this file" where the file has none).

    python scripts/render_readme.py            # rewrite README.md in place
    python scripts/render_readme.py --check    # exit 1 and print a diff when README.md differs from the results

To add a figure: write ``@figure("area.what") def _(r: Results) -> str`` reading ``r.json("benchmarks/results/
x.json")``, put ``<!-- f:area.what --><!-- /f -->`` in README.md and run the script to fill it in. An unknown name,
an unclosed marker or a marker at the start of a line is an error. The output depends only on the files.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fluxguard.eval.psr import RateInterval, rate_interval, success  # noqa: E402

BLOCK_RE = re.compile(r"^<!-- results:([\w.-]+) -->\n(.*?)^<!-- /results:\1 -->$", re.MULTILINE | re.DOTALL)
FIGURE_RE = re.compile(r"<!-- f:([\w.-]+) -->(.*?)<!-- /f -->", re.DOTALL)
FIGURES: dict[str, Callable[[Results], str]] = {}
BLOCKS: dict[str, Callable[[Results], str]] = {}

PROTECTION = "benchmarks/results/protection.json"
THRESHOLDS = "src/fluxguard/recognition/thresholds.json"
NOT_MEASURED = "*not measured in this file*"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
MODE_WORDS = {"dodge": "dodging", "impersonate": "impersonation"}


class RenderError(ValueError):
    """README.md and the renderer disagree on structure (unknown name, unclosed marker, ...)."""


def figure(name: str) -> Callable[[Callable[[Results], str]], Callable[[Results], str]]:
    def register(fn: Callable[[Results], str]) -> Callable[[Results], str]:
        FIGURES[name] = fn
        return fn

    return register


def block(name: str) -> Callable[[Callable[[Results], str]], Callable[[Results], str]]:
    def register(fn: Callable[[Results], str]) -> Callable[[Results], str]:
        BLOCKS[name] = fn
        return fn

    return register


class Results:
    """Read-only access to the repository's results files (parsed once)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @functools.cache  # noqa: B019 (one instance per run)
    def json(self, rel: str) -> Any:
        return json.loads((self.root / rel).read_text())

    @functools.cache  # noqa: B019
    def protection(self, rel: str) -> ProtectionFile:
        return ProtectionFile(rel, self.json(rel))


class ProtectionFile:
    """One ``benchmarks/protection.py`` report: rows by name, PSR with intervals, the controls."""

    def __init__(self, rel: str, report: dict[str, Any]) -> None:
        self.rel = rel
        self.rows = {r["row"]: r for r in report["rows"] if "modes" in r}

    def row(self, name: str) -> dict[str, Any]:
        if name not in self.rows:
            raise RenderError(f"{self.rel} has no row {name!r} (rows: {', '.join(self.rows)})")
        return self.rows[name]

    def psr(self, name: str, mode: str, far: str = "1e-2") -> RateInterval:
        r = self.row(name)
        return rate_interval(r["modes"][mode]["mean"][far], r["n_identities"])

    def clean(self, mode: str, far: str = "1e-2") -> RateInterval:
        """The unprotected photos scored the same way; every row of a file shares them (checked)."""
        values = {(r["modes"][mode]["clean_mean"][far], r["n_identities"]) for r in self.rows.values()
                  if mode in r["modes"]}
        if len(values) != 1:
            raise RenderError(f"{self.rel}: the rows disagree on the clean {mode} rate @{far}: {sorted(values)}")
        ((value, n),) = values
        return rate_interval(value, n)

    def identities(self) -> int:
        ns = {r["n_identities"] for r in self.rows.values()}
        if len(ns) != 1:
            raise RenderError(f"{self.rel}: rows on different numbers of identities {sorted(ns)}")
        return ns.pop()



# ------------------------------------------------------------------------------------------------ formatting
def pct(v: float, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f}"


def ci(iv: RateInterval, digits: int = 1) -> str:
    """``64.6 [28.7, 88.5]``: the rate and its 95 % interval, in percent."""
    return f"{pct(iv.value, digits)} [{pct(iv.low, digits)}, {pct(iv.high, digits)}]"


def word(n: int) -> str:
    return WORDS[n] if 0 <= n < len(WORDS) else str(n)


def span(values: Iterable[float]) -> str:
    """``97-100``: the range of percentages (rounded)."""
    v = [100 * x for x in values]
    lo, hi = f"{min(v):.0f}", f"{max(v):.0f}"
    return lo if lo == hi else f"{lo}-{hi}"


def share_words(share: float) -> str:
    """``about half`` for 0.48; the nearest simple fraction within 0.05, else a percentage."""
    named = {0.0: "none", 0.25: "about a quarter", 1 / 3: "about a third", 0.5: "about half",
             2 / 3: "about two thirds", 0.75: "about three quarters", 1.0: "all"}
    best = min(named, key=lambda f: abs(f - share))
    return named[best] if abs(best - share) <= 0.05 else f"about {100 * share:.0f} %"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdict(pairs: list[tuple[str, RateInterval, RateInterval]], names: tuple[str, str]) -> str:
    """What the intervals allow one to say about ``(label, a, b)`` pairs: a difference is a lead only when the two
    95 % intervals do not overlap (:meth:`RateInterval.beats`), otherwise it is within noise."""
    wins = [label for label, a, b in pairs if a.beats(b)]
    losses = [label for label, a, b in pairs if b.beats(a)]
    n = sorted({iv.n for _, a, b in pairs for iv in (a, b)})
    if not wins and not losses:
        return f"every difference is within noise on {' / '.join(map(str, n))} identities (the 95 % intervals overlap)"
    if len(wins) == len(pairs):
        return f"{names[0]} is ahead in every case (the 95 % intervals do not overlap)"
    said = [f"{names[0]} is ahead for {', '.join(wins)}"] if wins else []
    said += [f"{names[1]} is ahead for {', '.join(losses)}"] if losses else []
    return "; ".join(said) + " (95 % intervals apart); the other differences are within noise"


def compare(get: Callable[[str, str, str], RateInterval], a: str, b: str, names: tuple[str, str],
            cells: Iterable[tuple[str, str]]) -> str:
    """``dodging PSR @1e-1 44.4 [..] against 18.1 [..], ...: <verdict>`` for rows ``a`` and ``b`` (``get(row, mode,
    far)`` gives a row's PSR)."""
    parts: dict[str, list[str]] = {}
    pairs = []
    for mode, far in cells:
        x, y = get(a, mode, far), get(b, mode, far)
        parts.setdefault(mode, []).append(f"@{far} {ci(x)} against {ci(y)}")
        pairs.append((f"{MODE_WORDS[mode]} @{far}", x, y))
    text = "; ".join(f"{MODE_WORDS[m]} PSR {', '.join(p)}" for m, p in parts.items())
    return f"{text}: {verdict(pairs, names)}"


# ------------------------------------------------------------------------------------------------ budgets
VISIBILITY = "benchmarks/results/visibility.json"
TRANSFER = "benchmarks/results/transfer.json"


@block("budgets")
def _(r: Results) -> str:
    """The budgets as the code defines them, and what each method measured at each on the contact-sheet faces."""
    from fluxguard.losses.visibility import BUDGETS

    vis = r.json(VISIBILITY)
    by = {(x["method"], x["budget"]): x for x in vis["results"]}
    methods = list(dict.fromkeys(x["method"] for x in vis["results"]))
    head = ["budget", "per-pixel bound (x JND term)", "CIEDE2000 cap", "visible cap",
            *[f"{m}: dE2000 / visible / max shift" for m in methods]]
    rows = []
    for name, b in BUDGETS.items():
        cells = []
        for m in methods:
            x = by.get((m, name))
            cells.append("–" if x is None else (
                f"{x['delta_e_mean']:.2f} / {pct(x['visible'])} % / "
                f"{max(x['max_abs_dL'], x['max_abs_da'], x['max_abs_db']):.2f} ([sheet](benchmarks/results/"
                f"{x['sheet']}))"))
        rows.append([f"`{name}`", f"{b.smooth_scale:g} T_l, {b.texture_scale:g} T_t", f"{b.max_delta_e:g}",
                     f"{pct(b.max_visible, 0)} %", *cells])
    faces = sorted({x["faces"] for x in vis["results"]})
    return table(head, rows) + (
        f"\n\nMeasured on {'/'.join(map(str, faces))} faces (astronaut, a five-person group photo, eval-split "
        "identities) with `" + vis["command"] + "`: mean CIEDE2000 and visible share over each face's mask, the "
        "largest mean colour shift of any face, on the saved 8-bit photos.")


# ------------------------------------------------------------------------------------------------ protection
ROW_ORDER = ("pgd-low", "pgd", "pgd-high", "pgd-plain", "fluxguard-low", "fluxguard", "fluxguard-high", "wdp-low",
             "wdp", "wdp-high")
CONTROL_LABELS = {"fluxguard": "control: fluxguard, attack off",
                  "wdp": "control: wdp, attack off"}


def _label(r: dict[str, Any]) -> str:
    strength = r["params"].get("strength", "medium")
    extra = " (no momentum, no DI)" if r["row"] == "pgd-plain" else ""
    return f"{r['method']}, {strength}{extra}"


def _generators(f: ProtectionFile) -> list[str]:
    """The methods of the file's rows that have an attack-off control (PGD's is the clean photo)."""
    return [m for m in CONTROL_LABELS if any(r["method"] == m for r in f.rows.values())]


def _quality_cells(q: dict[str, Any]) -> list[str]:
    m, cs = q.get("mask", {}), q.get("colour_shift_max", {})
    return [f"{m['delta_e_mean']:.2f}", f"{pct(m['visible'])} %", f"{max(cs.values()):.2f}",
            "bit-exact" if q.get("changed_outside") == 0 else f"{q.get('changed_outside')} px"]


def protection_table(f: ProtectionFile) -> str:
    """Rows in both modes, each mode closed by its controls: the generator methods with their attack off and the
    clean photo."""
    names = sorted((n for n in f.rows if not n.endswith("-noattack")),
                   key=lambda n: (ROW_ORDER.index(n) if n in ROW_ORDER else len(ROW_ORDER), n))
    generators = _generators(f)
    modes = list(dict.fromkeys(m for n in names for m in f.rows[n]["modes"]))
    head = ["method, budget", "mode", "n", "PSR @FAR 1e-1", "PSR @1e-2", "dE2000", "visible", "max colour shift",
            "outside the faces", "s/face"]
    out = []
    for mode in modes:
        for n in names:
            r = f.rows[n]
            if mode not in r["modes"]:
                continue
            out.append([_label(r), mode, str(r["n_identities"]), ci(f.psr(n, mode, "1e-1")), ci(f.psr(n, mode)),
                        *_quality_cells(r["modes"][mode]["quality"]), f"{r['seconds_per_face']:.1f}"])
        for m in generators:
            ctrl = f.rows.get(f"{m}-noattack")
            if ctrl is None or mode not in ctrl["modes"]:
                out.append([CONTROL_LABELS[m], mode, "–", NOT_MEASURED, NOT_MEASURED, "–", "–", "–", "–", "–"])
                continue
            name = f"{m}-noattack"
            out.append([CONTROL_LABELS[m], mode, str(ctrl["n_identities"]), ci(f.psr(name, mode, "1e-1")),
                        ci(f.psr(name, mode)), *_quality_cells(ctrl["modes"][mode]["quality"]),
                        f"{ctrl['seconds_per_face']:.1f}"])
        out.append(["control: clean photo (unprotected)", mode, str(f.clean(mode).n), ci(f.clean(mode, "1e-1")),
                    ci(f.clean(mode)), "0", "0.0 %", "0", "bit-exact", "–"])
    return table(head, out)


@block("protection")
def _(r: Results) -> str:
    threads = r.json(PROTECTION)["environment"]["threads"]
    f = r.protection(PROTECTION)
    missing = [f"{m}-noattack" for m in _generators(f) if f"{m}-noattack" not in f.rows]
    return protection_table(f) + (
        "\n\nPSR in %, with its 95 % Wilson interval over identities in brackets. s/face is wall time per "
        f"protected face on {word(threads)} thread{'s' if threads != 1 else ''} under varying load from other jobs: "
        "not a speed comparison between rows." + "".join(
            f" `python benchmarks/protection.py --limit {f.identities()} --rows {n} --append` adds the missing "
            f"{n} control." for n in missing))


@figure("protection.identities")
def _(r: Results) -> str:
    return str(r.protection(PROTECTION).identities())


@figure("robustness.kept")
def _(r: Results) -> str:
    f = r.protection(PROTECTION)

    def kept(name: str, mode: str) -> str:
        rob = f.row(name)["robustness"][mode]
        vals = [d["kept"]["1e-2"] for d in rob.values() if d["kept"]["1e-2"] is not None]
        return span(vals) if vals else "–"

    return "; ".join(f"{name}: {kept(name, 'dodge')} % (dodging) and {kept(name, 'impersonate')} % "
                     "(impersonation)" for name in ("pgd", "fluxguard") if name in f.rows
                     and f.rows[name].get("robustness"))


@figure("purification.summary")
def _(r: Results) -> str:
    f = r.protection(PROTECTION)
    rows = [n for n in ("wdp", "fluxguard", "pgd") if n in f.rows and f.rows[n].get("purification")]
    if not rows:
        return "not measured in this file"
    cfg = f.row(rows[0])["purification"]["config"]
    kept = ", ".join(f"{n} {pct(f.row(n)['purification']['impersonate']['kept']['1e-2'] or 0)} %" for n in rows)
    return (f"after purifying the face with the lite SD model (noise to t = {cfg['strength']:g}, {cfg['num_steps']} "
            f"DDIM steps) impersonation keeps this share of its PSR: {kept}")


# ------------------------------------------------------------------------------------------------ transfer
def _transfer_row(r: Results, name: str) -> dict[str, Any]:
    rows = r.json(TRANSFER)["rows"]
    if name not in rows:
        raise RenderError(f"{TRANSFER} has no row {name!r} (rows: {', '.join(rows)})")
    return rows[name]


def _transfer_delta_e(row: dict[str, Any]) -> float:
    """A transfer row's mean CIEDE2000 (dodging) over the face masks."""
    return float(row["modes"]["dodge"]["quality"]["delta_e_mean"])


def _transfer_psr(row: dict[str, Any], mode: str, far: str = "1e-2") -> RateInterval:
    return rate_interval(row["modes"][mode]["mean"][far] / 100, row["n_identities"])


@block("transfer")
def _(r: Results) -> str:
    t = r.json(TRANSFER)
    head = ["row", "what", "n", "dodging PSR @1e-1", "@1e-2", "kept after social", "impersonation PSR @1e-1",
            "@1e-2", "dE2000", "visible", "s/face"]
    rows = []
    for name, row in t["rows"].items():
        modes = row["modes"]

        def cell(mode: str, far: str, row: dict[str, Any] = row) -> str:
            return ci(_transfer_psr(row, mode, far)) if mode in row["modes"] else "–"

        kept = modes["dodge"]["kept"]["1e-2"] if "dodge" in modes else None
        q = next(iter(modes.values()))
        rows.append([f"`{name}`", row["what"], str(row["n_identities"]), cell("dodge", "1e-1"), cell("dodge", "1e-2"),
                     "–" if kept is None else f"{pct(kept, 0)} %", cell("impersonate", "1e-1"),
                     cell("impersonate", "1e-2"), f"{q['quality']['delta_e_mean']:.2f}",
                     f"{pct(q['quality']['visible'])} %", f"{q['seconds_per_face']:.1f}"])
    full = next(r for r in t["rows"].values() if len(r["modes"]) == 2)
    clean = [f"{MODE_WORDS[m]} {full['modes'][m]['clean']['1e-2']:.1f} %" for m in ("dodge", "impersonate")]
    return table(head, rows) + (
        f"\n\nJudges never attacked: {', '.join(t['protocol']['judges'])}; attack: every shipped model. Clean photo "
        f"(unprotected) at FAR 1e-2: {', '.join(clean)}. PSR in %, 95 % Wilson interval over identities.")


CELLS = [(m, far) for m in ("dodge", "impersonate") for far in ("1e-1", "1e-2")]


@figure("transfer.pgd_vs_fluxguard")
def _(r: Results) -> str:
    return compare(lambda name, mode, far: _transfer_psr(_transfer_row(r, name), mode, far), "pgd", "fluxguard",
                   ("PGD", "Flux-Guard (lite)"), CELLS)


@figure("transfer.equal_visibility")
def _(r: Results) -> str:
    """Flux-Guard spends less of a budget than PGD: compare Flux-Guard at `high` with the PGD budget row whose mean
    CIEDE2000 is nearest to it."""
    de = {n: _transfer_delta_e(_transfer_row(r, n)) for n in ("fluxguard", "pgd", "fluxguard-high")}
    near, text = _against_nearest_pgd(r, "fluxguard-high", "Flux-Guard")
    return (f"at the `medium` budget Flux-Guard's mean CIEDE2000 is {de['fluxguard']:.2f} against PGD's "
            f"{de['pgd']:.2f}: its regenerated change stays well inside the per-pixel bound that PGD's sign "
            f"steps fill. At about equal visibility, Flux-Guard at `high` (CIEDE2000 "
            f"{de['fluxguard-high']:.2f}) against PGD at `{near[0]}` ({near[1]:.2f}) gives {text}")


def _against_nearest_pgd(r: Results, name: str, label: str) -> tuple[tuple[str, float], str]:
    """Row ``name`` against the PGD budget row nearest to it in mean CIEDE2000: ((that budget, its CIEDE2000),
    the comparison of their PSRs)."""
    all_rows = r.json(TRANSFER)["rows"]
    row = _transfer_row(r, name)
    pgd_rows = {n: x for n, x in all_rows.items() if n in ("pgd-low", "pgd", "pgd-high")}
    near = min(pgd_rows, key=lambda n: abs(_transfer_delta_e(pgd_rows[n]) - _transfer_delta_e(row)))
    rows = {name: row, near: pgd_rows[near]}
    budget = {"pgd-low": "low", "pgd": "medium", "pgd-high": "high"}[near]
    text = compare(lambda n, mode, far: _transfer_psr(rows[n], mode, far), name, near, (label, "PGD"), CELLS)
    return (budget, _transfer_delta_e(pgd_rows[near])), text


@figure("transfer.wdp")
def _(r: Results) -> str:
    """WDP at its most visible budget against the PGD budget row of about the same visibility."""
    row = _transfer_row(r, "wdp-high")
    (budget, de), text = _against_nearest_pgd(r, "wdp-high", "WDP")
    seconds = _transfer_row(r, "wdp")["modes"]["dodge"]["seconds_per_face"]
    return (f"WDP at `high` (CIEDE2000 {_transfer_delta_e(row):.2f}) against PGD at "
            f"`{budget}` ({de:.2f}) gives {text}; WDP takes {seconds:.0f} s a face at `medium`")


@figure("transfer.identities")
def _(r: Results) -> str:
    return str(max(row["n_identities"] for row in r.json(TRANSFER)["rows"].values()))


@figure("transfer.default_dodge")
def _(r: Results) -> str:
    from fluxguard.api import DEFAULT_METHOD

    row = _transfer_row(r, DEFAULT_METHOD)
    return f"{ci(_transfer_psr(row, 'dodge'))} % at FAR 1e-2 and {ci(_transfer_psr(row, 'dodge', '1e-1'))} % at 1e-1"


@figure("transfer.default_per_judge")
def _(r: Results) -> str:
    from fluxguard.api import DEFAULT_METHOD

    judges = _transfer_row(r, DEFAULT_METHOD)["modes"]["dodge"]["judges"]
    return "; ".join(f"{name} {pct(v['1e-2']['protected'] / 100)} % (clean photo {pct(v['1e-2']['clean'] / 100)} %)"
                     for name, v in judges.items())


TRANSFER_WHITEBOX = "benchmarks/results/transfer_whitebox.json"


@figure("transfer.whitebox_ceiling")
def _(r: Results) -> str:
    from fluxguard.api import DEFAULT_METHOD

    t = r.json(TRANSFER_WHITEBOX)
    row = t["rows"].get(DEFAULT_METHOD)
    if row is None:
        raise RenderError(f"{TRANSFER_WHITEBOX} has no row {DEFAULT_METHOD!r}")
    black = _transfer_psr(_transfer_row(r, DEFAULT_METHOD), "dodge")
    white = _transfer_psr(row, "dodge")
    per = ", ".join(f"{name} {pct(v['1e-2']['protected'] / 100)}"
                    for name, v in row["modes"]["dodge"]["judges"].items())
    return (f"judged by the very models it attacked, the default dodges {ci(white)} % at FAR 1e-2 ({per}; "
            f"{row['n_identities']} identities), against {ci(black)} % on the judges it never saw")


@figure("transfer.window")
def _(r: Results) -> str:
    """The window lever against the default, white-box and black-box, with what each costs in visibility."""
    from fluxguard.api import DEFAULT_METHOD

    white = r.json(TRANSFER_WHITEBOX)["rows"]
    if "pgd-window" not in white or DEFAULT_METHOD not in white:
        raise RenderError(f"{TRANSFER_WHITEBOX} needs the rows pgd-window and {DEFAULT_METHOD}")
    window, default = _transfer_row(r, "pgd-window"), _transfer_row(r, DEFAULT_METHOD)

    def looks(row: dict[str, Any]) -> str:
        q = row["modes"]["dodge"]["quality"]
        return f"CIEDE2000 {q['delta_e_mean']:.2f}, {pct(q['visible'])} % visible"

    return (f"dodging PSR at FAR 1e-2 white-box {ci(_transfer_psr(white['pgd-window'], 'dodge'))} against "
            f"{ci(_transfer_psr(white[DEFAULT_METHOD], 'dodge'))} %, black-box "
            f"{ci(_transfer_psr(window, 'dodge'))} against {ci(_transfer_psr(default, 'dodge'))} %, at "
            f"{looks(window)} against {looks(default)}")


@figure("transfer.objectives")
def _(r: Results) -> str:
    """The objective levers (a feature-level loss, variance tuning) against the default: dodging at FAR 1e-2 judged
    by the attacked models and by the unseen judges, and impersonation on the unseen judges."""
    from fluxguard.api import DEFAULT_METHOD

    white = r.json(TRANSFER_WHITEBOX)["rows"]
    rows = {"pgd-feature": "the feature-level loss", "pgd-vmi": "variance tuning"}
    missing = [n for n in (*rows, DEFAULT_METHOD) if n not in white]
    if missing:
        raise RenderError(f"{TRANSFER_WHITEBOX} needs the rows {missing}")

    def cells(name: str) -> str:
        row = _transfer_row(r, name)
        return (f"dodging PSR at FAR 1e-2 white-box {ci(_transfer_psr(white[name], 'dodge'))}, black-box "
                f"{ci(_transfer_psr(row, 'dodge'))} %, impersonation PSR {ci(_transfer_psr(row, 'impersonate'))} %")

    said = "; ".join(f"{label} (`{name}`) {cells(name)}" for name, label in rows.items())
    return f"for {said}; for the default {cells(DEFAULT_METHOD)}"


def _transfer_psr_on(row: dict[str, Any], identities: list[str], mode: str, far: str = "1e-2") -> RateInterval:
    """A transfer row's mean PSR over its judges on some of its identities only (to set a row against one that was
    run on fewer), at the judges' calibrated thresholds, as the benchmark scores it."""
    from fluxguard.recognition.base import load_thresholds

    items = [it for it in row["modes"][mode]["items"] if it["identity"] in set(identities)]
    if len(items) != len(identities):
        raise RenderError(f"the row lacks some of {identities}")
    names = list(items[0]["judges"])
    shares = [np.mean([success(it["judges"][j]["protected"], load_thresholds(j)[far], mode) for j in names])
              for it in items]
    return rate_interval(float(np.mean(shares)), len(items))


@figure("transfer.objectives_heavy")
def _(r: Results) -> str:
    """The heavy objective levers (run on fewer identities) against the default on the same identities."""
    from fluxguard.api import DEFAULT_METHOD

    default = _transfer_row(r, DEFAULT_METHOD)
    said = []
    for name in ("pgd-feature-strong", "pgd-vmi-long"):
        row = _transfer_row(r, name)
        ids = row["identities"]
        for mode in ("dodge", "impersonate"):
            a, b = _transfer_psr(row, mode), _transfer_psr_on(default, ids, mode)
            if a.beats(b) or b.beats(a):
                raise RenderError(f"{name} {mode}: the sentence says within noise, the intervals say otherwise")
        said.append(f"`{name}` {ci(_transfer_psr(row, 'dodge'))} % dodging and "
                    f"{ci(_transfer_psr(row, 'impersonate'))} % impersonation at FAR 1e-2")
    return (f"{' and '.join(said)}, against the default's {ci(_transfer_psr_on(default, ids, 'dodge'))} and "
            f"{ci(_transfer_psr_on(default, ids, 'impersonate'))} % on the same {len(ids)} identities: within noise")


@figure("transfer.budget_curve")
def _(r: Results) -> str:
    """Dodging PSR of PGD at each budget, the presets and past them, with what each looks like."""
    rows = {"pgd-low": "`low`", "pgd": "`medium`", "pgd-high": "`high`",
            "pgd-high-texture": "high with its texture scale x1.5",
            "pgd-high-smooth": "with its smooth-skin scale x1.5",
            "pgd-high-x1.5": "with both x1.5", "pgd-high-x2": "with both x2"}
    said = []
    for name, label in rows.items():
        row = _transfer_row(r, name)
        q = row["modes"]["dodge"]["quality"]
        said.append(f"{label} {ci(_transfer_psr(row, 'dodge'))} % (CIEDE2000 {q['delta_e_mean']:.2f}, "
                    f"{pct(q['visible'])} % visible)")
    return "; ".join(said)


@figure("speed.demo")
def _(r: Results) -> str:
    t = r.json("benchmarks/results/threads.json")

    def median(cond: str) -> str:
        row = next(x for x in t["rows"] if x["condition"] == cond and x["threads"] == "auto")
        walls = sorted(run["wall_s"] for run in row["runs"])
        return f"{walls[len(walls) // 2]:.0f} s"

    return (f"`fluxguard protect --demo` takes {median('idle')} on the {t['cpus']}-core machine and "
            f"{median('loaded')} with another process holding one core (wall time of the whole command, model "
            "loading included, `--threads auto`)")


# ------------------------------------------------------------------------------------------------ example
def _example(r: Results) -> dict[str, Any]:
    from fluxguard.api import DEFAULT_METHOD

    return r.json(f"docs/images/astronaut_{DEFAULT_METHOD}_medium.json")


def _example_rows(r: Results) -> list[tuple[str, dict[str, Any], float]]:
    ex, th = _example(r), r.json(THRESHOLDS)["models"]
    return [(m, s, th[m]["thresholds"]["1e-2"]) for m, s in ex["similarity"].items()]


@block("example")
def _(r: Results) -> str:
    ex = _example(r)
    mode = ex["params"]["mode"]
    rows = []
    for m, s, t in _example_rows(r):
        still = not bool(success(s["after"], t, mode))
        rows.append([m, f"{s['before']:.3f}", f"{s['after']:.3f}", f"{t:.3f}", "**yes**" if still else "no"])
    q = ex["quality"]
    return table(["FR model", "similarity before", "after", "threshold (FAR 1e-2)", "still matches?"], rows) + (
        f"\n\nThe face, as people see it: mean CIEDE2000 {q['delta_e_mean']:.2f} (95th percentile "
        f"{q['delta_e_p95']:.2f}), {pct(q['visible'])} % of the face above its JND, colour shift dL* {q['dL']:+.2f} "
        f"da* {q['da']:+.2f} db* {q['db']:+.2f}; outside the face "
        + ("bit-exact" if q["changed_outside"] == 0 else f"{q['changed_outside']} pixels changed") + ".")


@figure("example.command")
def _(r: Results) -> str:
    return f"`{_example(r)['command']}`"


@figure("example.setting")
def _(r: Results) -> str:
    ex = _example(r)
    p = ex["params"]
    return (f"{ex['method']}, budget {p['budget']['name']}, {MODE_WORDS[p['mode']]}, the "
            f"{word(len(p['fr_models']))} shipped FR models attacked; {ex['seconds']:.0f} s on "
            f"{word(ex['torch_threads'])} CPU thread")


@figure("example.image")
def _(r: Results) -> str:
    from fluxguard.api import DEFAULT_METHOD

    return f"docs/images/astronaut_{DEFAULT_METHOD}_medium.png"


@figure("example.still_matches")
def _(r: Results) -> str:
    mode = _example(r)["params"]["mode"]
    n = sum(not bool(success(s["after"], t, mode)) for _, s, t in _example_rows(r))
    return {0: "no model that still matches", 1: "a model that still matches"}.get(n, f"{word(n)} models that "
                                                                                      "still match")


# ------------------------------------------------------------------------------------------------ jpeg quality
JPEG = "benchmarks/results/jpeg_quality.json"


@figure("jpeg.faces")
def _(r: Results) -> str:
    return word(r.json(JPEG)["faces"])


@figure("jpeg.qualities")
def _(r: Results) -> str:
    q = r.json(JPEG)["qualities_that_keep_protection"]
    return f"{min(q)} to {max(q)}"


@figure("jpeg.similarity_gap")
def _(r: Results) -> str:
    d = r.json(JPEG)
    png = d["white_box"]["PNG"]["mean_similarity"]
    gap = max(abs(d["white_box"][f"JPEG q{q}"]["mean_similarity"] - png) for q in d["qualities_that_keep_protection"])
    return f"{gap:.2f}"


def _no_match(r: Results, key: str) -> RateInterval:
    d = r.json(JPEG)
    return rate_interval(d[key]["PNG"]["no_match_rate"], d["faces"])


def _pct_ci(iv: RateInterval) -> str:
    return f"{pct(iv.value, 0)} % [{pct(iv.low, 0)}, {pct(iv.high, 0)}]"


@figure("jpeg.no_match_attacked")
def _(r: Results) -> str:
    return _pct_ci(_no_match(r, "white_box"))


@figure("jpeg.no_match_held_out")
def _(r: Results) -> str:
    return _pct_ci(_no_match(r, "held_out_summary"))


@figure("jpeg.still_match")
def _(r: Results) -> str:
    a, b = _no_match(r, "white_box").value, _no_match(r, "held_out_summary").value
    return share_words(1 - (a + b) / 2)


# ------------------------------------------------------------------------------------------------ speed, lite
LITE = "benchmarks/results/lite.json"


@figure("lite.vae")
def _(r: Results) -> str:
    q = r.json(LITE)["quality"]
    return f"{q['n']} held-out face crops {q['psnr_mean']:.1f} dB PSNR / {q['ssim_mean']:.3f} SSIM"


@figure("lite.size")
def _(r: Results) -> str:
    folder = r.root / "src/fluxguard/weights/lite"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"{size / 1e6:.0f} MB"


# ------------------------------------------------------------------------------------------------ FR, detection
@figure("recognition.tar")
def _(r: Results) -> str:
    models = r.json("benchmarks/results/recognition.json")["eval"]["models"]
    judges = r.protection(PROTECTION).row("pgd")["modes"]["dodge"]["judges"]
    extra = [m for m in models if judges.get(m, {}).get("extra")]
    fmt = ", ".join(f"{m} {models[m]['tar']['1e-2']:.3f}" for m in models if m not in extra)
    held = ", ".join(f"{m} {models[m]['tar']['1e-2']:.3f}" for m in extra)
    return f"TAR {fmt}" + (f" (held-out judges: {held})" if held else "")


@figure("detectors.rate")
def _(r: Results) -> str:
    s = r.json("benchmarks/results/detectors.json")["summary"]["overall"]
    return (f"{pct(s['mtcnn']['exactly_one'])} % of {s['mtcnn']['photos']} identity photos (dlib HOG "
            f"{pct(s['dlib-hog']['exactly_one'])} %)")


# ------------------------------------------------------------------------------------------------ AdvFace
ADVFACE = ("benchmarks/results/advface.json", "benchmarks/results/advface-mobilefacenet.json",
           "benchmarks/results/advface-faceres.json")


def _advface(r: Results) -> list[dict[str, Any]]:
    return [m for f in ADVFACE for m in r.json(f)["models"]]


@block("advface")
def _(r: Results) -> str:
    rows = []
    for i, m in enumerate(_advface(r)):
        s = m["settings"]

        def arrow(get: Callable[[dict[str, Any]], float], fmt: str = "{:.3f}", s: dict[str, Any] = s) -> str:
            return f"{fmt.format(get(s['clean']))} → {fmt.format(get(s['B']))} ({fmt.format(get(s['gauss_B']))})"

        match = (f"{pct(s['clean']['privacy']['match_same'])} → {pct(s['B']['privacy']['match_same'])} % "
                 f"({pct(s['gauss_B']['privacy']['match_same'])})")
        faces = f"{m['faces']} faces" if i == 0 else str(m["faces"])
        rows.append([f"{m['model']} ({faces})", f"{s['B']['protection']['config']['min_cosine']:.3f}",
                     arrow(lambda x: x["utility"]["tar"]["1e-2"]), arrow(lambda x: x["utility"]["calibrated"]["tar"]),
                     arrow(lambda x: x["privacy"]["ssim"]), match])
    return table(["FR model", "cosine floor", "TAR@1e-2 clean → B", "TAR at the calibrated threshold",
                  "attacker SSIM clean → B", "attacker's same-photo match clean → B"], rows)


@figure("advface.budget")
def _(r: Results) -> str:
    budgets = {m["settings"]["B"]["protection"]["config"]["budget"] for m in _advface(r)}
    if len(budgets) != 1:
        raise RenderError(f"AdvFace results at different budgets {sorted(budgets)}")
    return f"{budgets.pop():g}"


@figure("advface.tar_gap")
def _(r: Results) -> str:
    """The largest TAR difference between B and noise of the same size, in points, rounded up."""
    gaps = []
    for m in _advface(r):
        b, g = m["settings"]["B"]["utility"], m["settings"]["gauss_B"]["utility"]
        gaps += [abs(b["tar"]["1e-2"] - g["tar"]["1e-2"]), abs(b["calibrated"]["tar"] - g["calibrated"]["tar"])]
    return str(math.ceil(100 * max(gaps)))


@figure("advface.weak_attackers")
def _(r: Results) -> str:
    by = {m["model"]: m for m in _advface(r)}
    return span(by[n]["settings"]["clean"]["privacy"]["match_same"] for n in ("dlib-resnet", "mobilefacenet"))


@figure("advface.variant_a")
def _(r: Results) -> str:
    a = next(m for m in _advface(r) if m["model"] == "mobileface")["settings"]["A"]["privacy"]
    return f"SSIM {a['ssim']:.3f}, {pct(a['match_same'])} %"


# ------------------------------------------------------------------------------------------------ web, scale
WEB = "benchmarks/results/web_load.json"
SCALE = "benchmarks/results/scale.json"


@figure("web.load")
def _(r: Results) -> str:
    w = r.json(WEB)
    steps = re.search(r"(\d+) steps", w["method"])
    return f"{w['requests']} requests, {w['concurrency']} at a time, on loopback, pgd {steps.group(1)} steps"


@figure("web.verdict")
def _(r: Results) -> str:
    w = r.json(WEB)
    failed = "no request failed" if w["failed"] == 0 else f"{w['failed']} of {w['requests']} requests failed"
    growth = w["rss_mb"]["growth_after_warmup"]
    memory = "the server's memory did not grow" if growth <= 0 else f"the server's memory grew by {growth:.0f} MB"
    return f"{failed} and {memory}"


@figure("web.summary")
def _(r: Results) -> str:
    w = r.json(WEB)
    growth = w["rss_mb"]["growth_after_warmup"]
    memory = "memory flat" if growth <= 0 else f"memory +{growth:.0f} MB"
    return f"{w['requests']} requests, {w['concurrency']} at a time: {w['failed']} failed, {memory}"


@block("scale")
def _(r: Results) -> str:
    s = r.json(SCALE)
    n = {run["photos"] for run in s["runs"]}
    models = len(re.search(r"judged by ([\w-]+(?:, [\w-]+)*)", s["method"]).group(1).split(", "))
    steps = re.search(r"(\d+) steps", s["method"]).group(1)
    head = [f"run ({'/'.join(map(str, sorted(n)))} photos, PGD {steps} steps, {models} FR models)", "wall s",
            "start-up s", "photos/min", "photos/min after start-up"]
    rows = [[run["run"], f"{run['wall_s']:.1f}", f"{run['startup_s']:.1f}", f"{run['photos_per_min']:.1f}",
             f"{run['photos_per_min_after_start']:.1f}"] for run in s["runs"]]
    return table(head, rows)


@figure("scale.speedup")
def _(r: Results) -> str:
    local, ray = r.json(SCALE)["runs"][:2]
    return f"{ray['photos_per_min_after_start'] / local['photos_per_min_after_start']:.1f}x"


@figure("scale.startup")
def _(r: Results) -> str:
    o = r.json(SCALE)["overhead"]
    return f"`ray.init` {o['ray_init_s']:.0f} s, then {o['ray_startup_s']:.0f} s per pipeline"


@figure("scale.per_photo")
def _(r: Results) -> str:
    added = r.json(SCALE)["overhead"]["ray_added_ms_per_photo"]
    return "none measurable" if added <= 0 else f"{added:.0f} ms per photo"


# ------------------------------------------------------------------------------------------------ rendering
def render(text: str, results: Results) -> str:
    """README text with every block and inline figure re-rendered from ``results``."""
    seen_blocks = {m.group(1) for m in BLOCK_RE.finditer(text)}
    for name in re.findall(r"^<!-- results:([\w.-]+) -->$", text, re.MULTILINE):
        if name not in seen_blocks:
            raise RenderError(f"block {name!r} is not closed by <!-- /results:{name} -->")
    unknown = sorted(seen_blocks - BLOCKS.keys())
    if unknown:
        raise RenderError(f"unknown block(s) {unknown}; known: {sorted(BLOCKS)}")

    def fill_block(m: re.Match[str]) -> str:
        return f"<!-- results:{m.group(1)} -->\n{BLOCKS[m.group(1)](results).rstrip()}\n<!-- /results:{m.group(1)} -->"

    def fill_figure(m: re.Match[str]) -> str:
        name, old = m.group(1), m.group(2)
        if name not in FIGURES:
            raise RenderError(f"unknown figure {name!r}; known: {sorted(FIGURES)}")
        if "<!--" in old:
            raise RenderError(f"figure {name!r} is not closed before the next marker")
        return f"<!-- f:{name} -->{FIGURES[name](results)}<!-- /f -->"

    out = FIGURE_RE.sub(fill_figure, BLOCK_RE.sub(fill_block, text))
    opened, closed = out.count("<!-- f:"), len(FIGURE_RE.findall(out))
    if opened != closed:
        raise RenderError(f"{opened - closed} inline figure marker(s) without <!-- /f -->")
    for i, line in enumerate(out.splitlines(), 1):
        if line.lstrip().startswith("<!-- f:"):
            raise RenderError(f"README line {i} starts with an inline figure marker (Markdown would open an HTML "
                              "block there): move it inside the sentence")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff if README.md is stale")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root holding README.md and the results")
    args = ap.parse_args(argv)
    readme = args.root / "README.md"
    text = readme.read_text()
    try:
        new = render(text, Results(args.root))
    except (RenderError, KeyError, FileNotFoundError) as e:
        print(f"render_readme: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                       "README.md", "README.md (from the results files)"))
            print("\nREADME.md differs from the results files: run python scripts/render_readme.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        readme.write_text(new)
        print(f"rewrote {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
