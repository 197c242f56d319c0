"""``fluxguard check``: the exit code tells scripts whether FR still matches, and model names are never cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fluxguard.cli import app
from fluxguard.cli._common import console
from fluxguard.cli.check import EXIT_MATCH, EXIT_NO_MATCH
from fluxguard.data import package_faces


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("check")
    faces = {f.name: Image.fromarray(f.rgb) for f in package_faces()}
    faces["astronaut"].save(d / "me.png")
    faces["astronaut"].transpose(Image.FLIP_LEFT_RIGHT).save(d / "me_mirrored.png")  # another photo of me
    faces["grace_hopper"].save(d / "someone_else.png")
    return {p.stem: p for p in d.iterdir()}


def check(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["check", *args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def test_exit_code_says_match_or_no_match_and_the_table_keeps_model_names(photos, monkeypatch) -> None:
    from fluxguard.recognition import shipped_models

    monkeypatch.setattr(console, "width", 80)
    code, text = check(str(photos["me"]), "--reference", str(photos["me_mirrored"]))
    assert code == EXIT_MATCH, text
    for name in shipped_models():  # whole names, e.g. mobilefacenet never shown as "mobileface…"
        assert any(line.split("│")[2].strip() == name for line in text.splitlines() if line.count("│") > 3), text
    assert "…" not in text

    code, text = check(str(photos["me"]), "--reference", str(photos["someone_else"]), "--json")
    rows = json.loads(text[text.index("["):])
    assert code == (EXIT_MATCH if any(r["match_far_1e-2"] for r in rows) else EXIT_NO_MATCH)
    assert code == EXIT_NO_MATCH, rows  # a stranger is not matched at FAR 1e-2 by any shipped model


def test_bad_far_is_an_argument_error(photos) -> None:
    code, text = check(str(photos["me"]), "--reference", str(photos["me_mirrored"]), "--far", "0.5")
    assert code == 1 and "--far must be one of" in text
