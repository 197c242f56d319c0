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
        _row(report, "pgd")["modes"]["dodge"]["mean"]["1e-1"] = 0.5

    _edit_json(repo / "benchmarks/results/protection.json", edit)
    assert render_readme.main(["--check", "--root", str(repo)]) == 1
    diff = capsys.readouterr().out
    assert any(line.startswith("+| pgd, medium | dodge |") and "| 50.0 [" in line for line in diff.splitlines())
    # the default mode rewrites README.md, after which the check passes
    assert render_readme.main(["--root", str(repo)]) == 0
    assert render_readme.main(["--check", "--root", str(repo)]) == 0


def test_a_hand_edited_readme_figure_fails_the_check(repo: Path, capsys) -> None:
    readme = repo / "README.md"
    text = readme.read_text()
    marker = "<!-- f:protection.identities -->"
    value = text.split(marker, 1)[1].split("<!-- /f -->", 1)[0]
    readme.write_text(text.replace(f"{marker}{value}<!-- /f -->", f"{marker}{int(value) + 1}<!-- /f -->"))
    assert render_readme.main(["--check", "--root", str(repo)]) == 1
    assert f"{marker}{int(value) + 1}" in capsys.readouterr().out
    # a table cell too
    line = next(x for x in text.splitlines() if x.startswith("| dlib-resnet | 1.000 |"))
    readme.write_text(text.replace(line, line.replace("| 1.000 |", "| 0.999 |", 1)))
    assert render_readme.main(["--check", "--root", str(repo)]) == 1


@pytest.mark.parametrize(("text", "message"), [
    ("x <!-- f:nope -->1<!-- /f -->\n", "unknown figure 'nope'"),
    ("x <!-- f:protection.identities -->1\n", "without <!-- /f -->"),
    ("<!-- f:protection.identities -->1<!-- /f -->\n", "starts with an inline figure marker"),
    ("<!-- results:example -->\n| a |\n", "not closed"),
    ("<!-- results:nope -->\n<!-- /results:nope -->\n", "unknown block"),
])
def test_structural_errors_are_reported(repo: Path, text: str, message: str, capsys) -> None:
    (repo / "README.md").write_text(text)
    assert render_readme.main(["--check", "--root", str(repo)]) == 2
    assert message in capsys.readouterr().err


def test_controls_are_shown_when_measured_and_labelled_when_not(repo: Path) -> None:
    table = render_readme.BLOCKS["protection"](render_readme.Results(repo))
    assert render_readme.NOT_MEASURED not in table
    assert table.count("control: fluxguard, attack off") == 2 and table.count("control: clean photo") == 2
    line = next(x for x in table.splitlines() if x.startswith("| control: fluxguard") and "| dodge |" in x)
    assert "| bit-exact |" in line  # with the attack off, residual composition gives the photo back

    def drop_control(report: dict) -> None:
        report["rows"] = [r for r in report["rows"] if r["row"] != "fluxguard-noattack"]

    _edit_json(repo / "benchmarks/results/protection.json", drop_control)
    table = render_readme.BLOCKS["protection"](render_readme.Results(repo))
    assert table.count(render_readme.NOT_MEASURED) == 4  # two PSR cells per mode
    # a control row, not a method row; the note under the table says how to measure it
    assert not any(x.startswith("| fluxguard-noattack") for x in table.splitlines())
    assert "--rows fluxguard-noattack --append` adds the missing fluxguard-noattack control" in table


def test_a_claim_is_a_win_only_when_the_intervals_say_so(repo: Path) -> None:
    text = render_readme.FIGURES["transfer.pgd_vs_fluxguard"](render_readme.Results(repo))
    assert text.endswith(("(the 95 % intervals overlap)", "(the 95 % intervals do not overlap)",
                          "the other differences are within noise"))

    def more_identities(report: dict) -> None:
        for r in report["rows"].values():
            r["n_identities"] = 4000

    _edit_json(repo / "benchmarks/results/transfer.json", more_identities)
    text = render_readme.FIGURES["transfer.pgd_vs_fluxguard"](render_readme.Results(repo))
    assert "ahead" in text and "every difference is within noise" not in text
