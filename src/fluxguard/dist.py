"""Scale-out on Ray: protect photo libraries and FR template stores with the same code as the local batch.

Two jobs, both a Ray Data pipeline over a list of work items (photos, or template shards) mapped by a fixed pool
of actors; each actor builds its model(s) once (``make_protector()``), then takes ``batch_size`` items at a time:

- :func:`protect_photos`: every photo goes through :func:`fluxguard.batch.protect_one`, the function the local
  ``fluxguard protect`` loop calls, so outputs, names, resume (an existing output is skipped) and summary entries
  are the same. Outputs are written atomically and never clobbered, so a re-run after a killed worker or driver
  produces each output once. Ray restarts a dead actor and retries its batch; photos of that batch finished
  before the crash come back as ``skipped``.
- :func:`protect_template_store`: shards of FR templates (``.npy`` (N, D) arrays, or ``.safetensors`` files with
  the templates under ``key``) are protected by a :data:`TemplateProtectFn` (AdvFace's ``protect``, say) and
  written under the same names, with a JSON summary. Each shard has its own seed, so local and Ray runs agree.

Ray is the ``[dist]`` extra; nothing here imports it until a job starts. ``address``: ``"local"`` starts a Ray
instance on this machine, ``"auto"`` joins the cluster this machine is part of, anything else is a head address.
On a cluster, every node needs fluxguard installed (same version) and the input and output folders mounted at the
same paths (a shared file system).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fluxguard.errors import ConfigError, FluxguardError, MissingDependencyError

if TYPE_CHECKING:
    import torch

    from fluxguard.batch import BatchJob

log = logging.getLogger(__name__)

LOCAL = "local"
TEMPLATE_EXTS = (".npy", ".safetensors")
TEMPLATE_SUMMARY_NAME = "fluxguard-templates-summary.json"

# (templates (N, D) float32, generator) -> protected templates (N, D); AdvFace(...).protect has this signature.
TemplateProtectFn = Callable[[np.ndarray, "torch.Generator"], np.ndarray]


def _ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MissingDependencyError("ray[data]", "dist", "running on Ray (--ray)") from None
    return ray


def connect(address: str = LOCAL, *, num_cpus: int | None = None) -> Any:
    """Join a Ray cluster, or start one on this machine; a no-op when this process is already connected.

    Args:
        address: ``"local"``, ``"auto"``, or a head address (``host:6379``, ``ray://host:10001``).
        num_cpus: CPUs of a local instance (default: all of this machine's).

    Returns:
        The ``ray`` module.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray
    if address == LOCAL:
        return start_local(num_cpus)
    ray.init(address=address, logging_level=logging.WARNING)
    return ray


def start_local(num_cpus: int | None = None, *, paths: Sequence[str | os.PathLike[str]] = (),
                env: dict[str, str] | None = None, system_config: dict[str, Any] | None = None,
                attempts: int = 3) -> Any:
    """Start Ray on this machine; workers import fluxguard from where this process found it (a checkout works).

    Args:
        num_cpus: CPUs Ray may use (default: all).
        paths: more folders for the workers' ``PYTHONPATH``.
        env: more environment variables of the workers.
        system_config: Ray's ``_system_config`` (e.g. ``{"worker_niceness": 0}``).
        attempts: tries; on a busy machine the raylet can give up waiting for its agents (ray-project/ray#65983).
    """
    ray = _ray()
    src = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(str(p) for p in (src, *paths, os.environ.get("PYTHONPATH", "")) if p)
    kw: dict[str, Any] = {"_system_config": system_config} if system_config else {}
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONPATH": path, **(env or {})}}, **kw)
            return ray
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its node does not come up
            ray.shutdown()
            if attempt == attempts:
                raise FluxguardError(f"could not start a local Ray ({e}); see /tmp/ray/session_latest/logs") from e
            log.warning("starting Ray failed (%s); trying again", e)
    raise AssertionError("unreachable")


def _pool_size(ray: Any, workers: int | None, num_cpus: float, num_gpus: float) -> int:
    if workers is not None:
        return workers
    res = ray.cluster_resources()
    if num_gpus:
        return max(1, int(res.get("GPU", 0) // num_gpus))
    return max(1, int(res.get("CPU", 1) // num_cpus))


def worker_gpus(ray: Any, device: str) -> float:
    """GPUs per worker for a ``--device``: one for ``cuda``/``cuda:N`` (the cluster must have GPUs), else none."""
    if not str(device).startswith("cuda"):
        return 0.0
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError(f"--device {device} asked for, but the Ray cluster has no GPU; use --device cpu")
    return 1.0


def _map(items: list[dict[str, Any]], worker: type, ctor: dict[str, Any], *, workers: int, num_cpus: float,
         num_gpus: float, batch_size: int) -> Iterator[dict[str, Any]]:
    """Stream ``worker(batch)`` rows back as batches finish (a fixed pool of ``workers`` actors)."""
    import ray.data

    have = ray.cluster_resources()
    for name, need in (("CPU", num_cpus), ("GPU", num_gpus)):
        if need and have.get(name, 0) < need:  # Ray would wait for such a worker forever
            raise ConfigError(f"each worker asks for {need:g} {name}(s) but the Ray cluster has "
                              f"{have.get(name, 0):g}")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the caller shows its own progress
    blocks = max(1, math.ceil(len(items) / batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(worker, fn_constructor_kwargs=ctor, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=num_cpus,
                        num_gpus=num_gpus or None)
    yield from ds.iter_rows()


def _raise_fatal(row: dict[str, Any]) -> None:
    if row.get("fatal"):
        # A worker could not build its models (bad parameters, missing weights): the same error as locally.
        raise FluxguardError(str(row["fatal"]))


def _batch_entries(paths: Any, fatal: str, handle: Callable[[Path], dict[str, Any]]) -> list[str]:
    """One JSON summary entry per path of a worker's batch ("{}" for all when the worker could not start)."""
    entries = []
    for src in paths:
        if fatal:
            entries.append("{}")
            continue
        try:
            entry = handle(Path(str(src)))
        except Exception as e:  # noqa: BLE001 - one bad photo or shard must not stop the library or store
            log.exception("%s: unexpected error", src)
            entry = {"input": str(src), "status": "failed", "message": f"{src}: {type(e).__name__}: {e}"}
        entries.append(json.dumps(entry))
    return entries


# -- photo libraries ---------------------------------------------------------------------------------------------
class _PhotoWorker:
    """A Ray actor: builds the protector once, then runs ``protect_one`` on each photo it is given."""

    def __init__(self, make_protector: Callable[[], Any], job: BatchJob, num_cpus: float) -> None:
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))  # one worker per CPU share, not all cores each
        self.job = job
        self.fatal = ""
        try:
            self.protector = make_protector()
            self.params = json.dumps(self.protector.params())
        except FluxguardError as e:
            self.fatal, self.params = str(e), "null"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from fluxguard.batch import protect_one

        entries = _batch_entries(batch["path"], self.fatal, lambda src: protect_one(self.protector, src, self.job))
        n = len(entries)
        return {"index": list(batch["index"]), "entry": entries, "params": [self.params] * n,
                "fatal": [self.fatal] * n}


def protect_photos(
    inputs: Sequence[Path],
    make_protector: Callable[[], Any],
    job: BatchJob,
    *,
    address: str = LOCAL,
    workers: int | None = None,
    num_cpus: float = 1.0,
    device: str = "cpu",
    num_gpus: float | None = None,
    batch_size: int = 1,
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Protect photos on Ray; yields ``(summary entry, protector params)`` per photo as photos finish.

    Args:
        inputs: photo files (:func:`fluxguard.batch.expand_inputs`); paths every worker can read.
        make_protector: builds a :class:`fluxguard.api.Protector` (picklable, e.g. ``functools.partial``); called
            once per worker.
        job: output folder, suffix, seed, ... shared by every photo.
        address: see :func:`connect`.
        workers: actors (default: the cluster's CPUs / ``num_cpus``, or its GPUs with ``device="cuda"``).
        num_cpus: CPUs per actor (its torch threads).
        device: ``cuda`` gives each actor one GPU.
        num_gpus: GPUs per actor instead (a fraction packs several actors on one GPU).
        batch_size: photos an actor takes at a time.

    Raises:
        MissingDependencyError: ray is not installed. FluxguardError: the workers cannot build the protector.
    """
    ray = connect(address)
    num_gpus = worker_gpus(ray, device) if num_gpus is None else num_gpus
    n_workers = min(_pool_size(ray, workers, num_cpus, num_gpus), max(1, len(inputs)))
    items = [{"index": i, "path": str(p)} for i, p in enumerate(inputs)]
    ctor = {"make_protector": make_protector, "job": job, "num_cpus": num_cpus}
    log.info("protecting %d photo(s) with %d Ray worker(s)", len(items), n_workers)
    for row in _map(items, _PhotoWorker, ctor, workers=n_workers, num_cpus=num_cpus, num_gpus=num_gpus,
                    batch_size=batch_size):
        _raise_fatal(row)
        yield json.loads(row["entry"]), json.loads(row["params"])


# -- template stores ---------------------------------------------------------------------------------------------
def list_shards(src: str | os.PathLike[str]) -> list[Path]:
    """Template shards of a folder (``*.npy``, ``*.safetensors``, sorted), or the one file given."""
    p = Path(src)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FluxguardError("template store not found", path=p)
    return sorted(f for f in p.iterdir() if f.suffix in TEMPLATE_EXTS and f.is_file() and not f.name.startswith("."))


def shard_seed(seed: int, name: str) -> int:
    """The seed of one shard: fixed by the run's seed and the shard's name, not by who runs it or when."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1, np.uint64)[0] >> 1)


def read_shard(path: Path, key: str = "embeddings") -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, str]]:
    """(templates (N, D) float32, other tensors, metadata) of a shard."""
    try:
        if path.suffix == ".npy":
            arr, extra, meta = np.load(path, allow_pickle=False), {}, {}
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
                meta = dict(f.metadata() or {})
            if key not in tensors and len(tensors) == 1:
                key = next(iter(tensors))
            if key not in tensors:
                raise FluxguardError(f"no tensor {key!r} (has {', '.join(sorted(tensors)) or 'none'})", path=path)
            arr = tensors.pop(key)
            extra = tensors
            meta["fluxguard_templates_key"] = key
    except (OSError, ValueError) as e:
        raise FluxguardError(f"cannot read template shard ({e})", path=path) from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise FluxguardError(f"templates must be a float (N, D) array, got {arr.dtype} {arr.shape}", path=path)
    return arr.astype(np.float32, copy=False), extra, meta


def write_shard(path: Path, templates: np.ndarray, extra: dict[str, np.ndarray], meta: dict[str, str], *,
                overwrite: bool = False) -> Path:
    """Write a shard like the one read (atomic, no clobbering unless ``overwrite``)."""
    import io

    from fluxguard.io import write_bytes_atomic

    if path.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, templates, allow_pickle=False)
        data = buf.getvalue()
    else:
        from safetensors.numpy import save

        meta = dict(meta)
        key = meta.pop("fluxguard_templates_key", "embeddings")
        data = save({key: np.ascontiguousarray(templates), **extra}, metadata=meta or None)
    return write_bytes_atomic(path, data, overwrite=overwrite)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def protect_shard(protect: TemplateProtectFn, src: Path, out: Path, *, seed: int = 0, key: str = "embeddings",
                  chunk: int = 4096, overwrite: bool = False,
                  describe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Protect one shard into ``out/<same name>``: its summary entry (status protected, skipped or failed).

    Rows go through ``protect`` ``chunk`` at a time with one generator seeded by :func:`shard_seed`, so a shard's
    result depends on the seed, the shard's name and ``chunk``, not on which worker runs it.
    """
    import torch

    dest = out / src.name
    entry: dict[str, Any] = {"input": str(src), "output": str(dest)}
    try:
        if dest.exists() and not overwrite:
            entry["status"] = "skipped"
            return entry
        t0 = time.perf_counter()
        clean, extra, meta = read_shard(src, key)
        gen = torch.Generator().manual_seed(shard_seed(seed, src.name))
        parts = [np.asarray(protect(clean[i:i + chunk], gen), np.float32) for i in range(0, len(clean), chunk)]
        prot = np.concatenate(parts) if parts else clean.copy()
        if prot.shape != clean.shape:
            raise FluxguardError(f"protection changed the shape {clean.shape} -> {prot.shape}", path=src)
        if describe and src.suffix == ".safetensors":
            meta["fluxguard_protection"] = json.dumps(describe)
        write_shard(dest, prot, extra, meta, overwrite=overwrite)
        cos = _cosine(clean, prot)
        entry.update(status="protected", count=len(clean), dim=int(clean.shape[1]),
                     cosine_min=round(float(cos.min(initial=1.0)), 4),
                     cosine_mean=round(float(cos.mean()) if len(cos) else 1.0, 4),
                     seconds=round(time.perf_counter() - t0, 3))
    except FluxguardError as e:
        entry.update(status="failed", message=str(e))
    return entry


class _TemplateWorker:
    """A Ray actor: builds the template protector once, then protects whole shards."""

    def __init__(self, make_protect: Callable[[], TemplateProtectFn], out: Path, options: dict[str, Any],
                 num_cpus: float) -> None:
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))
        self.out, self.options, self.fatal = out, options, ""
        try:
            self.protect = make_protect()
        except FluxguardError as e:
            self.fatal = str(e)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        entries = _batch_entries(batch["path"], self.fatal,
                                 lambda src: protect_shard(self.protect, src, self.out, **self.options))
        return {"index": list(batch["index"]), "entry": entries, "fatal": [self.fatal] * len(entries)}


def protect_template_store(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    make_protect: Callable[[], TemplateProtectFn],
    *,
    ray: str | None = None,
    workers: int | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    seed: int = 0,
    key: str = "embeddings",
    chunk: int = 4096,
    overwrite: bool = False,
    describe: dict[str, Any] | None = None,
    summary: str | os.PathLike[str] | None = None,
    on_entry: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Protect every shard of a template store into ``out``; resumable, with a JSON summary.

    Args:
        src: a folder of shards, or one shard.
        out: output folder (same shard names).
        make_protect: builds the :data:`TemplateProtectFn` (e.g. ``lambda: AdvFace(model, config).protect``);
            picklable; called once per worker.
        ray: ``None`` runs here, in this process; otherwise a Ray address (see :func:`connect`).
        workers, num_cpus, num_gpus: the Ray actor pool (default workers: cluster CPUs / ``num_cpus``).
        seed, key, chunk, overwrite, describe: see :func:`protect_shard`.
        summary: the summary file (default ``out/fluxguard-templates-summary.json``), rewritten after every shard.
        on_entry: called with each shard's entry as it finishes (progress).

    Returns:
        The summary: ``shards`` (entries in shard order), ``counts``, ``templates`` (rows protected in this run).
    """
    from fluxguard.batch import write_summary

    shards = list_shards(src)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = Path(summary) if summary is not None else out_dir / TEMPLATE_SUMMARY_NAME
    options = {"seed": seed, "key": key, "chunk": chunk, "overwrite": overwrite, "describe": describe}
    record: dict[str, Any] = {"job": "templates", "source": str(src), "protection": describe, "seed": seed,
                              "chunk": chunk, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "shards": []}
    counts = {"protected": 0, "skipped": 0, "failed": 0}

    def entries() -> Iterator[dict[str, Any]]:
        if ray is None:
            fn = make_protect()
            for s in shards:
                yield protect_shard(fn, s, out_dir, **options)
            return
        r = connect(ray)
        n = min(_pool_size(r, workers, num_cpus, num_gpus), max(1, len(shards)))
        items = [{"index": i, "path": str(s)} for i, s in enumerate(shards)]
        ctor = {"make_protect": make_protect, "out": out_dir, "options": options, "num_cpus": num_cpus}
        for row in _map(items, _TemplateWorker, ctor, workers=n, num_cpus=num_cpus, num_gpus=num_gpus,
                        batch_size=1):
            _raise_fatal(row)
            yield json.loads(row["entry"])

    for entry in entries():
        counts[entry["status"]] += 1
        record["shards"].append(entry)
        record["counts"] = counts
        write_summary(summary_path, record)
        if on_entry is not None:
            on_entry(entry)
    order = {str(s): i for i, s in enumerate(shards)}
    record["shards"].sort(key=lambda e: order[e["input"]])
    record["counts"] = counts
    record["templates"] = sum(e.get("count", 0) for e in record["shards"] if e["status"] == "protected")
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_summary(summary_path, record)
    return record
