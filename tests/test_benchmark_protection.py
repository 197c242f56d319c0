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
    md = protection.markdown(report)
    assert "| fluxguard-noattack (control: attack off) | dodge | not measured in this file |" in md
    assert "| pgd | dodge | 100.0 | 16.7 | 66.7 | 66.7 | 100.0 | 37.5 | 36.1 (8.3) | 64.6 (25.0) | 81.2 (27.8) | " \
           "64.6 [28.5, 89.3] |" in md
    # the purification note came from the PGD runs; the Flux-Guard rows have a purification table
    note = next(line for line in md.splitlines() if "purification check not run" in line)
    assert note.startswith("- pgd, pgd-plain, pgd-matched: purification check not run")
