"""Batches of photos: expand inputs, protect each photo into an output folder, resume, and keep a JSON summary.

The local ``fluxguard protect`` loop and every Ray worker (:mod:`fluxguard.dist`) run the same
:func:`protect_one` per photo, so outputs, names and summary entries are the same wherever a photo was protected.
:class:`BatchSummary` owns the summary file: one per output folder, rewritten atomically after every photo, and
kept across re-runs (a resumed run says which photos it protected and which an earlier run did).

Statuses of a photo and the batch's exit code (the most serious status present wins, in this order):

- ``failed`` (exit 4): reading worked but protecting or writing did not (an output name clash, an error inside
  the method);
- ``unreadable`` (exit 2): the photo cannot be read (missing, not an image, truncated, too many pixels);
- ``no_face`` (exit 3): nothing to protect;
- ``protected`` (in this run) and ``skipped`` (its output exists, from an earlier run) (exit 0).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxguard.errors import ConfigError, FluxguardError, ImageError, NoFaceError
from fluxguard.io import DEFAULT_MAX_PIXELS, READ_EXTENSIONS, LoadedImage, load_image, output_path, write_bytes_atomic

SUMMARY_NAME = "fluxguard-summary.json"
STATUSES = ("protected", "skipped", "no_face", "unreadable", "failed")

EXIT_OK = 0  # every photo protected (now or by an earlier run)
EXIT_UNREADABLE = 2  # some photos could not be read (and none failed)
EXIT_NO_FACE = 3  # some photos had no face (and none failed or was unreadable)
EXIT_SOME_FAILED = 4  # at least one photo failed while being protected or written


def expand_inputs(items: Sequence[str], recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Files as given, image files of folders, and glob patterns (quoted on the shell), in a stable order.

    Files found in folders or by patterns under ``exclude`` (the output folder) are left out, so a re-run over a
    folder that holds its own output never protects the protected copies again.

    Raises:
        ConfigError: a glob pattern matches nothing.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude is not None else None

    def add(p: Path, found: bool = True) -> None:
        r = p.resolve()
        if found and skip is not None and r.is_relative_to(skip):
            return
        if r not in seen:
            seen.add(r)
            out.append(p)

    for item in items:
        p = Path(item)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            for f in sorted(it):
                if f.is_file() and f.suffix.lower() in READ_EXTENSIONS and not f.name.startswith("."):
                    add(f)
        elif any(c in item for c in "*?[") and not p.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise ConfigError(f"no file matches {item!r}")
            for m in matches:
                if Path(m).is_file():
                    add(Path(m))
        else:
            add(p, found=False)  # a missing file is reported per photo (unreadable), not here
    return out


def output_subdir(src: Path, items: Sequence[str], recursive: bool) -> Path:
    """Where under the output folder ``src``'s result goes: with ``recursive``, its sub-folder inside the folder
    given (``holiday/day1/a.jpg`` -> ``OUT/day1/``), so equal names in sub-folders never meet."""
    if recursive:
        r = src.resolve()
        for item in items:
            d = Path(item)
            if d.is_dir() and r.is_relative_to(d.resolve()):
                return r.parent.relative_to(d.resolve())
    return Path()


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """``$FLUXGUARD_CACHE``, else ``$XDG_CACHE_HOME/fluxguard`` (default ``~/.cache/fluxguard``)."""
    root = os.environ.get("FLUXGUARD_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fluxguard"


def demo_photo() -> Path:
    """skimage's astronaut (Eileen Collins, NASA, public domain) as a PNG in the cache: the input of ``--demo``
    (kept out of the output folder, which holds outputs only)."""
    from skimage import data

    from fluxguard.io import encode_image

    p = cache_dir() / "demo" / "astronaut.png"
    if not p.exists():
        write_bytes_atomic(p, encode_image(data.astronaut(), "PNG"), overwrite=True)
    return p


@dataclass(frozen=True)
class BatchJob:
    """What every photo of a batch shares; picklable, so Ray workers get the same job."""

    out: Path
    suffix: str = "_protected"
    overwrite: bool = False
    quality: int | None = None
    seed: int = 0
    target: LoadedImage | None = None  # the identity to impersonate, decoded once
    max_pixels: int = DEFAULT_MAX_PIXELS
    items: tuple[str, ...] = ()  # the photos/folders as given (with ``recursive``, outputs keep their sub-folders)
    recursive: bool = False


def protect_one(protector: Any, src: Path, job: BatchJob, progress: Any = None,
                claimed: dict[Path, Path] | None = None) -> dict[str, Any]:
    """Protect one photo of a batch into ``job.out``: its summary entry (see the module doc for the statuses).

    ``protector`` is a :class:`fluxguard.api.Protector` (or anything with its ``protect``). ``claimed`` (output
    -> input, filled in here) catches two inputs with the same output name within one process.
    """
    entry: dict[str, Any] = {"input": str(src)}
    try:
        loaded = load_image(src, max_pixels=job.max_pixels)
    except ImageError as e:
        entry.update(status="unreadable", message=str(e))
        return entry
    try:
        dest = output_path(src, job.out / output_subdir(src, job.items, job.recursive), loaded.save_format,
                           job.suffix)
        entry["output"] = str(dest)
        if loaded.save_format != loaded.format:
            entry["note"] = f"{loaded.format} input written as {loaded.save_format}"
        if dest.resolve() == src.resolve():
            raise ImageError("the output would replace the input; choose another --out or --suffix", path=src)
        if claimed is not None:
            if dest.resolve() in claimed:
                raise ImageError(same_output_message(claimed[dest.resolve()], dest), path=src)
            claimed[dest.resolve()] = src
        if dest.exists() and not job.overwrite:
            entry["status"] = "skipped"  # finished by an earlier run (outputs are written atomically: it is whole)
        else:
            res = protector.protect(loaded, target=job.target, seed=job.seed, progress=progress)
            res.save(dest, overwrite=job.overwrite, quality=job.quality)
            entry.update(status="protected", faces=[f.to_dict() for f in res.faces],
                         timings={k: round(v, 3) for k, v in res.timings.items()})
    except NoFaceError as e:
        entry.update(status="no_face", message=str(e))
    except FluxguardError as e:
        entry.update(status="failed", message=str(e))
    return entry


def same_output_message(first: Path, dest: Path) -> str:
    return (f"has the same output name as {first} ({dest.name}); rename one, or give their common folder with "
            "--recursive")


def claim_output(entry: dict[str, Any], claimed: dict[Path, Path]) -> dict[str, Any]:
    """For entries that come back from Ray workers: the later of two photos with one output name fails, as in the
    local batch (where :func:`protect_one` checks ``claimed`` itself)."""
    if "output" not in entry or entry["status"] not in ("protected", "skipped"):
        return entry
    dest, src = Path(entry["output"]).resolve(), Path(entry["input"])
    if dest in claimed and claimed[dest] != src:
        return {"input": entry["input"], "output": entry["output"], "status": "failed",
                "message": str(ImageError(same_output_message(claimed[dest], dest), path=src))}
    claimed[dest] = src
    return entry


def batch_exit_code(counts: dict[str, int]) -> int:
    """The exit code of a batch from its status counts: failed (4) > unreadable (2) > no face (3) > 0."""
    if counts.get("failed"):
        return EXIT_SOME_FAILED
    if counts.get("unreadable"):
        return EXIT_UNREADABLE
    if counts.get("no_face"):
        return EXIT_NO_FACE
    return EXIT_OK


def protect_local(inputs: Sequence[Path], job: BatchJob, protector: Any, progress: Any = None
                  ) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """``(summary entry, protector params)`` per photo, in input order, in this process. (The same batch on Ray
    workers is :func:`fluxguard.dist.protect_photos`; its entries go through :func:`claim_output`.)"""
    claimed: dict[Path, Path] = {}  # output -> the input that writes it in this run
    for src in inputs:
        yield protect_one(protector, src, job, progress, claimed), protector.params()


def write_summary(path: Path, record: dict[str, Any]) -> None:
    """Write a summary atomically (a reader never sees half a file, even after ``kill -9``)."""
    write_bytes_atomic(path, json.dumps(record, indent=2).encode(), overwrite=True)


def now() -> str:
    """Local time to the millisecond: it also names a run, and two runs can start within one second."""
    return datetime.datetime.now().isoformat(timespec="milliseconds")


class BatchSummary:
    """The JSON summary of an output folder, kept across runs.

    ``photos`` lists this run's inputs in input order. An entry ``protected`` in this run carries ``run`` = this
    run's ``started``; a ``skipped`` one (done by an earlier run) keeps the earlier run's ``run``, faces and timings,
    so no row shows this run's seconds for work it did not do. ``runs`` lists every run into this summary
    (started, finished, method, mode, seed, threads, counts), oldest first.
    """

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        previous = _read_json(path)
        self.earlier_runs: list[dict[str, Any]] = list(previous.get("runs", []))
        if not self.earlier_runs and previous.get("started"):  # a summary written before runs were recorded
            self.earlier_runs = [{k: previous[k] for k in ("started", "finished", "method", "mode", "seed",
                                                           "counts") if k in previous}]
        done = ("protected", "skipped")
        self.previous = {e["output"]: {**e, "run": e.get("run", previous.get("started"))}
                         for e in previous.get("photos", []) if e.get("status") in done and "output" in e}
        self.counts = dict.fromkeys(STATUSES, 0)
        self.record: dict[str, Any] = {**settings, "params": None, "started": now(), "photos": [],
                                       "counts": self.counts}

    def add(self, entry: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record one photo's entry (filled in from the earlier run when skipped) and rewrite the file."""
        if entry["status"] == "protected":
            entry["run"] = self.record["started"]
        elif entry["status"] == "skipped":
            done = self.previous.get(entry.get("output", ""), {})
            entry.update({k: done[k] for k in ("run", "faces", "timings") if k in done})
        if params is not None:
            self.record["params"] = params
        self.counts[entry["status"]] += 1
        self.record["photos"].append(entry)
        self._write()
        return entry

    def finish(self, inputs: Sequence[Path]) -> dict[str, Any]:
        """Sort the entries into input order (Ray finishes out of order), stamp the end and write."""
        order = {str(p): i for i, p in enumerate(inputs)}
        self.record["photos"].sort(key=lambda e: order[e["input"]])
        self.record["finished"] = now()
        self._write()
        return self.record

    def _write(self) -> None:
        this_run = {k: self.record.get(k) for k in ("started", "finished", "method", "mode", "seed", "threads")}
        self.record["runs"] = [*self.earlier_runs, {**this_run, "counts": dict(self.counts)}]
        write_summary(self.path, self.record)  # after every photo: a killed run loses nothing it reported


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
