"""What a new user sees first: ``fluxguard protect --demo`` right after ``pip install torch==2.13.0 -e .``, i.e.
without the extras (no ``accelerate``), prints its note and result and no third-party warning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ``accelerate`` made unimportable, as in an install without the [flux] extra (diffusers then warns on every load)
WITHOUT_ACCELERATE = ("import sys; sys.modules['accelerate'] = None; sys.argv[0] = 'fluxguard'; "
                      "from fluxguard.cli import main; main()")


def test_demo_without_accelerate_prints_no_third_party_warning(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FLUXGUARD_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "default"}
    # Flux-Guard on the lite models (diffusers loads them; the default method loads none), one Adam step.
    cmd = [sys.executable, "-c", WITHOUT_ACCELERATE, "protect", "--demo", "--method", "fluxguard", "--out",
           str(tmp_path / "out"), "--param", "adam_steps=1", "--json"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["protected"] == 1
    err = done.stderr
    assert "note: Flux-Guard runs on the built-in lite models" in " ".join(err.split())  # our own note is shown
    assert "accelerate" not in err and "warn" not in err.lower(), err
