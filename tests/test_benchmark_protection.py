"""``benchmarks/protection.py``'s summary rows and Markdown: intervals, per-identity rates, controls, notes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

from fluxguard.eval.psr import rate_interval

ROOT = Path(__file__).resolve().parents[1]



protection = load_script("benchmarks/protection.py", "bench_protection")
TH = {"1e-1": 0.3, "1e-2": 0.5, "1e-3": 0.7}


def _fake_result() -> dict:
    """What ``fluxguard.eval.runner.evaluate`` returns, reduced to what ``summary_row`` reads: two identities, two
    zoo judges (one photo each per identity) and an extra judge that scores both rotations."""
    items, cos = [], {  # (identity, rotation) -> judge -> cosine to the reference (dodging succeeds below TH)
        ("a", "minus-j1"): {"j1": 0.2, "x": 0.6},
        ("a", "minus-j2"): {"j2": 0.4, "x": 0.2},
        ("b", "minus-j1"): {"j1": 0.8, "x": 0.8},
        ("b", "minus-j2"): {"j2": 0.6, "x": 0.1},
    }
    for (ident, zoo), scores in cos.items():
        items.append({"identity": ident, "mode": "dodge", "zoo_tag": zoo,
                      "judges": {j: {"white_box": False} for j in scores},
                      "scores": {"protected": {**scores, "redetected": True}}})
    # judge rates @1e-2: j1 1/2, j2 1/2, x 2/4 -> mean 0.5; per identity: a (1 + 1 + 1/2) / 3, b (0 + 0 + 1/2) / 3
    block = {"black_box": {j: {"psr": {"1e-2": 0.5}, "clean_psr": {"1e-2": 0.0}, "n": n, "extra": j == "x"}
                           for j, n in (("j1", 2), ("j2", 2), ("x", 4))},
             "mean": {"psr": {"1e-2": 0.5}, "clean_psr": {"1e-2": 0.0}},
             "mean_zoo_rotation": {"psr": {"1e-2": 0.5}}}
    clean = {ident: {"dodge": {"plain": {"j1": 0.9, "j2": 0.9, "x": 0.9 if ident == "a" else 0.1}}}
             for ident in ("a", "b")}
    return {"method": "pgd", "params": {}, "protocol": {"n_identities": 2,
                                                         "judges": {j: {"thresholds": TH} for j in ("j1", "j2", "x")}},
            "psr": {"dodge": block}, "quality": {"dodge": {"face": {}, "photo": {}, "n": 4}}, "items": items,
            "clean": clean, "timing": {"seconds_per_face": 1.0}, "robustness": None, "purification": None}


def test_summary_row_stores_intervals_and_per_identity_rates() -> None:
    row = protection.summary_row("pgd", _fake_result(), {})
    mode = row["modes"]["dodge"]
    ids = mode["per_identity"]
    assert ids["protected"]["a"]["1e-2"] == pytest.approx(2.5 / 3)
    assert ids["protected"]["b"]["1e-2"] == pytest.approx(0.5 / 3)
    # balanced design: the mean over identities is the mean over judges
    assert sum(v["1e-2"] for v in ids["protected"].values()) / 2 == pytest.approx(mode["mean"]["1e-2"])
    assert ids["clean"]["a"]["1e-2"] == 0.0 and ids["clean"]["b"]["1e-2"] == pytest.approx(1 / 3)
    iv = rate_interval(0.5, 2)
    assert mode["mean_ci95"]["1e-2"] == pytest.approx([iv.low, iv.high])
    assert mode["clean_mean_ci95"]["1e-2"] == pytest.approx([0.0, rate_interval(0.0, 2).high])


def test_attack_off_controls_are_rows_whose_attack_stage_is_zero() -> None:
    from fluxguard.methods.fluxguard import FluxGuardConfig
    from fluxguard.methods.wdp import WDPConfig

    specs = protection.rows_spec({"steps": 10})
    assert specs["fluxguard-noattack"]["params"] == {"adam_steps": 0}
    assert specs["wdp-noattack"]["params"] == {"prot_steps": 0}
    assert protection.CONTROLS == {"fluxguard": "fluxguard-noattack", "wdp": "wdp-noattack"}
    FluxGuardConfig(adam_steps=0)  # accepted by the method configs (they reject negative counts only)
    WDPConfig(prot_steps=0)


def test_markdown_shows_controls_intervals_and_whose_note_it_is() -> None:
    report = json.loads((ROOT / "benchmarks/results/protection.json").read_text())
    measured = [r for r in report["rows"] if "modes" in r]
    # the shipped table: every row's mean PSR @1e-2 with its Wilson interval, and the clean control per mode
    md = protection.markdown(report)
    for r in measured:
        for mode, m in r["modes"].items():
            lo, hi = m["mean_ci95"]["1e-2"]
            assert f"| {r['row']} | {mode} |" in md
            assert f"{100 * m['mean']['1e-2']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in md
    assert md.count("| clean (unprotected) | dodge |") >= 1
    # a generator row without its attack-off control says so instead of leaving the control out
    without = dict(report, rows=[r for r in measured if r["row"] != "fluxguard-noattack"])
    assert "| fluxguard-noattack (control: attack off) | dodge | not measured in this file |" in \
        protection.markdown(without)
    # a run's note is printed once, naming the rows of that run only
    planted = dict(report, rows=[dict(r, notes=["purification check not run"]) if r["row"] == "pgd" else
                                 dict(r, notes=[]) for r in measured])
    note = next(line for line in protection.markdown(planted).splitlines() if "purification check not run" in line)
    assert note == "- pgd: purification check not run"
