"""Image input/output: load anything people have, save atomically without metadata."""

from fluxguard.io.image import (
    DEFAULT_MAX_PIXELS,
    READ_EXTENSIONS,
    LoadedImage,
    can_write,
    encode_image,
    format_for_path,
    load_image,
    output_mode,
    output_path,
    remove_stale_partials,
    save_image,
    write_bytes_atomic,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "READ_EXTENSIONS",
    "LoadedImage",
    "can_write",
    "encode_image",
    "format_for_path",
    "load_image",
    "output_mode",
    "output_path",
    "remove_stale_partials",
    "save_image",
    "write_bytes_atomic",
]
