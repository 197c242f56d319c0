"""Every example command of README.md and of the CLI help texts runs, in order, in a folder holding the photos
the examples name (small copies of the package faces).

Commands that need what a test machine does not have are recognised and skipped with the reason: installs and
logins (network), a GPU or a hub model, a Ray cluster, a server that runs until stopped, weights the user supplies,
the real face photos, or runs that take many minutes.

``FLUXGUARD_EXAMPLES=fast`` (the default) adds cheap method settings to ``fluxguard protect`` commands that do not
set them (one Adam step for fluxguard, two steps for pgd); ``FLUXGUARD_EXAMPLES=full`` runs every command exactly
as written (several minutes on two cores).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fluxguard.cli import app
from fluxguard.data import package_faces
from fluxguard.defaults import DEFAULT_METHOD

REPO = Path(__file__).resolve().parents[1]
FAST = os.environ.get("FLUXGUARD_EXAMPLES", "fast") != "full"
CHEAP = {"fluxguard": ["--param", "adam_steps=1"], "pgd": ["--param", "steps=2"]}
# fluxguard check answers with its exit code: 0 no match, 5 still a match
ACCEPTED_EXIT = {"check": (0, 5)}


def skip_reason(cmd: str) -> str | None:
    import torch

    words = shlex.split(cmd)
    while words and "=" in words[0]:  # leading environment assignments (VAR=value command ...)
        words = words[1:]
    if not words or words[0] != "fluxguard":
        if words[:3] == ["python3", "-m", "venv"]:
            return "creates a virtual environment (the tests already run in one)"
        if words and words[0] in ("pip", "hf"):
            return "installs packages or logs in (network)"
        if words and words[0] in ("pytest", ".ci/run"):
            return "runs the test suite itself"
        if words[:2] == ["python", "scripts/readme_figures.py"]:
            return "rewrites the README's figures in docs/images"
        return f"not a fluxguard command: {words[0] if words else cmd!r}"
    if ("--device cuda" in cmd or "/FLUX" in cmd or "stabilityai/" in cmd) and not torch.cuda.is_available():
        return "needs a CUDA GPU and a model from the Hugging Face hub"
    if words[1] == "serve":
        return "starts the web UI, which runs until stopped (tests/test_web.py serves it)"
    if "--ray" in words:
        return "starts or joins a Ray cluster (tests/test_dist.py runs protect and features protect with --ray local)"
    if "--lpips" in words or "--fid" in words:
        return "needs LPIPS / Inception weights files that the user supplies"
    if "../shared/faces" in cmd:
        return ("evaluates on the real face photos for many minutes (tests/test_eval_runner.py and "
                "tests/test_advface.py cover the evaluations)")
    if "DIR" in words:
        return "a placeholder (DIR), not a runnable command"
    return None


def readme_commands() -> list[str]:
    """Commands of the README's bash blocks (continuation lines joined, comments and [optional] parts removed),
    and inline `fluxguard ...` spans that have arguments."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            line = re.sub(r"\s\[[^\]]*\]", "", line)  # optional arguments shown in brackets
            for part in line.split(" && "):  # the install line: venv, pip install, then the first command
                part = re.sub(r"^\.venv/bin/", "", part.strip()).replace("python -m pytest", "pytest")
                part = " ".join(part.split())
                if part and part not in out:
                    out.append(part)
    for span in re.findall(r"`(fluxguard [^`]+)`", text):
        if len(span.split()) > 2 and span not in out:
            out.append(span)
    return out


def help_commands() -> list[str]:
    """``fluxguard ...`` lines of every help text and epilog (as ``--help`` prints them)."""
    import typer

    def walk(cmd):
        yield cmd
        for sub in getattr(cmd, "commands", {}).values():
            yield from walk(sub)

    out = []
    for cmd in walk(typer.main.get_command(app)):
        for text in (cmd.help, cmd.epilog):
            for m in re.finditer(r"(?:^|\s)(fluxguard (?:[a-z]+ )[^\n#]*?)\s*(?:#.*)?$", text or "", re.M):
                line = " ".join(m.group(1).split())
                if line not in out:
                    out.append(line)
    return out


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    faces = {}
    for f in package_faces():
        im = Image.fromarray(f.rgb)
        faces[f.name] = np.asarray(im.resize((im.width // 2, im.height // 2), Image.LANCZOS))
    return faces


def make_inputs(d: Path, photos: dict[str, np.ndarray]) -> Path:
    """The photos the examples name: me (the astronaut), other photos of me, someone else (Grace Hopper)."""
    me, other = photos["astronaut"], photos["grace_hopper"]
    mirrored = np.ascontiguousarray(me[:, ::-1])
    for rel, rgb in {"me.jpg": me, "me2.jpg": mirrored, "me_2019.jpg": mirrored, "me_2021.jpg": mirrored,
                     "someone_else.jpg": other, "holiday/beach.jpg": mirrored, "holiday/day1/hat.jpg": other,
                     "photos/portrait.jpg": me}.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(d / rel, quality=95)
    return d


def prepare(cmd: list[str], d: Path) -> None:
    """What an example reads that an earlier example would have written: a protected photo, a template file."""
    if cmd[0] in ("check", "quality") and not (d / "protected" / "me_protected.jpg").exists():
        (d / "protected").mkdir(exist_ok=True)
        shutil.copy(d / "me.jpg", d / "protected" / "me_protected.jpg")
    if cmd[:2] == ["features", "protect"] and not (d / "templates.npz").exists():
        assert run(["features", "extract", "photos/", "--model", "mobileface", "--out", "templates.npz"])[0] == 0


def cheap(cmd: list[str]) -> list[str]:
    if not FAST or cmd[0] != "protect" or "--param" in cmd or "-p" in cmd:
        return cmd
    method = cmd[cmd.index("--method") + 1] if "--method" in cmd else DEFAULT_METHOD
    return [*cmd, *CHEAP.get(method, [])]


def run(argv: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, argv)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory, photos) -> dict[str, Path]:
    return {source: make_inputs(tmp_path_factory.mktemp(source), photos) for source in ("readme", "help")}


@pytest.mark.parametrize(("source", "command"), [("readme", c) for c in readme_commands()]
                         + [("help", c) for c in help_commands()])
def test_example_runs(source: str, command: str, workdirs, monkeypatch, tmp_path) -> None:
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(workdirs[source])  # examples run in order in one folder, as a reader would run them
    monkeypatch.setenv("FLUXGUARD_CACHE", str(tmp_path / "cache"))
    argv = shlex.split(command)[1:]
    prepare(argv, workdirs[source])
    code, text = run(cheap(argv))
    assert code in ACCEPTED_EXIT.get(argv[0], (0,)), f"{command}\n{text}"


def test_examples_are_found() -> None:
    readme, helps = readme_commands(), help_commands()
    assert "fluxguard protect --demo --out out/" in helps and "fluxguard protect --demo --out out/" in readme
    assert any(c.startswith("fluxguard check") for c in readme) and any(c.startswith("fluxguard faces") for c in helps)
    assert len(readme) >= 15 and len(helps) >= 15
