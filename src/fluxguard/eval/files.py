"""The evaluation folder's files: content hashes, atomic writes, strict JSON, the ``items/`` layout, PNG round trips.

Shared by the runner (:mod:`fluxguard.eval.runner` and its parts) and the reports (:mod:`fluxguard.eval.report`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def sha1_file(path: Path) -> str:
    return sha1_bytes(Path(path).read_bytes())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (replacing it) so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def clean_json(obj: Any) -> Any:
    """NaN / inf -> None, numpy scalars -> Python (results.json must be strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(clean_json(obj), indent=1, allow_nan=False).encode())


def safe_name(name: str) -> str:
    """``name`` as a file name: anything but letters, digits and ``-_.`` becomes ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def item_path(out_dir: Path, mode: str, zoo_tag: str, identity: str, suffix: str) -> Path:
    """``<out_dir>/items/<mode>/<zoo_tag>/<identity><suffix>``: a protected photo (``.png``) or its record
    (``.json``)."""
    return Path(out_dir) / "items" / mode / zoo_tag / f"{safe_name(identity)}{suffix}"


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def read_rgb(path: Path) -> np.ndarray:
    from fluxguard.io import load_image

    return load_image(path).rgb


def png_bytes(rgb: np.ndarray) -> bytes:
    from fluxguard.io import encode_image

    return encode_image(rgb, "PNG")
