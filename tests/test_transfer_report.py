"""The transfer report says how its judges relate to the attack (black-box, or the white-box ceiling)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _transfer():
    spec = importlib.util.spec_from_file_location("bench_transfer", ROOT / "benchmarks" / "transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_judges_are_named_by_how_they_relate_to_the_attack() -> None:
    words = _transfer().judge_words
    attack = ["dlib-resnet", "faceres"]
    assert words({"attack_models": attack, "judges": {"faceres-deep": {}}}) == "judges never attacked"
    assert "white-box" in words({"attack_models": attack, "judges": {"faceres": {}, "dlib-resnet": {}}})
    mixed = words({"attack_models": attack, "judges": {"faceres": {}, "faceres-deep": {}}})
    assert mixed == "judges (attacked: faceres)"


def test_the_white_box_ceiling_file_judges_with_the_attacked_models() -> None:
    import json

    report = json.loads((ROOT / "benchmarks" / "results" / "transfer_whitebox.json").read_text())
    assert set(report["protocol"]["judges"]) == set(report["protocol"]["attack_models"])
    assert "white-box" in (ROOT / "benchmarks" / "results" / "transfer_whitebox.md").read_text()


def test_the_table_shows_each_judge_beside_its_clean_control() -> None:
    import json

    report = json.loads((ROOT / "benchmarks" / "results" / "transfer_whitebox.json").read_text())
    md = _transfer().markdown(report)
    row = next(line for line in md.splitlines() if line.startswith("| pgd |"))
    judges = report["rows"]["pgd"]["modes"]["dodge"]["judges"]
    for name, v in judges.items():  # "name PSR / clean" for each judge, at FAR 1e-2
        assert f"{name} {v['1e-2']['protected']:.0f} / {v['1e-2']['clean']:.0f}" in row
