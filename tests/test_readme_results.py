"""README.md's benchmark figures are what the results files say (``scripts/render_readme.py --check``), and the check
fails when either side changes alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("README.md", "benchmarks/results", "docs/images", "src/fluxguard/recognition/thresholds.json")



render_readme = load_script("scripts/render_readme.py", "render_readme")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of README.md and the files it is rendered from (the lite weights folder is linked, not copied)."""
    for rel in SOURCES:
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.png", "*.jpg"))
        else:
            shutil.copy(src, dst)
    lite = tmp_path / "src/fluxguard/weights/lite"
    lite.parent.mkdir(parents=True, exist_ok=True)
    lite.symlink_to(ROOT / "src/fluxguard/weights/lite", target_is_directory=True)
    return tmp_path


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


def _row(report: dict, name: str) -> dict:
    return next(r for r in report["rows"] if r["row"] == name)


def test_readme_matches_the_results_files(capsys) -> None:
    rc = render_readme.main(["--check"])
    assert rc == 0, capsys.readouterr().out


def test_a_changed_result_fails_the_check(repo: Path, capsys) -> None:
    assert render_readme.main(["--check", "--root", str(repo)]) == 0

    def edit(report: dict) -> None:
        _row(report, "fluxguard")["modes"]["dodge"]["mean"]["1e-1"] = 0.5

    _edit_json(repo / "benchmarks/results/protection.json", edit)
    assert render_readme.main(["--check", "--root", str(repo)]) == 1
    diff = capsys.readouterr().out
    assert "-| fluxguard, lite (default) | dodge | 6 | 93.1" in diff
    assert "+| fluxguard, lite (default) | dodge | 6 | 50.0" in diff
    # the default mode rewrites README.md, after which the check passes
    assert render_readme.main(["--root", str(repo)]) == 0
    assert render_readme.main(["--check", "--root", str(repo)]) == 0


def test_a_hand_edited_readme_figure_fails_the_check(repo: Path, capsys) -> None:
    readme = repo / "README.md"
    text = readme.read_text()
    assert "PSNR to the original: <!-- f:example.psnr -->40.8<!-- /f --> dB" in text
    readme.write_text(text.replace("<!-- f:example.psnr -->40.8<!-- /f -->", "<!-- f:example.psnr -->41.8<!-- /f -->"))
    assert render_readme.main(["--check", "--root", str(repo)]) == 1
    assert "41.8" in capsys.readouterr().out
    # a table cell too
    readme.write_text(text.replace("| mobileface | 1.000 | 0.577 | 0.344 | **yes** |",
                                   "| mobileface | 1.000 | 0.577 | 0.320 | **yes** |"))
    assert render_readme.main(["--check", "--root", str(repo)]) == 1


@pytest.mark.parametrize(("text", "message"), [
    ("x <!-- f:nope -->1<!-- /f -->\n", "unknown figure 'nope'"),
    ("x <!-- f:example.psnr -->1\n", "without <!-- /f -->"),
    ("<!-- f:example.psnr -->1<!-- /f -->\n", "starts with an inline figure marker"),
    ("<!-- results:example -->\n| a |\n", "not closed"),
    ("<!-- results:nope -->\n<!-- /results:nope -->\n", "unknown block"),
])
def test_structural_errors_are_reported(repo: Path, text: str, message: str, capsys) -> None:
    (repo / "README.md").write_text(text)
    assert render_readme.main(["--check", "--root", str(repo)]) == 2
    assert message in capsys.readouterr().err


def test_controls_are_shown_when_measured_and_labelled_when_not(repo: Path) -> None:
    results = render_readme.Results(repo)
    table = render_readme.BLOCKS["protection"](results)
    assert table.count("control: fluxguard, attack off (reconstruction only)") == 2
    assert table.count(render_readme.NOT_MEASURED) == 4  # two PSR cells per mode
    assert "| control: clean photo (unprotected) | dodge | 6 | 8.3 [0.9, 48.3] | 25.0 [6.0, 63.5] |" in table

    def add_control(report: dict) -> None:
        row = json.loads(json.dumps(_row(report, "fluxguard")))
        row["row"], row["params"]["adam_steps"] = "fluxguard-noattack", 0
        row["modes"]["dodge"]["mean"]["1e-2"] = 0.3
        report["rows"].append(row)

    _edit_json(repo / "benchmarks/results/protection.json", add_control)
    table = render_readme.BLOCKS["protection"](render_readme.Results(repo))
    assert render_readme.NOT_MEASURED not in table
    line = next(x for x in table.splitlines() if x.startswith("| control: fluxguard") and "| dodge |" in x)
    assert "| 30.0 [" in line
    assert "fluxguard-noattack" not in table  # a control is a control row, not a method row


def test_a_claim_is_a_win_only_when_the_intervals_say_so(repo: Path) -> None:
    text = render_readme.FIGURES["matched12.comparison"](render_readme.Results(repo))
    assert text.endswith("every difference is within noise on 12 identities (the 95 % intervals overlap)")

    def more_identities(report: dict) -> None:
        for r in report["rows"]:
            r["n_identities"] = 400

    _edit_json(repo / "benchmarks/results/protection_matched12.json", more_identities)
    text = render_readme.FIGURES["matched12.comparison"](render_readme.Results(repo))
    # at 400 identities three gaps are apart; impersonation @1e-1 (59.7 against 54.5) still is not
    assert text.endswith(": Flux-Guard is ahead for dodging @1e-1, dodging @1e-2, impersonation @1e-2 (95 % intervals "
                         "apart); the other differences are within noise")
