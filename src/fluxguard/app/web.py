"""The web UI (Gradio): upload photos, pick a method, see before/after and what FR models say, download the result.

Started by ``fluxguard serve`` (bound to 127.0.0.1 unless told otherwise). The page itself loads nothing from the
internet (system fonts, no analytics), so it works offline and tells no third party that someone protected a photo.

All the work is done by :class:`WebService`, which holds no Gradio state and is tested directly; :func:`build_app`
only lays the components out and wires them to it. The UI does not know any method: it lists the registry, shows the
method's presets as strengths, and offers a text edit only to methods with an ``edit_prompt`` parameter.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fluxguard.errors import ConfigError, FluxguardError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_FILE_MB = 25  # a 100 MP JPEG is ~40 MB; phone photos are 2-8 MB
DEFAULT_MAX_PIXELS = 40_000_000  # per photo, checked from the header before decoding (a bomb never gets decoded)
DEFAULT_MAX_PHOTOS = 8  # per request
KEEP_RESULTS_S = 3600  # protected files stay downloadable this long, then are deleted
TABLE_HEADERS = ["photo", "face", "FR model", "attacked", "before", "after", "threshold (FAR 1e-2)", "matches after"]

ProgressFn = Callable[[str, int, int], None]


@dataclass
class WebResult:
    """What one request produced: the first photo before/after, every saved file, a table row per face and model."""

    before: np.ndarray | None = None
    after: np.ndarray | None = None
    files: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    looks: list[str] = field(default_factory=list)  # per face: how visible the change is


class WebService:
    """Protects uploaded photos with cached :class:`~fluxguard.api.Protector` objects.

    Args:
        methods: methods the UI offers (default: every registered one).
        fr_models: attack ensemble (default: every shipped FR model).
        judges: FR models that report similarity (default: every shipped FR model).
        params: method parameters fixed by the server (``fluxguard serve --param``): ``name`` goes to every offered
            method that has it, ``method.name`` to that method only; one that no offered method has is an error.
        device: torch device.
        max_pixels: largest photo accepted (pixels).
        max_photos: most photos per request.
        workdir: where protected files are written (default: a new temporary folder, removed by :meth:`close`).
        cache_size: how many method set-ups (method, mode, strength, edit) stay loaded.
    """

    def __init__(
        self,
        *,
        methods: Sequence[str] | None = None,
        fr_models: Sequence[str] | None = None,
        judges: Sequence[str] | None = None,
        params: dict[str, Any] | None = None,
        device: str = "cpu",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_photos: int = DEFAULT_MAX_PHOTOS,
        workdir: str | Path | None = None,
        cache_size: int = 2,
    ) -> None:
        from fluxguard.api import DEFAULT_METHOD, resolve_device
        from fluxguard.methods import METHODS
        from fluxguard.recognition import FR_MODELS

        self.methods = list(methods) if methods else METHODS.names()
        for m in self.methods:
            METHODS[m]  # an unknown name fails here, listing the valid ones
        self.default_method = DEFAULT_METHOD if DEFAULT_METHOD in self.methods else self.methods[0]
        for name in [*(fr_models or []), *(judges or [])]:
            FR_MODELS[name]
        self.fr_models = list(fr_models) if fr_models else None
        self.judges = list(judges) if judges else None
        self.params = dict(params or {})
        for key in self.params:
            scope, _, name = key.rpartition(".")
            if scope and scope not in self.methods:
                raise ConfigError(f"parameter {key!r} is for method {scope!r}, which is not offered here "
                                  f"({', '.join(self.methods)})")
            if not any(name in METHODS[m].parameter_names() for m in ([scope] if scope else self.methods)):
                where = f"method {scope!r}" if scope else f"no offered method ({', '.join(self.methods)})"
                raise ConfigError(f"{where} has no parameter {name!r}" if scope else f"{where} has a parameter "
                                  f"{name!r}")
        self.device = resolve_device(device)
        self.max_pixels = max_pixels
        self.max_photos = max_photos
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fluxguard-web-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_size = cache_size
        # one protection at a time: a method object keeps per-run state, and two runs would share the same cores
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ method info
    def strengths(self, method: str) -> list[str]:
        from fluxguard.methods import METHODS

        return list(METHODS[method].presets)

    def supports_edit(self, method: str) -> bool:
        """Whether ``method`` takes a text edit here: it has an ``edit_prompt`` and a generator with text encoders
        (the built-in lite models have none)."""
        from fluxguard.generators.lite_files import is_lite
        from fluxguard.methods import METHODS

        cls = METHODS[method]
        if "edit_prompt" not in cls.parameter_names():
            return False
        model = self.method_params(method).get("model", getattr(cls.config_class(), "model", "lite"))
        return not is_lite(model)

    def method_params(self, method: str) -> dict[str, Any]:
        """The server's fixed parameters that apply to ``method``: ``name`` for every method that has it,
        ``method.name`` for that method only (and winning over ``name``)."""
        from fluxguard.methods import METHODS

        names = METHODS[method].parameter_names()
        out = {k: v for k, v in self.params.items() if "." not in k and k in names}
        out.update({k.rpartition(".")[2]: v for k, v in self.params.items() if k.rpartition(".")[0] == method})
        return out

    # ------------------------------------------------------------------------------------------------ protection
    def protector(self, method: str, mode: str, strength: str | None, edit: str | None) -> Any:
        """A loaded Protector for this set-up (kept in a small LRU cache: generators are slow to load)."""
        from fluxguard.api import Protector, method_params

        if method not in self.methods:
            raise ConfigError(f"method {method!r} is not offered here; choose one of {', '.join(self.methods)}")
        params = method_params(method, self.method_params(method), edit=edit or None, mode=mode)
        key = (method, mode, strength, tuple(sorted((k, repr(v)) for k, v in params.items())))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        p = Protector(method, mode=mode, fr_models=self.fr_models, judges=self.judges, strength=strength,
                      device=self.device, **params)
        self._cache[key] = p
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return p

    def protect_files(
        self,
        files: Sequence[str] | None,
        *,
        method: str,
        mode: str = "dodge",
        strength: str | None = None,
        edit: str | None = None,
        target: str | None = None,
        seed: int = 0,
        progress: ProgressFn | None = None,
    ) -> WebResult:
        """Protect every uploaded photo; a photo that fails is reported in ``messages`` and the others go on.

        Raises:
            FluxguardError: bad settings, or not one photo could be protected (the message says why, per file).
        """
        from fluxguard.batch import BatchJob, protect_one
        from fluxguard.io import load_image

        files = [f for f in (files or []) if f]
        if not files:
            raise ConfigError("upload a photo first")
        if len(files) > self.max_photos:
            raise ConfigError(f"{len(files)} photos uploaded; at most {self.max_photos} per run here "
                              "(use `fluxguard protect` for folders)")
        if mode == "impersonate" and not target:
            raise ConfigError("impersonation needs a target photo: upload the face to look like")
        if mode == "dodge" and target:
            target = None  # the target box stays filled when switching back to dodge; it is not used then
        if edit and not self.supports_edit(method):
            raise ConfigError(f"method {method!r} takes no text edit here (it needs a generator with text encoders, "
                              "e.g. `fluxguard serve --param fluxguard.model=black-forest-labs/FLUX.1-dev`); clear "
                              "the edit box")
        target_image = load_image(target, max_pixels=self.max_pixels) if target else None
        self._prune()
        out_dir = self.workdir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        result = WebResult()
        with self._lock:
            protector = self.protector(method, mode, strength, edit)
            # the batch core of `fluxguard protect`: same output names, formats, statuses, no metadata
            job = BatchJob(out=out_dir, seed=seed, target=target_image, max_pixels=self.max_pixels)
            claimed: dict[Path, Path] = {}
            for i, path in enumerate(files):
                name = Path(path).name
                entry = protect_one(protector, Path(path), job, _prefixed(progress, f"{name} ({i + 1}/{len(files)})"),
                                    claimed)
                if entry["status"] == "no_face":
                    result.messages.append(f"{name}: no face found, nothing to protect")
                    continue
                if entry["status"] != "protected":
                    result.messages.append(f"{name}: {_strip_path(entry['message'], path)}")
                    continue
                result.files.append(entry["output"])
                if result.after is None:  # the first photo, before and as saved
                    result.before = load_image(path, max_pixels=self.max_pixels).rgb
                    result.after = load_image(entry["output"]).rgb
                for j, face in enumerate(entry["faces"]):
                    q = face.get("quality") or {}
                    if q.get("delta_e_mean") is not None:
                        outside = "unchanged" if q["changed_outside"] == 0 else f"{q['changed_outside']} px changed"
                        result.looks.append(
                            f"{name}, face {j + 1}: colour difference (CIEDE2000) {q['delta_e_mean']:.2f}, "
                            f"{100 * q['visible']:.0f} % of the face above its just-noticeable difference, colour "
                            f"shift {max(abs(q['dL']), abs(q['da']), abs(q['db'])):.2f}; outside the faces {outside}")
                    for model, s in face["similarity"].items():
                        th = s.get("threshold_far_1e-2")
                        result.rows.append([name, j + 1, model, "yes" if s["attacked"] else "no (held out)",
                                            s["before"], s["after"], None if th is None else round(th, 3),
                                            "" if th is None else ("yes" if s["after"] > th else "no")])
        if not result.files:
            raise FluxguardError("; ".join(result.messages) or "nothing was protected")
        return result

    # ------------------------------------------------------------------------------------------------ housekeeping
    def _prune(self, max_age_s: float = KEEP_RESULTS_S) -> None:
        """Delete result folders older than ``max_age_s`` (a long-running server must not fill the disk)."""
        now = time.time()
        for d in self.workdir.iterdir():
            try:
                if d.is_dir() and now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                continue

    def close(self) -> None:
        self._cache.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _prefixed(progress: ProgressFn | None, prefix: str) -> ProgressFn | None:
    if progress is None:
        return None

    def cb(stage: str, step: int, total: int) -> None:
        progress(f"{prefix}: {stage}", step, total)

    return cb


def _strip_path(message: str, path: str) -> str:
    """Error messages name the file; the server's upload path means nothing to the user."""
    return message.replace(f"{path}: ", "").replace(str(path), Path(path).name)


# ---------------------------------------------------------------------------------------------------------- layout
INTRO = """# fluxguard
Protect the faces in your photos from face recognition. Upload a photo, choose how, press **Protect**, and download
the protected copy (metadata such as GPS is removed). The table shows how similar face-recognition models find the
face before and after: *dodge* wants the similarity to your own face to fall below the threshold, *impersonate* wants
the similarity to the target to rise above it. Models marked *held out* were not attacked: they show how the
protection carries over to models it never saw. Protection lowers the chance of a match; it is no guarantee.
"""


def build_app(service: WebService, *, max_queue: int = 16) -> Any:
    """The Gradio Blocks of the UI (call ``.launch()`` on it, or use :func:`serve`).

    One protection runs at a time (it uses every core torch is given; a second would only slow both down).

    Args:
        service: does the work.
        max_queue: requests waiting beyond that are refused with a message (bounds memory under load).
    """
    import gradio as gr

    def on_method(method: str) -> tuple[Any, Any]:
        strengths = service.strengths(method)
        default = "medium" if "medium" in strengths else (strengths[0] if strengths else None)
        return (gr.update(choices=strengths, value=default, visible=bool(strengths)),
                gr.update(visible=service.supports_edit(method), value=""))

    def on_mode(mode: str) -> Any:
        return gr.update(visible=mode == "impersonate")

    def run(files, method, mode, strength, edit, target, seed, progress=gr.Progress()):  # noqa: B008 (Gradio API)
        def cb(stage: str, step: int, total: int) -> None:
            progress((step, total), desc=stage)

        try:
            res = service.protect_files(files, method=method, mode=mode, strength=strength or None,
                                        edit=(edit or "").strip() or None, target=target, seed=int(seed or 0),
                                        progress=cb)
        except FluxguardError as e:
            raise gr.Error(str(e), title="Could not protect") from None
        for m in res.messages:
            gr.Warning(m)
        status = f"Protected {len(res.files)} photo(s)." + (" " + " ".join(res.messages) if res.messages else "")
        if res.looks:
            status += "\n\nHow visible: " + "; ".join(res.looks) + "."
        return res.before, res.after, res.rows, res.files, status

    strengths = service.strengths(service.default_method)
    with gr.Blocks(title="fluxguard", analytics_enabled=False, delete_cache=(600, KEEP_RESULTS_S)) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label=f"Photo(s) (JPEG, PNG, WebP, HEIC, AVIF, TIFF, BMP; up to "
                                      f"{service.max_photos})", file_count="multiple",
                                file_types=["image", ".heic", ".heif", ".avif"], elem_id="photos")
                method = gr.Dropdown(service.methods, value=service.default_method, label="Method",
                                     elem_id="method")
                mode = gr.Radio(["dodge", "impersonate"], value="dodge", label="Mode", elem_id="mode",
                                info="dodge: FR must not recognise you; impersonate: FR should see the target")
                target = gr.File(label="Target face (impersonate)", file_types=["image", ".heic", ".heif", ".avif"],
                                 visible=False, elem_id="target")
                strength = gr.Radio(strengths, value="medium" if "medium" in strengths else None, label="Strength",
                                    visible=bool(strengths), elem_id="strength")
                edit = gr.Textbox(label="Edit prompt (optional)", placeholder="e.g. red lipstick",
                                  visible=service.supports_edit(service.default_method), elem_id="edit")
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                go = gr.Button("Protect", variant="primary", elem_id="protect")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    before = gr.Image(label="Before", type="numpy", interactive=False, format="png",
                                      elem_id="before")
                    after = gr.Image(label="After (protected)", type="numpy", interactive=False, format="png",
                                     elem_id="after")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Face-recognition similarity before → after",
                                     interactive=False, wrap=True, elem_id="similarity")
                download = gr.File(label="Download protected photo(s)", interactive=False, elem_id="download")
        method.change(on_method, method, [strength, edit])
        mode.change(on_mode, mode, target)
        go.click(run, [files, method, mode, strength, edit, target, seed], [before, after, table, download, status],
                 concurrency_limit=1, api_name="protect")
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo


def serve(
    service: WebService,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_file_mb: int = DEFAULT_MAX_FILE_MB,
    max_queue: int = 16,
    block: bool = True,
) -> Any:
    """Start the UI on ``host:port`` (loopback by default). Returns the Blocks when ``block`` is False."""
    import gradio as gr

    demo = build_app(service, max_queue=max_queue)
    # results are copied into Gradio's cache to be served; a work folder outside the temp folder must be allowed
    tmp = Path(tempfile.gettempdir()).resolve()
    extra_paths = None if service.workdir.resolve().is_relative_to(tmp) else [str(service.workdir)]
    # system fonts: the default theme fetches Google Fonts, which an offline machine cannot and a privacy tool
    # should not
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=host, server_port=port, max_file_size=f"{max_file_mb}mb", share=False,
                inbrowser=False, show_error=True, quiet=True, ssr_mode=False, prevent_thread_lock=not block,
                theme=theme, footer_links=[], enable_monitoring=False, allowed_paths=extra_paths,
                mcp_server=False)
    return demo
