"""Image validation, resizing and token counting: pure functions over bytes (fetching is in fetch.py,
the decode memory budget in memory.py).

Order of checks, cheapest first, so a bad image never costs a full decode:
    size in bytes -> format sniffed from the content -> header (pixels, width, height, aspect ratio)
    -> structure (``verify()``) -> full decode (``load()``) -> re-encode only when needed.

Re-encode policy (when the image must change: EXIF rotation, downscale, a mode the model may not
read, several frames, or a base64 form over 10 MB):
    JPEG -> JPEG (quality 90), PNG -> PNG, WEBP -> WEBP (quality 90),
    BMP / TIFF -> PNG (usually screenshots, scans, diagrams: keep them lossless),
    HEIC -> JPEG (camera photos), or PNG when the image has alpha.
With high resolution, an image that must be re-encoded anyway is also brought down to 12,845,056 px
(the 16384-token cap: the service would shrink it to that). If the result is still over the base64
budget: JPEG (WEBP with alpha) at falling quality, then smaller sizes, then ``image.too_large``.
An image that needs no change is sent byte for byte.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import io
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pillow_heif
from PIL import Image, ImageFile, ImageOps

from contracts.errors import ImageError
from contracts.image_formats import MAX_IMAGE_BYTES, MIME, sniff_format, unsupported_reason
from contracts.tokens import HIGH_RES_TOKEN_CAP, PATCH, RECOMMENDED_MAX_PIXELS, image_tokens
from worker.intake.fetch import ImageFetcher
from worker.intake.memory import TRIM_AFTER_BYTES, decode_budget, release_memory

# A truncated file must be refused, never padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
pillow_heif.register_heif_opener()

MAX_BASE64_BYTES = 10 * 1024 * 1024  # the data URL payload the service receives
MIN_SIDE = 11  # width and height must be greater than 10 px
MAX_ASPECT_RATIO = 200
#: Refused from the header, before any decode: Pillow's own decompression-bomb threshold
#: (89,478,485 px, about 9459 x 9459; a 108 MP phone photo passes). Decoding one such RGB image
#: takes about 270 MB, which bounds a worker thread's memory.
MAX_PIXELS = 89_478_485
HIGH_RES_MAX_PIXELS = HIGH_RES_TOKEN_CAP * PATCH * PATCH  # 12,845,056: the service's cap with high resolution
JPEG_QUALITY = 90
FALLBACK_QUALITIES = (85, 75, 60)
DOWNSCALE_STEP = 0.75
MAX_DOWNSCALE_STEPS = 6

_PIL_FORMAT = {"BMP": "BMP", "JPEG": "JPEG", "PNG": "PNG", "TIFF": "TIFF", "WEBP": "WEBP", "HEIC": "HEIF"}
_REENCODE_AS = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WEBP", "BMP": "PNG", "TIFF": "PNG", "HEIC": "JPEG"}
_SAFE_MODES = {
    "JPEG": {"L", "RGB"},
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA"},
    "WEBP": {"RGB", "RGBA"},
    "BMP": {"1", "L", "P", "RGB", "RGBA"},
    "TIFF": {"1", "L", "LA", "P", "RGB", "RGBA"},
    "HEIC": {"L", "RGB", "RGBA"},
}
_SWAPS_SIDES = (5, 6, 7, 8)
#: Their Pillow plugins already report the upright size and rotate while loading.
_ROTATES_ITSELF = {"TIFF", "HEIC"}


@dataclass(frozen=True)
class PreparedImage:
    """One validated image, ready to send.

    ``format`` is the detected format of the original; ``mime`` is the type of ``data`` (the bytes
    sent), which differs when the image was re-encoded (a BMP is sent as PNG).
    """

    ref: str
    format: str
    mime: str
    width: int
    height: int
    bytes: int
    sent_width: int
    sent_height: int
    data: builtins.bytes  # plain ``bytes`` here would name the field above
    tokens: int
    sha256: str = ""  # of the original bytes: tells a conversation whether an earlier image changed since

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def summary(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "format": self.format, "width": self.width, "height": self.height,
            "bytes": self.bytes, "sent_width": self.sent_width, "sent_height": self.sent_height,
            "tokens": self.tokens, "sha256": self.sha256,
        }


def base64_size(n: int) -> int:
    return 4 * math.ceil(n / 3)


# -- the checks --------------------------------------------------------------------------------
def _open(raw: bytes, fmt: str, ref: str) -> Image.Image:
    """Open (header only); Pillow's own bomb guard is turned into our code."""
    try:
        return Image.open(io.BytesIO(raw), formats=[_PIL_FORMAT[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the header declares more than {MAX_PIXELS:,} pixels, a likely decompression bomb; "
                         f"refused without decoding ({exc})", code="image.too_many_pixels", ref=ref) from exc
    except Exception as exc:
        raise ImageError(f"{fmt} data is corrupt or truncated ({exc})", code="image.corrupt", ref=ref) from exc


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = upright), read from the header only."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PngImageFile.getexif() would decode the whole image to look for a late eXIf chunk
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_geometry(width: int, height: int, ref: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{width}x{height} is {width * height:,} pixels, over the limit of {MAX_PIXELS:,}; "
            "refused without decoding", code="image.too_many_pixels", ref=ref)
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ImageError(f"{width}x{height} px: width and height must both be greater than 10 px",
                         code="image.too_small", ref=ref)
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(f"{width}x{height} px: aspect ratio over {MAX_ASPECT_RATIO}:1",
                         code="image.bad_aspect_ratio", ref=ref)


def _verify(raw: bytes, fmt: str, ref: str) -> None:
    im = _open(raw, fmt, ref)
    try:
        im.verify()
    except Exception as exc:
        raise ImageError(f"{fmt} data is corrupt ({exc})", code="image.corrupt", ref=ref) from exc
    finally:
        im.close()


def _decode_cost(im: Image.Image, fmt: str) -> int:
    """Bytes a decode and re-encode hold: Pillow keeps 4 bytes a pixel for RGB; a copy for conversion or
    resizing; WEBP also holds the decoder's output buffer."""
    return im.width * im.height * 4 * (4 if fmt == "WEBP" else 2)


def _cost_of_decoding(raw: bytes, fmt: str, ref: str, draft_size: tuple[int, int] | None) -> int:
    with _open(raw, fmt, ref) as im:
        if fmt == "JPEG" and draft_size is not None:
            im.draft(None, draft_size)
        return _decode_cost(im, fmt)


@contextmanager
def _decoded(raw: bytes, fmt: str, ref: str, draft_size: tuple[int, int] | None) -> Iterator[Image.Image]:
    """The first frame fully decoded, within the memory budget (reserved before the pixels exist,
    released after they are freed); a JPEG at the smallest DCT scale that still covers ``draft_size``."""
    cost = _cost_of_decoding(raw, fmt, ref, draft_size)
    with decode_budget.reserve(cost, ref):
        try:
            with _open(raw, fmt, ref) as im:
                if fmt == "JPEG" and draft_size is not None:
                    im.draft(None, draft_size)
                _load(im, fmt, ref)
                yield im
        finally:
            if cost >= TRIM_AFTER_BYTES:
                release_memory()


def _load(im: Image.Image, fmt: str, ref: str) -> None:
    try:
        im.load()
    except Exception as exc:
        if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning) or (
                "Security limit exceeded" in str(exc)):  # libheif's own size guard
            raise ImageError(f"the image is larger than its header said, over {MAX_PIXELS:,} pixels; "
                             f"refused ({exc})", code="image.too_many_pixels", ref=ref) from exc
        raise ImageError(f"{fmt} data is corrupt or truncated ({exc})", code="image.corrupt",
                         ref=ref) from exc


def _downscaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels:  # floor keeps it under, but guard rounding anyway
        w, h = w - 1, max(1, h - 1)
    return w, h


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info)


def _is_16bit_png(raw: bytes) -> bool:
    return len(raw) > 24 and raw[24] == 16


def _to_8bit(im: Image.Image) -> Image.Image:
    """Modes the encoders and the model read: 8-bit L, RGB, RGBA (or P / 1 kept as they are)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    if im.mode == "F":
        return im.convert("L")
    if _has_alpha(im):
        return im.convert("RGBA") if im.mode != "LA" else im
    if im.mode in ("1", "L", "RGB"):
        return im
    return im.convert("RGB")


def _encode(im: Image.Image, fmt: str, quality: int, icc: bytes | None) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        im.save(out, "JPEG", quality=quality, optimize=False, icc_profile=icc)
    elif fmt == "WEBP":
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGBA" if _has_alpha(im) else "RGB")
        im.save(out, "WEBP", quality=quality, method=4, icc_profile=icc)
    else:
        im.save(out, "PNG", compress_level=1, icc_profile=icc)  # level 6 is 2x slower for ~10% fewer bytes
    return out.getvalue()


def _encode_within_budget(im: Image.Image, fmt: str, icc: bytes | None, ref: str) -> tuple[bytes, str, Image.Image]:
    """Encode as ``fmt``; if the base64 form is over budget, go lossy, lower quality, then smaller."""
    data = _encode(im, fmt, JPEG_QUALITY, icc)
    if base64_size(len(data)) <= MAX_BASE64_BYTES:
        return data, fmt, im
    lossy = "WEBP" if _has_alpha(im) else ("WEBP" if fmt == "WEBP" else "JPEG")
    for step in range(MAX_DOWNSCALE_STEPS + 1):
        if step:
            size = (max(MIN_SIDE, int(im.width * DOWNSCALE_STEP)), max(MIN_SIDE, int(im.height * DOWNSCALE_STEP)))
            im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        for quality in FALLBACK_QUALITIES:
            data = _encode(im, lossy, quality, icc)
            if base64_size(len(data)) <= MAX_BASE64_BYTES:
                return data, lossy, im
    raise ImageError(f"cannot bring the image under {MAX_BASE64_BYTES:,} bytes of base64", code="image.too_large",
                     ref=ref)


@dataclass(frozen=True)
class _Header:
    fmt: str
    width: int  # after EXIF orientation
    height: int
    mode: str
    frames: int
    orientation: int


def _read_header(ref: str, raw: bytes) -> _Header:
    if not raw:
        raise ImageError("the file is empty", code="image.unsupported_format", ref=ref)
    if len(raw) > MAX_IMAGE_BYTES:
        raise ImageError(f"{len(raw):,} bytes, over the limit of {MAX_IMAGE_BYTES:,}", code="image.too_large",
                         ref=ref)
    fmt = sniff_format(raw)
    if fmt is None:
        raise ImageError(unsupported_reason(raw) or "", code="image.unsupported_format", ref=ref)
    with _open(raw, fmt, ref) as im:
        width, height = im.size
        if width * height > MAX_PIXELS:  # before anything else reads pixels
            _check_geometry(width, height, ref)
        orientation = _orientation(im)
        if orientation in _SWAPS_SIDES and fmt not in _ROTATES_ITSELF:
            width, height = height, width
        return _Header(fmt, width, height, im.mode, getattr(im, "n_frames", 1), orientation)


def _needs_reencode(header: _Header, raw: bytes, downscale: bool) -> bool:
    return (
        downscale
        or header.orientation != 1
        or header.frames > 1
        or header.mode not in _SAFE_MODES[header.fmt]
        or (header.fmt == "PNG" and _is_16bit_png(raw))
        or base64_size(len(raw)) > MAX_BASE64_BYTES
    )


def prepare_image(ref: str, raw: bytes, *, high_resolution: bool) -> PreparedImage:
    """Validate one image and make it sendable; raises ImageError with the code of the first failed rule."""
    header = _read_header(ref, raw)
    _check_geometry(header.width, header.height, ref)
    _verify(raw, header.fmt, ref)
    pixels = header.width * header.height
    downscale = not high_resolution and pixels > RECOMMENDED_MAX_PIXELS
    target = _downscaled_size(header.width, header.height, RECOMMENDED_MAX_PIXELS) if downscale \
        else (header.width, header.height)
    if not _needs_reencode(header, raw, downscale):
        # Decode anyway (a JPEG at 1/8 scale): only a full decode finds a truncated scan.
        with _decoded(raw, header.fmt, ref, (1, 1)):
            pass
        return _prepared(ref, header, raw, raw, header.fmt, target, high_resolution)
    if high_resolution and pixels > HIGH_RES_MAX_PIXELS:
        # Re-encoding anyway: pixels beyond the 16384-token cap would only be thrown away by the service.
        downscale, target = True, _downscaled_size(header.width, header.height, HIGH_RES_MAX_PIXELS)
    rotated = header.orientation in _SWAPS_SIDES and header.fmt not in _ROTATES_ITSELF
    stored = (target[1], target[0]) if rotated else target
    with _decoded(raw, header.fmt, ref, stored if downscale else None) as im:
        try:
            data, sent_fmt, sent = _reencode(im, header.fmt, target if downscale else None, ref)
        except (ImageError, MemoryError):
            raise
        except Exception as exc:
            raise ImageError(f"cannot convert this {header.fmt} ({im.mode}) into a sendable image ({exc})",
                             code="image.unsupported_format", ref=ref) from exc
    return _prepared(ref, header, raw, data, sent_fmt, sent, high_resolution)


def _reencode(im: Image.Image, fmt: str, target: tuple[int, int] | None, ref: str,
              ) -> tuple[bytes, str, tuple[int, int]]:
    """Upright, 8-bit, first frame, downscaled to ``target`` if given, encoded within the base64 budget."""
    icc = im.info.get("icc_profile") if im.mode in ("RGB", "RGBA", "L") else None
    ImageOps.exif_transpose(im, in_place=True)  # our own decoded copy: no need for another
    img = _to_8bit(im)
    if target is not None and img.size != target:
        if img.mode in ("1", "P"):
            img = img.convert("RGBA" if _has_alpha(img) else "RGB")
        img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out_fmt = "PNG" if fmt == "HEIC" and _has_alpha(img) else _REENCODE_AS[fmt]
    data, sent_fmt, img = _encode_within_budget(img, out_fmt, icc, ref)
    return data, sent_fmt, img.size


def _prepared(ref: str, header: _Header, raw: bytes, data: bytes, sent_fmt: str, sent: tuple[int, int],
              high_resolution: bool) -> PreparedImage:
    return PreparedImage(
        ref=ref, format=header.fmt, mime=MIME[sent_fmt], width=header.width, height=header.height,
        bytes=len(raw), sent_width=sent[0], sent_height=sent[1], data=data,
        tokens=image_tokens(sent[0], sent[1], high_resolution), sha256=hashlib.sha256(raw).hexdigest(),
    )


# -- a job's images ----------------------------------------------------------------------------
def _fetch_and_prepare(ref: str, fetcher: ImageFetcher, high_resolution: bool) -> PreparedImage:
    return prepare_image(ref, fetcher.fetch(ref), high_resolution=high_resolution)


def prepare_images(refs: Sequence[str], fetcher: ImageFetcher, *, high_resolution: bool,
                   executor: Executor | None = None) -> list[PreparedImage]:
    """Fetch and validate all images concurrently (a repeated ref once); results in input order.

    Raises the ImageError of the first failing image in input order.
    """
    unique = list(dict.fromkeys(refs))
    if not unique:
        return []
    if len(unique) == 1 and executor is None:
        one = _fetch_and_prepare(unique[0], fetcher, high_resolution)
        return [one for _ in refs]
    own = executor is None
    pool: Executor = executor or ThreadPoolExecutor(min(16, len(unique)), thread_name_prefix="qvq-images")
    futures: dict[str, Future[PreparedImage]] = {
        ref: pool.submit(_fetch_and_prepare, ref, fetcher, high_resolution) for ref in unique
    }
    try:
        done = {ref: futures[ref].result() for ref in unique}
    except BaseException:
        for future in futures.values():
            future.cancel()  # the job fails anyway: do not start the images still queued
        if own:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    if own:
        pool.shutdown(wait=True)
    return [done[ref] for ref in refs]
