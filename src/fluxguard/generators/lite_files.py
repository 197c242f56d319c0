"""Where the shipped lite weights live and how the model name ``"lite"`` resolves to them.

Kept apart from :mod:`fluxguard.generators.lite` (which loads the lite models through the backends) so that the
backends themselves can resolve ``"lite"`` without importing their own loader.
"""

from __future__ import annotations

from pathlib import Path

from fluxguard.errors import FluxguardError

LITE = "lite"
"""Model name of the shipped lite models, accepted wherever a model id or folder is."""

LITE_SIZE = 256
"""Side of the aligned portrait crop (px) the lite models were trained at."""


def lite_dir() -> Path:
    """The folder of the shipped lite weights (``fluxguard/weights/lite``)."""
    return Path(__file__).resolve().parent.parent / "weights" / "lite"


def resolve_model(model: str | Path) -> str:
    """``"lite"`` -> the shipped folder (checked); anything else unchanged."""
    if str(model) != LITE:
        return str(model)
    folder = lite_dir()
    if not (folder / "vae" / "config.json").is_file():
        raise FluxguardError("the built-in lite model files are missing (reinstall fluxguard)", path=folder)
    return str(folder)


def is_lite(model: str | Path) -> bool:
    """True for the name ``"lite"`` or the shipped folder itself."""
    return str(model) == LITE or Path(str(model)).resolve() == lite_dir()


def diffusers_model_kwargs() -> dict:
    """Keyword arguments for diffusers' ``ModelMixin.from_pretrained``: without ``accelerate`` installed (the
    README's plain install), ask for the ordinary loading path, which diffusers would otherwise fall back to with a
    warning printed on every load."""
    from diffusers.utils import is_accelerate_available

    return {} if is_accelerate_available() else {"low_cpu_mem_usage": False}
