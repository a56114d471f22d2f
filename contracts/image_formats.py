"""What an image file is, from its first bytes: the formats the model accepts and the size limit.

Pure functions over bytes, shared by the worker (which validates every image) and the CLI (which
refuses a local file that is not an image before anything is queued), so neither imports the other.
"""

from __future__ import annotations

MAX_IMAGE_BYTES = 10 * 1024 * 1024  # one image file, as stored (the vendor's limit)
#: Each accepted format and its MIME type (what the model is sent, what an upload is stored and documented as).
MIME = {"BMP": "image/bmp", "JPEG": "image/jpeg", "PNG": "image/png", "TIFF": "image/tiff", "WEBP": "image/webp",
        "HEIC": "image/heic"}
ACCEPTED = tuple(MIME)
SNIFF_BYTES = 512  # enough of the head for every check below

_BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}  # the DIB header versions (so "BMW..." is text, not BMP)
_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}


def sniff_format(raw: bytes) -> str | None:
    """The accepted format these bytes are, by their magic numbers; None when none of them."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if raw.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if raw.startswith(b"BM") and len(raw) >= 26 and int.from_bytes(raw[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if raw[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    if raw[4:8] == b"ftyp" and _isobmff_brand(raw) == "HEIC":
        return "HEIC"
    return None


def _isobmff_brand(raw: bytes) -> str | None:
    box_size = int.from_bytes(raw[:4], "big")
    major = raw[8:12]
    compatible = [raw[i:i + 4] for i in range(16, min(box_size, len(raw), 64), 4)]
    if major in (b"avif", b"avis") or b"avif" in compatible:
        return "AVIF"
    if major in _HEIC_BRANDS or _HEIC_BRANDS.intersection(compatible):
        return "HEIC"
    return None


def describe_unsupported(raw: bytes) -> str:
    """What the bytes look like, for the error message."""
    head = raw[:SNIFF_BYTES].lstrip()
    if not raw:
        return "the file is empty"
    guesses = [
        (raw.startswith((b"GIF87a", b"GIF89a")), "GIF"),
        (raw.startswith(b"%PDF"), "PDF"),
        (raw.startswith(b"\x00\x00\x01\x00"), "ICO"),
        (raw[4:8] == b"ftyp" and _isobmff_brand(raw) == "AVIF", "AVIF"),
        (b"<svg" in head.lower() or (head.startswith(b"<?xml") and b"svg" in head.lower()), "SVG"),
    ]
    for matched, name in guesses:
        if matched:
            return f"{name} is not an accepted format"
    try:
        raw[:SNIFF_BYTES].decode("utf-8")
        return "the content is text, not an image"
    except UnicodeDecodeError:
        return "the content is not a recognised image"


def unsupported_reason(raw: bytes) -> str | None:
    """None when the bytes start like an accepted image, else why not (naming the accepted formats)."""
    if sniff_format(raw) is not None:
        return None
    return f"{describe_unsupported(raw)}; accepted: {', '.join(ACCEPTED)}"
