"""The odd-input corpus: every file people may hand us gives the right pixels or a clear ImageError."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxguard.errors import ImageError
from fluxguard.io import encode_image, load_image, output_path, save_image, write_bytes_atomic


def _quadrants(w: int = 64, h: int = 48) -> np.ndarray:
    """An asymmetric picture: red top-left, green top-right, blue bottom-left, white bottom-right."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2 :] = (0, 255, 0)
    a[h // 2 :, : w // 2] = (0, 0, 255)
    a[h // 2 :, w // 2 :] = (255, 255, 255)
    return a


def _corner_colours(rgb: np.ndarray) -> list[tuple[int, ...]]:
    h, w = rgb.shape[:2]
    pts = [(h // 6, w // 6), (h // 6, w - 1 - w // 6), (h - 1 - h // 6, w // 6), (h - 1 - h // 6, w - 1 - w // 6)]
    return [tuple(int(round(v / 255.0)) for v in rgb[y, x]) for y, x in pts]


def _save(tmp: Path, name: str, im: Image.Image, **kw) -> Path:
    p = tmp / name
    im.save(p, **kw)
    return p


# ---------------------------------------------------------------- decoding corpus


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(p)


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a photo\n")
    with pytest.raises(ImageError, match=r"notes\.jpg.*not a recognised image"):
        load_image(p)


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(p)


def _png_with_size(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_header_bomb_refused_before_decoding(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_with_size(100_000, 100_000))
    with pytest.raises(ImageError, match=r"10000 MP.*limit"):
        load_image(p)


def test_pixel_limit_is_configurable() -> None:
    data = encode_image(np.zeros((100, 100, 3), np.uint8), "PNG")
    with pytest.raises(ImageError, match="limit"):
        load_image(data, max_pixels=5_000)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    p = _save(tmp_path, "cmyk.jpg", Image.fromarray(_quadrants()).convert("CMYK"), quality=95)
    li = load_image(p)
    assert li.mode == "CMYK" and li.rgb.shape == (48, 64, 3)
    assert _corner_colours(li.rgb) == [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)]


def test_16bit_grey_png(tmp_path: Path) -> None:
    ramp = (np.linspace(0, 65535, 64)[None, :].repeat(8, 0)).astype(np.uint16)
    p = _save(tmp_path, "deep.png", Image.fromarray(ramp))
    li = load_image(p)
    assert li.rgb.dtype == np.uint8 and li.rgb.shape == (8, 64, 3)
    assert li.rgb[0, 0, 0] == 0 and li.rgb[0, -1, 0] == 255
    assert np.all(np.diff(li.rgb[0, :, 0].astype(int)) >= 0)


def test_palette_png(tmp_path: Path) -> None:
    p = _save(tmp_path, "pal.png", Image.fromarray(_quadrants()).convert("P", palette=Image.Palette.ADAPTIVE))
    li = load_image(p)
    assert li.alpha is None and _corner_colours(li.rgb) == [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)]


def test_rgba_composited_on_white_and_alpha_kept(tmp_path: Path) -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, 5:, 3] = 255  # left half transparent
    li = load_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert tuple(li.rgb[0, 0]) == (255, 255, 255) and tuple(li.rgb[0, 9]) == (255, 0, 0)
    assert li.alpha is not None and li.alpha[0, 0] == 0 and li.alpha[0, 9] == 255
    out = save_image(tmp_path / "out.png", li.rgb, like=li)
    assert Image.open(out).mode == "RGBA" and np.asarray(Image.open(out))[0, 0, 3] == 0


def test_la_grey_alpha(tmp_path: Path) -> None:
    la = np.zeros((6, 6, 2), np.uint8)
    la[..., 0] = 0
    la[:3, :, 1] = 255
    li = load_image(_save(tmp_path, "la.png", Image.fromarray(la, "LA")))
    assert tuple(li.rgb[0, 0]) == (0, 0, 0) and tuple(li.rgb[5, 0]) == (255, 255, 255)


@pytest.mark.parametrize(
    ("orientation", "undo"),
    [
        (2, lambda a: a[:, ::-1]),
        (3, lambda a: a[::-1, ::-1]),
        (6, lambda a: np.rot90(a, 1)),
        (8, lambda a: np.rot90(a, -1)),
    ],
)
def test_exif_orientation_applied(tmp_path: Path, orientation: int, undo) -> None:
    upright = _quadrants()
    stored = np.ascontiguousarray(undo(upright))  # what a camera would store for this orientation tag
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = _save(tmp_path, f"o{orientation}.jpg", Image.fromarray(stored), exif=exif, quality=98)
    li = load_image(p)
    assert li.rgb.shape == upright.shape
    assert _corner_colours(li.rgb) == _corner_colours(upright)


def test_animated_gif_first_frame_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    li = load_image(p)
    assert li.format == "GIF" and li.warnings and "3 frames" in li.warnings[0]
    assert tuple(li.rgb[8, 8]) == (255, 0, 0)
    assert li.save_format == "PNG"  # palette formats would destroy a protective change


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_other_formats(tmp_path: Path, fmt: str) -> None:
    kw = {"lossless": True} if fmt == "WEBP" else {}
    p = _save(tmp_path, f"x.{fmt.lower()}", Image.fromarray(_quadrants()), format=fmt, **kw)
    li = load_image(p)
    assert li.format == fmt and np.array_equal(li.rgb, _quadrants())


def test_gps_exif_never_written(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    gps = exif.get_ifd(0x8825)
    gps[2] = (48.0, 51.0, 24.0)  # GPSLatitude
    gps[1] = "N"
    src = _save(tmp_path, "gps.jpg", Image.fromarray(_quadrants()), exif=exif)
    assert Image.open(src).getexif().get_ifd(0x8825)
    li = load_image(src)
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        out = save_image(tmp_path / f"clean.{fmt.lower()}", li.rgb, like=li, fmt=fmt)
        exif_out = Image.open(out).getexif()  # TIFF always has structural tags (size, ...); no private ones
        assert 0x8825 not in exif_out and 0x010F not in exif_out and 0x8769 not in exif_out, fmt
        if fmt != "TIFF":
            assert not exif_out, fmt
        raw = out.read_bytes()
        assert b"Exif" not in raw and b"PhoneMaker" not in raw and b"http://ns.adobe.com/xap" not in raw


def test_xmp_not_carried_over(tmp_path: Path) -> None:
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF>secret-location</rdf:RDF></x:xmpmeta>'
    src = _save(tmp_path, "xmp.jpg", Image.fromarray(_quadrants()), xmp=xmp)
    assert b"secret-location" in src.read_bytes()
    li = load_image(src)
    out = save_image(tmp_path / "o.jpg", li.rgb, like=li)
    assert b"secret-location" not in out.read_bytes()


def test_unicode_path(tmp_path: Path) -> None:
    d = tmp_path / "фото 写真"
    d.mkdir()
    p = _save(d, "zoë ✓.png", Image.fromarray(_quadrants()))
    assert load_image(p).size == (64, 48)


def test_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_svg_refused(tmp_path: Path) -> None:
    p = tmp_path / "logo.svg"
    p.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    with pytest.raises(ImageError, match="SVG"):
        load_image(p)


def test_wrong_extension_is_sniffed(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(_quadrants()).save(buf, "PNG")
    p = tmp_path / "really_a_png.jpg"
    p.write_bytes(buf.getvalue())
    li = load_image(p)
    assert li.format == "PNG" and np.array_equal(li.rgb, _quadrants())
    # the output keeps the real format, so the name says what the file is
    assert output_path(p, tmp_path / "out", li.save_format).name == "really_a_png_protected.png"


def test_tiny_8x8(tmp_path: Path) -> None:
    li = load_image(_save(tmp_path, "tiny.png", Image.new("RGB", (8, 8), (10, 20, 30))))
    assert li.size == (8, 8) and tuple(li.rgb[0, 0]) == (10, 20, 30)


def test_large_6000x6000(tmp_path: Path) -> None:
    p = _save(tmp_path, "big.png", Image.new("RGB", (6000, 6000), (1, 2, 3)), compress_level=1)
    li = load_image(p)
    assert li.size == (6000, 6000)


def test_bytes_input() -> None:
    data = encode_image(_quadrants(), "JPEG", quality=98)
    li = load_image(data)
    assert li.source == "<bytes>" and li.format == "JPEG"


# ---------------------------------------------------------------- saving


def test_save_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "o" / "r.png"
    save_image(out, _quadrants())
    with pytest.raises(ImageError, match="exists"):
        save_image(out, _quadrants())
    save_image(out, np.zeros((48, 64, 3), np.uint8), overwrite=True)
    assert np.asarray(Image.open(out)).max() == 0
    assert not [f for f in out.parent.iterdir() if f.name.endswith(".part")]


def test_never_overwrites_the_input(tmp_path: Path) -> None:
    src = _save(tmp_path, "me.jpg", Image.fromarray(_quadrants()))
    li = load_image(src)
    before = src.read_bytes()
    with pytest.raises(ImageError, match="input"):
        save_image(src, li.rgb, like=li, overwrite=True)
    assert src.read_bytes() == before


def test_keeps_format_and_size(tmp_path: Path) -> None:
    src = _save(tmp_path, "p.webp", Image.fromarray(_quadrants()), format="WEBP", quality=90)
    li = load_image(src)
    out = save_image(output_path(src, tmp_path / "o", li.save_format), li.rgb, like=li)
    assert out.suffix == ".webp" and Image.open(out).format == "WEBP" and Image.open(out).size == (64, 48)


def test_write_bytes_atomic_leaves_no_partial_file(tmp_path: Path) -> None:
    dest = tmp_path / "x.bin"
    write_bytes_atomic(dest, b"abc")
    assert dest.read_bytes() == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


@pytest.mark.parametrize(
    ("mode", "fmt", "written"),
    [("L", "PNG", "L"), ("L", "JPEG", "L"), ("LA", "PNG", "LA"), ("I;16", "PNG", "I;16"), ("I;16", "TIFF", "I;16"),
     ("L", "WEBP", "RGB"), ("RGB", "PNG", "RGB"), ("P", "PNG", "RGB"), ("CMYK", "JPEG", "RGB")],
)
def test_save_keeps_a_grey_input_grey_where_the_format_stores_grey(tmp_path: Path, mode: str, fmt: str,
                                                                  written: str) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    if mode == "I;16":
        src = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode == "LA":
        src = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(np.full_like(grey, 128))])
    else:
        src = Image.fromarray(grey).convert(mode)
    buf = io.BytesIO()
    src.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    loaded = load_image(buf.getvalue())
    out = save_image(tmp_path / f"out.{fmt.lower()}", loaded.rgb, like=loaded, fmt=fmt)
    with Image.open(out) as im:
        assert im.mode == written
        if written in ("L", "I;16") and fmt != "JPEG":  # (LA: grey is composited on white for the models)
            back = np.asarray(im).astype(np.int64)
            assert np.array_equal(back // 257 if written == "I;16" else back, grey)  # lossless: the same levels
