"""What the emulator sees in an image part: size and main colour (data URLs) or a remote stand-in.

Remote http(s) images are never fetched: they count as 1280x1280 for tokens.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import pillow_heif
from PIL import Image, ImageStat

from contracts.tokens import image_tokens
from emulator import errors

pillow_heif.register_heif_opener()

MAX_DATA_URL_CHARS = 10 * 1024 * 1024
MIN_SIDE = 10
MAX_ASPECT = 200
REMOTE_SIZE = (1280, 1280)

#: Reference colours; the nearest (RGB distance) to an image's mean colour names it.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (0, 0, 0)),
    ("white", (255, 255, 255)),
    ("gray", (128, 128, 128)),
    ("gray", (192, 192, 192)),
    ("red", (255, 0, 0)),
    ("red", (139, 0, 0)),
    ("orange", (255, 165, 0)),
    ("yellow", (255, 255, 0)),
    ("green", (0, 255, 0)),
    ("green", (0, 128, 0)),
    ("cyan", (0, 255, 255)),
    ("blue", (0, 0, 255)),
    ("blue", (0, 0, 128)),
    ("purple", (128, 0, 128)),
    ("magenta", (255, 0, 255)),
    ("pink", (255, 192, 203)),
    ("brown", (139, 69, 19)),
)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    colour: str | None = None  # None for a remote image
    hex: str | None = None
    url: str | None = None  # set for a remote image

    @property
    def remote(self) -> bool:
        return self.url is not None

    def tokens(self, high_resolution: bool) -> int:
        return image_tokens(self.width, self.height, high_resolution)


def colour_name(rgb: tuple[float, float, float]) -> str:
    def distance(ref: tuple[int, int, int]) -> float:
        return sum((a - b) ** 2 for a, b in zip(rgb, ref, strict=True))

    return min(PALETTE, key=lambda entry: distance(entry[1]))[0]


def describe_url(url: str) -> ImageInfo:
    if url.startswith(("http://", "https://")):
        return ImageInfo(*REMOTE_SIZE, url=url)
    if not url.startswith("data:"):
        raise errors.invalid_parameter(f"The image url is not a valid http(s) url or data url: {url[:60]!r}")
    if len(url) > MAX_DATA_URL_CHARS:
        raise errors.invalid_parameter("Exceeded limit on max bytes per data-uri item : 10485760")
    return _CACHE.get(url)


def _decode_data_url(url: str) -> ImageInfo:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise errors.invalid_parameter("The image data url must be data:<mime>;base64,<data>.")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.invalid_parameter("The image data url does not hold valid base64.") from exc
    width, height, mean = _measure(raw)
    _check_size(width, height)
    rounded = tuple(round(channel) for channel in mean)
    return ImageInfo(width, height, colour_name(mean), "#{:02x}{:02x}{:02x}".format(*rounded))


def _measure(raw: bytes) -> tuple[int, int, tuple[float, float, float]]:
    try:
        with Image.open(io.BytesIO(raw)) as img:
            width, height = img.size
            img.draft("RGB", (256, 256))  # JPEG decodes at a reduced scale; the mean barely moves
            mean = ImageStat.Stat(img.convert("RGB")).mean
    except Exception as exc:  # Pillow raises many kinds for a bad file, DecompressionBombError too
        raise errors.invalid_parameter(f"The image could not be decoded: {type(exc).__name__}.") from exc
    return width, height, (mean[0], mean[1], mean[2])


def _check_size(width: int, height: int) -> None:
    if width <= MIN_SIDE or height <= MIN_SIDE:
        raise errors.invalid_parameter(
            f"The image length and width do not meet the model restrictions. "
            f"[height:{height} or width:{width} must be larger than {MIN_SIDE}]"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise errors.invalid_parameter(
            f"The image length and width do not meet the model restrictions. "
            f"[aspect ratio of {width}x{height} must not exceed {MAX_ASPECT}:1]"
        )


class _InfoCache:
    """Recent data URLs by digest: benchmarks and multi-turn chats resend the same images."""

    def __init__(self, size: int = 256) -> None:
        self._items: OrderedDict[bytes, ImageInfo] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, url: str) -> ImageInfo:
        key = hashlib.sha256(url.encode()).digest()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        info = _decode_data_url(url)
        with self._lock:
            self._items[key] = info
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return info


_CACHE = _InfoCache()
