"""``fluxguard serve``: the web UI (Gradio), on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import typer
from rich.markup import escape

from fluxguard.cli._app import app
from fluxguard.cli._common import console, friendly_errors, split_names


@app.command(
    epilog="Examples:\n\n"
    "  fluxguard serve                                # http://127.0.0.1:7860\n\n"
    "  fluxguard serve --port 8080 --methods pgd,fluxguard\n\n"
    "  fluxguard serve --device cuda --param fluxguard.model=black-forest-labs/FLUX.1-dev   # text edits\n\n"
    "  fluxguard serve --host 0.0.0.0                 # reachable from your network: anyone there can use it",
)
@friendly_errors
def serve(
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (loopback by default)."),
    methods: str | None = typer.Option(None, "--methods", help="Methods offered, comma-separated "
                                       "(default: all)."),
    fr_models: str | None = typer.Option(None, "--fr-models", help="Attack ensemble, comma-separated "
                                         "(default: every shipped FR model)."),
    judges: str | None = typer.Option(None, "--judges", help="FR models that report similarity, comma-separated "
                                      "(default: every shipped FR model)."),
    param: list[str] = typer.Option([], "--param", "-p", help="Method parameter key=value fixed for every "
                                     "request (repeatable): key for every method that has it, method.key for one "
                                     "(e.g. fluxguard.model=black-forest-labs/FLUX.1-dev)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps, auto."),
    max_file_mb: int = typer.Option(25, "--max-file-mb", min=1, help="Largest upload accepted (MB)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Largest photo accepted (pixels)."),
    max_photos: int = typer.Option(8, "--max-photos", min=1, help="Most photos per request."),
    max_queue: int = typer.Option(16, "--max-queue", min=1, help="Requests that may wait; more are refused."),
) -> None:
    """Start the web UI: upload a photo, protect it, compare before/after, download the result."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        from fluxguard.errors import MissingDependencyError

        raise MissingDependencyError("gradio", "web", "the web UI") from None
    from fluxguard.app import web
    from fluxguard.cli.protect import parse_params

    service = web.WebService(methods=split_names(methods), fr_models=split_names(fr_models),
                             judges=split_names(judges), params=parse_params(param), device=device,
                             max_pixels=max_pixels, max_photos=max_photos)
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {escape(host)}: anyone who can reach this machine can upload "
                      "photos and use its CPU/GPU")
    console.print(escape(f"fluxguard web UI on http://{'[' + host + ']' if ':' in host else host}:{port} "
                         "(Ctrl+C to stop)"))
    try:
        web.serve(service, host=host, port=port, max_file_mb=max_file_mb, max_queue=max_queue)
    finally:
        service.close()
