"""Load any photo people have, and save results without losing or leaking anything.

Loading sniffs the content (never trusts the extension), applies the EXIF orientation, and converts every Pillow
mode (CMYK, grey, 16-bit, palette, alpha) to 8-bit RGB; transparency is composited on white for the face models and
kept separately so it can be put back on save. A header that claims more pixels than ``max_pixels`` is refused
before anything is decoded. HEIC/HEIF photos are read through ``pillow-heif``, AVIF through Pillow itself.

Saving is atomic (a temporary file in the same folder, then a no-clobber link or rename), never writes over an input,
refuses an existing output unless asked, and writes no EXIF, GPS or XMP metadata. A result keeps the input's format
where a writer for it exists (else :attr:`LoadedImage.save_format` names the one used) and its grey mode where the
format stores grey (8 or 16 bit); everything else is written as 8-bit RGB(A).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fluxguard.errors import ImageError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: above any phone or DSLR photo, far below a decompression bomb
SAVE_FORMATS = {"JPEG", "PNG", "WEBP", "TIFF", "BMP", "HEIF", "AVIF"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp", "HEIF": ".heic",
              "AVIF": ".avif"}
_EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
                ".bmp": "BMP", ".heic": "HEIF", ".heif": "HEIF", ".avif": "AVIF"}
READ_EXTENSIONS = frozenset({*_EXT_FORMATS, ".gif"})  # what a folder contributes to a batch
_LOSSY_FORMATS = {"JPEG", "WEBP", "HEIF", "AVIF"}  # written at ``quality`` (default DEFAULT_JPEG_QUALITY)
# Input modes written back as grey, per format that stores grey; 16-bit grey stays 16-bit where the format can.
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_GREY_FORMATS = {"PNG", "TIFF", "JPEG", "BMP", "AVIF"}
_GREY16_FORMATS = {"PNG", "TIFF"}
# Formats that lose the protective signal if written (palette quantisation) are saved as PNG instead.
_FALLBACK_FORMAT = {"GIF": "PNG", "MPO": "JPEG", "ICO": "PNG", "PPM": "PNG", "TGA": "PNG", "PCX": "PNG"}
DEFAULT_JPEG_QUALITY = 95
PART_SUFFIX = ".part"  # temporary files of write_bytes_atomic


@dataclass
class LoadedImage:
    """A decoded photo: 8-bit RGB pixels plus what is needed to save a result like it."""

    rgb: np.ndarray  # (H, W, 3) uint8, EXIF orientation applied, alpha composited on white
    format: str  # the real (sniffed) format, e.g. "JPEG"
    source: str  # file path, or "<bytes>"
    alpha: np.ndarray | None = None  # (H, W) uint8 when the input had transparency
    mode: str = "RGB"  # the original Pillow mode
    icc_profile: bytes | None = None  # kept for colour fidelity (it identifies no person or place)
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])

    @property
    def save_format(self) -> str:
        """The format a result is written in by default: the input's, unless that format would destroy it or
        there is no writer for it here (then PNG)."""
        fmt = _FALLBACK_FORMAT.get(self.format, self.format)
        return fmt if fmt in SAVE_FORMATS and can_write(fmt) else "PNG"


@functools.cache
def _enable_heif() -> bool:
    """Register pillow-heif's HEIF reader and writer with Pillow, on first use (not at import)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)  # the main picture only
    return True


def can_write(fmt: str) -> bool:
    """Whether this installation can encode ``fmt`` (HEIF needs pillow-heif, AVIF a Pillow built with libavif)."""
    if fmt == "HEIF":
        _enable_heif()
    Image.init()
    return fmt in Image.SAVE


def _to_rgb_and_alpha(im: Image.Image, source: str) -> tuple[np.ndarray, np.ndarray | None]:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit grey (and PNG's 32-bit "I" holding 16-bit data) scaled down to 8 bits
        peak = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        g = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2), None
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0) <= 1.0 else 1.0
        g = np.clip(np.round(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2), None
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        im = im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[..., 3].copy()
        a = alpha[..., None].astype(np.float32) / 255.0
        rgb = np.round(rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)
        return rgb, (alpha if alpha.min() < 255 else None)
    if im.mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, L, 1 ...
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)), None


def load_image(src: str | os.PathLike[str] | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode a photo from a path or from bytes.

    Raises:
        ImageError: missing file, a folder, not an image (SVG, text, empty), truncated data, or more than
            ``max_pixels`` pixels; the message names the file and the reason.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        data, source = bytes(src), "<bytes>"
    else:
        path = Path(src)
        source = str(path)
        if not path.exists():
            raise ImageError("no such file", path=path)
        if path.is_dir():
            raise ImageError("is a folder, not an image file", path=path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read: {e.strerror or e}", path=path) from None
    if not data:
        raise ImageError("file is empty", path=source)
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        raise ImageError("SVG (vector) images are not supported; export it as PNG or JPEG first", path=source)

    warns: list[str] = []
    _enable_heif()
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check is replaced by ours (configurable, and an error rather than a warning).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(io.BytesIO(data))
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"image is {w}x{h} = {w * h / 1e6:.0f} MP, above the limit of {max_pixels / 1e6:.0f} MP "
                        "(possible decompression bomb; raise the limit with --max-pixels if the photo is genuine)",
                        path=source,
                    )
                fmt = im.format or "UNKNOWN"
                n_frames = int(getattr(im, "n_frames", 1) or 1)
                if n_frames > 1:
                    im.seek(0)
                    warns.append(f"{source}: animated image with {n_frames} frames; only the first frame is used")
                im.load()
                icc = im.info.get("icc_profile")
                mode = im.mode
                im = ImageOps.exif_transpose(im)
            finally:
                Image.MAX_IMAGE_PIXELS = saved_limit
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format", path=source) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            msg = "image data is truncated (incomplete download or copy?)"
        raise ImageError(f"cannot decode image: {msg}", path=source) from None
    if im.size[0] < 1 or im.size[1] < 1:
        raise ImageError("image has no pixels", path=source)
    rgb, alpha = _to_rgb_and_alpha(im, source)
    for w_ in warns:
        log.warning(w_)
    return LoadedImage(rgb=rgb, format=fmt, source=source, alpha=alpha, mode=mode, icc_profile=icc, warnings=warns)


def format_for_path(path: str | os.PathLike[str]) -> str | None:
    """The save format an extension names, or None."""
    return _EXT_FORMATS.get(Path(path).suffix.lower())


def output_path(input_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], fmt: str,
                suffix: str = "_protected") -> Path:
    """``out_dir/<stem><suffix><ext>``: the input's extension when it matches ``fmt``, else the format's own."""
    p = Path(input_path)
    ext = p.suffix if _EXT_FORMATS.get(p.suffix.lower()) == fmt else EXTENSIONS[fmt]
    return Path(out_dir) / f"{p.stem}{suffix}{ext}"


def output_mode(input_mode: str, fmt: str) -> str:
    """The Pillow mode a result is written in: the input's grey (``L``, or ``I;16`` for 16-bit grey) where ``fmt``
    stores it, else ``RGB`` (colour, palette and CMYK inputs: a palette or CMYK re-encoding would mangle the
    protective change)."""
    if input_mode not in _GREY_MODES or fmt not in _GREY_FORMATS:
        return "RGB"
    return "I;16" if input_mode.startswith("I") and fmt in _GREY16_FORMATS else "L"


_ICC_SPACES = {"RGB": b"RGB ", "L": b"GRAY", "I;16": b"GRAY"}


def encode_image(
    rgb: np.ndarray,
    fmt: str,
    *,
    alpha: np.ndarray | None = None,
    quality: int | None = None,
    icc_profile: bytes | None = None,
    mode: str = "RGB",
) -> bytes:
    """Encode 8-bit RGB (+ optional alpha) to ``fmt`` in ``mode`` (``RGB``, ``L`` or ``I;16``) with no EXIF/GPS/XMP
    metadata; an ICC profile of another colour space than ``mode`` (a CMYK input's) is dropped."""
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    if fmt not in SAVE_FORMATS or not can_write(fmt):
        writable = sorted(f for f in SAVE_FORMATS if can_write(f))
        raise ImageError(f"cannot write format {fmt!r} here; use one of {', '.join(writable)}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if mode not in _ICC_SPACES:
        raise ValueError(f"mode must be one of {', '.join(_ICC_SPACES)}, got {mode!r}")
    im = Image.fromarray(rgb, "RGB")  # a fresh image carries no info/exif/xmp from the input
    if mode != "RGB":
        im = im.convert("L")  # ITU-R 601 luma: the grey a grey input had, plus the change
        if mode == "I;16":
            im = Image.fromarray(np.asarray(im).astype(np.uint16) * 257)  # 8-bit levels spread over 16 bits
    if alpha is not None and fmt in ("PNG", "WEBP", "TIFF", "HEIF", "AVIF") and mode != "I;16":
        im.putalpha(Image.fromarray(alpha, "L"))
    kw: dict = {}
    if icc_profile and icc_profile[16:20] == _ICC_SPACES[mode]:
        kw["icc_profile"] = icc_profile
    if fmt in _LOSSY_FORMATS:
        kw["quality"] = quality or DEFAULT_JPEG_QUALITY
    if fmt == "JPEG":
        # 4:4:4 chroma: subsampling would halve the colour resolution of the protective change
        kw.update(subsampling=0, optimize=True)
    elif fmt == "WEBP":
        kw.update(method=4)
    elif fmt in ("HEIF", "AVIF") and im.mode != "L":
        kw["subsampling"] = "4:4:4"
    elif fmt == "PNG":
        kw.update(optimize=False, compress_level=6)
    elif fmt == "TIFF":
        kw.update(compression="tiff_deflate")
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False,
                       inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Write ``data`` to ``path`` atomically: readers see the old file or the whole new one, never a part.

    Raises:
        ImageError: ``path`` is one of ``inputs``, or exists and ``overwrite`` is False.
    """
    dest = Path(path)
    for src in inputs:
        s = Path(src)
        if _same_file(dest, s) or dest.resolve() == s.resolve():
            raise ImageError("refusing to overwrite an input file; choose another output folder", path=dest)
    if dest.exists() and not overwrite:
        raise ImageError("output exists; pass --overwrite to replace it", path=dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid in the name lets remove_stale_partials() tell a killed writer's leftover from a live one.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=PART_SUFFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)  # fails if dest appeared meanwhile: no clobbering, even under a race
            except FileExistsError:
                raise ImageError("output exists; pass --overwrite to replace it", path=dest) from None
            except OSError:
                os.replace(tmp, dest)  # filesystems without hard links
            else:
                os.unlink(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep its file
    return True


def remove_stale_partials(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that writers killed mid-write (``kill -9``, power loss) left in ``folder``.

    Only files named like :func:`write_bytes_atomic`'s temporaries whose writing process is gone are removed; the
    finished outputs are never touched (a write is a rename, so they are whole or absent).
    """
    removed: list[Path] = []
    d = Path(folder)
    if not d.is_dir():
        return removed
    for f in d.glob(f".*{PART_SUFFIX}"):
        parts = f.name[: -len(PART_SUFFIX)].split(".")  # "", name..., pid, random
        if len(parts) < 4 or not parts[-2].isdigit() or _pid_alive(int(parts[-2])):
            continue
        try:
            f.unlink()
            removed.append(f)
        except OSError:
            pass
    return removed


def save_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    like: LoadedImage | None = None,
    fmt: str | None = None,
    quality: int | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Save a result next to nothing it could damage.

    The format is ``fmt``, else the one the extension names, else ``like``'s; transparency, grey mode
    (:func:`output_mode`) and the ICC profile of ``like`` are carried over. No EXIF, GPS or XMP is ever written.
    """
    fmt = (fmt or format_for_path(path) or (like.save_format if like else None) or "PNG").upper()
    alpha = like.alpha if like is not None else None
    if alpha is not None and alpha.shape != rgb.shape[:2]:
        alpha = None
    mode = output_mode(like.mode, fmt) if like is not None else "RGB"
    data = encode_image(rgb, fmt, alpha=alpha, quality=quality, icc_profile=like.icc_profile if like else None,
                        mode=mode)
    extra = [like.source] if like is not None and like.source != "<bytes>" else []
    return write_bytes_atomic(path, data, overwrite=overwrite, inputs=[*inputs, *extra])
