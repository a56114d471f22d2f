"""Test images made on the fly: every accepted format, and the bad and edge cases the worker must refuse.

All functions return the file's bytes. ``make_image`` covers the ordinary cases; the others build
one awkward file each (a decompression bomb, a truncated file, an EXIF-rotated JPEG ...).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Any

import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()

_SAVE_AS = {"HEIC": "HEIF", "JPG": "JPEG", "TIF": "TIFF"}


def make_image(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color: Any = (255, 0, 0), *,
               mode: str = "RGB", **opts: Any) -> bytes:
    """A plain image of one colour in any format Pillow can write (HEIC through pillow-heif)."""
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, _SAVE_AS.get(fmt.upper(), fmt.upper()), **opts)
    return out.getvalue()


def noise_image(fmt: str = "PNG", size: tuple[int, int] = (64, 48), *, seed: int | None = None,
                mode: str = "RGB", **opts: Any) -> bytes:
    """Random pixels: files that do not compress, for size limits and benchmarks."""
    bands = len(mode)
    raw = os.urandom(size[0] * size[1] * bands) if seed is None else _seeded_bytes(size[0] * size[1] * bands, seed)
    out = io.BytesIO()
    Image.frombytes(mode, size, raw).save(out, _SAVE_AS.get(fmt.upper(), fmt.upper()), **opts)
    return out.getvalue()


def _seeded_bytes(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def gradient_image(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), **opts: Any) -> bytes:
    """A smooth photo-like picture (compresses like a photo, unlike noise or a flat colour)."""
    w, h = size
    x = Image.linear_gradient("L").resize((w, h))
    y = x.transpose(Image.Transpose.ROTATE_90).resize((w, h))
    im = Image.merge("RGB", (x, y, Image.new("L", (w, h), 128)))
    out = io.BytesIO()
    im.save(out, _SAVE_AS.get(fmt.upper(), fmt.upper()), **opts)
    return out.getvalue()


# -- PNG by hand -------------------------------------------------------------------------------
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_from_parts(width: int, height: int, idat: bytes, *, bit_depth: int = 8, color_type: int = 2,
                   extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid header declaring width x height pixels, with a tiny IDAT: decoding it would need GBs."""
    return png_from_parts(width, height, zlib.compress(b"\x00" * 1024, 9))


def png16_rgb(size: tuple[int, int] = (32, 24), color: tuple[int, int, int] = (65535, 0, 30000)) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    w, h = size
    row = b"\x00" + struct.pack(">HHH", *color) * w
    return png_from_parts(w, h, zlib.compress(row * h), bit_depth=16, color_type=2)


def png16_gray(size: tuple[int, int] = (32, 24), value: int = 40000) -> bytes:
    return make_image("PNG", size, value, mode="I;16")


def padded_png(total_bytes: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A valid small PNG grown to exactly ``total_bytes`` with a private ancillary chunk."""
    base = make_image("PNG", size)
    overhead = len(base) + 12  # the chunk's length, type and CRC
    if total_bytes < overhead:
        raise ValueError(f"a padded PNG is at least {overhead} bytes")
    pad = png_chunk(b"pdDg", b"\x00" * (total_bytes - overhead))
    iend = base.rindex(b"IEND") - 4
    data = base[:iend] + pad + base[iend:]
    assert len(data) == total_bytes
    return data


# -- awkward files -----------------------------------------------------------------------------
def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def exif_rotated(fmt: str = "JPEG", size: tuple[int, int] = (80, 40), orientation: int = 6) -> bytes:
    """Stored as size (landscape); the EXIF orientation says display it rotated (6 = 90 degrees CW).

    Blue with a yellow band on the stored image's left edge, so the rotation can be seen.
    """
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 255, 0), (0, 0, size[0] // 4, size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    opts: dict[str, Any] = {"quality": 95} if fmt.upper() in ("JPEG", "WEBP") else {}
    im.save(out, _SAVE_AS.get(fmt.upper(), fmt.upper()), exif=exif.tobytes(), **opts)
    return out.getvalue()


def exif_rotated_jpeg(size: tuple[int, int] = (80, 40), orientation: int = 6) -> bytes:
    return exif_rotated("JPEG", size, orientation)


def cmyk_jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    return make_image("JPEG", size, (0, 255, 255, 0), mode="CMYK")


def palette_png_with_transparency(size: tuple[int, int] = (64, 48)) -> bytes:
    im = Image.new("P", size, 0)
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, size[0] // 2, size[1]))
    out = io.BytesIO()
    im.save(out, "PNG", transparency=0)
    return out.getvalue()


def animated_webp(size: tuple[int, int] = (64, 48), frames: int = 3) -> bytes:
    images = [Image.new("RGB", size, (80 * i, 0, 255 - 80 * i)) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "WEBP", save_all=True, append_images=images[1:], duration=100, loop=0)
    return out.getvalue()


def multipage_tiff(size: tuple[int, int] = (64, 48), pages: int = 3) -> bytes:
    images = [Image.new("RGB", size, (0, 60 * i, 0)) for i in range(pages)]
    out = io.BytesIO()
    images[0].save(out, "TIFF", save_all=True, append_images=images[1:])
    return out.getvalue()


def heic(size: tuple[int, int] = (64, 48), color: Any = (0, 128, 255)) -> bytes:
    return make_image("HEIC", size, color)


def gif(size: tuple[int, int] = (64, 48)) -> bytes:
    return make_image("GIF", size)


def ico(size: tuple[int, int] = (32, 32)) -> bytes:
    return make_image("ICO", size)


def avif(size: tuple[int, int] = (64, 48)) -> bytes:
    return make_image("AVIF", size)


def svg(size: tuple[int, int] = (64, 48)) -> bytes:
    w, h = size
    return (f'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">'
            f'<rect width="{w}" height="{h}" fill="red"/></svg>\n').encode()


def pdf() -> bytes:
    return (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
            b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


def text() -> bytes:
    return b"this is not an image, just some text\n"


EMPTY = b""


# -- decompression bombs in every accepted format: a valid small file whose header declares a huge size
def _patch(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value):]


def _jpeg_bomb(width: int, height: int) -> bytes:
    data = make_image("JPEG", (64, 48))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    return _patch(data, sof + 5, struct.pack(">HH", height, width))


def _bmp_bomb(width: int, height: int) -> bytes:
    return _patch(make_image("BMP", (64, 48)), 18, struct.pack("<ii", width, height))


def _tiff_bomb(width: int, height: int) -> bytes:
    """A grey uncompressed TIFF declaring width x height, with one row of data."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, height), (279, 4, width)]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x80" * 64


def _webp_bomb(width: int, height: int) -> bytes:
    data = make_image("WEBP", (64, 48), lossless=True)
    at = data.index(b"VP8L") + 8  # signature byte 0x2f, then 14 bits width-1, 14 bits height-1
    bits = int.from_bytes(data[at + 1:at + 5], "little")
    bits = (bits & ~0x0FFFFFFF) | (min(width, 16384) - 1) | ((min(height, 16384) - 1) << 14)
    return _patch(data, at + 1, bits.to_bytes(4, "little"))


def _heic_bomb(width: int, height: int) -> bytes:
    data = heic((64, 48))
    at = data.index(b"ispe") + 8  # version/flags(4) then width(4) height(4)
    return _patch(data, at, struct.pack(">II", width, height))


def bomb(fmt: str = "PNG", width: int = 60000, height: int = 60000) -> bytes:
    """A small file in ``fmt`` whose header declares width x height (WEBP is capped at 16384 a side)."""
    makers = {"PNG": bomb_png, "JPEG": _jpeg_bomb, "BMP": _bmp_bomb, "TIFF": _tiff_bomb, "WEBP": _webp_bomb,
              "HEIC": _heic_bomb}
    return makers[fmt.upper()](width, height)
