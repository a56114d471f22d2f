"""Validation, resizing and token counting of images (issue 3): every rule has a case here."""

from __future__ import annotations

import base64
import io
import threading
import time
import tracemalloc
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from contracts.errors import ImageError
from contracts.image_formats import SNIFF_BYTES, unsupported_reason
from contracts.tokens import PATCH, RECOMMENDED_MAX_PIXELS, image_tokens, scaled_size, token_cap
from tests import imagegen as gen
from worker.intake.images import (
    HIGH_RES_MAX_PIXELS,
    MAX_BASE64_BYTES,
    MAX_PIXELS,
    MIME,
    PreparedImage,
    prepare_image,
    prepare_images,
    sniff_format,
)
from worker.intake.memory import MemoryBudget

MB10 = 10 * 1024 * 1024


def decode_sent(image: PreparedImage) -> Image.Image:
    """The image the model will see, decoded from what we send; checks it is one valid frame."""
    im = Image.open(io.BytesIO(image.data))
    assert MIME[{"HEIF": "HEIC"}.get(im.format or "", im.format or "")] == image.mime
    assert getattr(im, "n_frames", 1) == 1
    im.load()
    assert im.size == (image.sent_width, image.sent_height)
    assert im.mode in {"1", "L", "LA", "P", "RGB", "RGBA"}
    return im


def assert_sendable(image: PreparedImage, high_resolution: bool) -> None:
    decode_sent(image)
    assert len(base64.b64encode(image.data)) <= MAX_BASE64_BYTES
    assert image.tokens == image_tokens(image.sent_width, image.sent_height, high_resolution)
    if not high_resolution:
        assert image.sent_width * image.sent_height <= RECOMMENDED_MAX_PIXELS


# -- the six formats ---------------------------------------------------------------------------
@pytest.mark.parametrize(("fmt", "mime"), [
    ("PNG", "image/png"), ("JPEG", "image/jpeg"), ("BMP", "image/bmp"), ("TIFF", "image/tiff"),
    ("WEBP", "image/webp"), ("HEIC", "image/heic"),
])
def test_each_accepted_format_is_detected_with_its_mime_and_sent_untouched(fmt: str, mime: str) -> None:
    raw = gen.make_image(fmt, size=(64, 48))
    image = prepare_image(f"img.{fmt.lower()}", raw, high_resolution=False)
    assert (image.format, image.mime) == (fmt, mime)
    assert (image.width, image.height, image.sent_width, image.sent_height) == (64, 48, 64, 48)
    assert image.data is raw
    assert image.bytes == len(raw)
    assert image.data_url() == f"data:{mime};base64,{base64.b64encode(raw).decode()}"
    assert_sendable(image, False)


# -- the table of bad and edge cases -----------------------------------------------------------
@dataclass(frozen=True)
class Case:
    make: Callable[[], bytes]
    expect: str  # "ok" or an error code
    high_resolution: bool = False
    check: Callable[[PreparedImage], None] | None = None
    ref: str = "image"


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _is_untouched(image: PreparedImage) -> None:
    assert image.bytes == len(image.data)
    assert (image.sent_width, image.sent_height) == (image.width, image.height)


def _check_png16(image: PreparedImage) -> None:
    assert image.mime == "image/png" and image.data[24] == 8  # re-encoded with 8 bits per channel


def _check_png16_gray(image: PreparedImage) -> None:
    _check_png16(image)
    assert decode_sent(image).getpixel((5, 5)) == 40000 // 256  # scaled, not clipped to 255


def _check_cmyk(image: PreparedImage) -> None:
    assert image.mime == "image/jpeg" and decode_sent(image).mode == "RGB"


def _check_palette(image: PreparedImage) -> None:
    _is_untouched(image)
    im = decode_sent(image)
    assert im.mode == "P" and "transparency" in im.info


def _check_first_frame(first_colour: tuple[int, int, int]) -> Callable[[PreparedImage], None]:
    def check(image: PreparedImage) -> None:
        assert image.mime in ("image/webp", "image/png")
        assert image.bytes != len(image.data)  # re-encoded as a single frame
        pixel = decode_sent(image).convert("RGB").getpixel((10, 10))
        assert all(abs(a - b) <= 8 for a, b in zip(pixel, first_colour, strict=True)), pixel

    return check


def _check_rotated_large(image: PreparedImage) -> None:
    assert (image.width, image.height) == (1200, 2400)
    assert image.sent_height > image.sent_width
    assert image.sent_width * image.sent_height <= RECOMMENDED_MAX_PIXELS


def _check_rotated(mime: str) -> Callable[[PreparedImage], None]:
    def check(image: PreparedImage) -> None:
        assert (image.width, image.height) == (40, 80)  # stored 80x40, EXIF orientation 6
        assert (image.sent_width, image.sent_height) == (40, 80)
        im = decode_sent(image).convert("RGB")
        # The yellow band on the stored image's left is on top once upright (90 degrees clockwise).
        top, bottom = im.getpixel((20, 5)), im.getpixel((20, 75))
        assert top[0] > 200 and top[1] > 200 and top[2] < 80, top
        assert bottom[2] > 200 and bottom[0] < 80, bottom
        assert image.mime == mime
        assert (Image.open(io.BytesIO(image.data)).getexif().get(0x0112) or 1) == 1

    return check


def _check_downscaled(image: PreparedImage) -> None:
    assert (image.width, image.height) == (4000, 3000)
    assert image.sent_width * image.sent_height <= RECOMMENDED_MAX_PIXELS
    assert image.sent_width * image.sent_height > 0.99 * RECOMMENDED_MAX_PIXELS
    assert abs(image.sent_width / image.sent_height - 4 / 3) < 0.01
    assert image.mime == "image/jpeg"


def _check_high_res(image: PreparedImage) -> None:
    _is_untouched(image)
    assert image.tokens == image_tokens(4000, 3000, True) > 1280


def _check_high_res_cap(image: PreparedImage) -> None:
    assert (image.width, image.height) == (3000, 4800)
    assert image.sent_width * image.sent_height <= HIGH_RES_MAX_PIXELS
    assert image.sent_width * image.sent_height > 0.99 * HIGH_RES_MAX_PIXELS
    assert image.tokens <= 16384 + 2


def _check_downscaled_keeps_alpha(image: PreparedImage) -> None:
    assert image.mime == "image/png" and decode_sent(image).mode == "RGBA"
    assert image.sent_width * image.sent_height <= RECOMMENDED_MAX_PIXELS


def _check_reencoded_within_budget(mime: str) -> Callable[[PreparedImage], None]:
    def check(image: PreparedImage) -> None:
        assert image.mime == mime
        assert len(base64.b64encode(image.data)) <= MAX_BASE64_BYTES
        assert image.bytes > 0.75 * MB10  # the original did not fit as base64

    return check


def _check_size(width: int, height: int) -> Callable[[PreparedImage], None]:
    def check(image: PreparedImage) -> None:
        assert (image.width, image.height) == (width, height)

    return check


def _check_sent_as(mime: str) -> Callable[[PreparedImage], None]:
    def check(image: PreparedImage) -> None:
        assert image.mime == mime

    return check


CASES: dict[str, Case] = {
    # wrong formats, whatever the name says
    "gif": Case(gen.gif, "image.unsupported_format", ref="cat.png"),
    "svg": Case(gen.svg, "image.unsupported_format", ref="drawing.png"),
    "pdf": Case(gen.pdf, "image.unsupported_format", ref="scan.jpg"),
    "ico": Case(gen.ico, "image.unsupported_format", ref="favicon.bmp"),
    "avif": Case(gen.avif, "image.unsupported_format", ref="photo.heic"),
    "text": Case(gen.text, "image.unsupported_format", ref="notes.png"),
    "empty": Case(lambda: gen.EMPTY, "image.unsupported_format"),
    "random bytes": Case(lambda: bytes(range(256)) * 4, "image.unsupported_format"),
    "text starting like a BMP": Case(lambda: b"BMW drivers: a list of names and notes\n" * 3, "image.unsupported_format",
                                     ref="cars.bmp"),
    # corrupt
    "truncated png": Case(lambda: gen.truncated(gen.noise_image("PNG", (200, 150), seed=1)), "image.corrupt"),
    "truncated jpeg": Case(lambda: gen.truncated(gen.gradient_image("JPEG", (400, 300))), "image.corrupt"),
    "png magic only": Case(lambda: gen.make_image("PNG")[:20], "image.corrupt"),
    "png bad crc": Case(lambda: _flip_byte(gen.make_image("PNG"), 40), "image.corrupt"),
    "truncated tiff": Case(lambda: gen.truncated(gen.noise_image("TIFF", (100, 100), seed=2)), "image.corrupt"),
    "truncated webp": Case(lambda: gen.truncated(gen.noise_image("WEBP", (100, 100), seed=3)), "image.corrupt"),
    "truncated heic": Case(lambda: gen.truncated(gen.heic((128, 96))), "image.corrupt"),
    "truncated bmp": Case(lambda: gen.truncated(gen.make_image("BMP", (100, 100))), "image.corrupt"),
    # bytes
    "exactly 10 MB": Case(lambda: gen.padded_png(MB10), "ok", check=_check_sent_as("image/png")),
    "just over 10 MB": Case(lambda: gen.padded_png(MB10 + 1), "image.too_large"),
    # geometry
    "10x11": Case(lambda: gen.make_image("PNG", (10, 11)), "image.too_small"),
    "11x10": Case(lambda: gen.make_image("PNG", (11, 10)), "image.too_small"),
    "11x11": Case(lambda: gen.make_image("PNG", (11, 11)), "ok", check=_is_untouched),
    "201:1": Case(lambda: gen.make_image("PNG", (2211, 11)), "image.bad_aspect_ratio"),
    "1:201": Case(lambda: gen.make_image("PNG", (11, 2211)), "image.bad_aspect_ratio"),
    "200:1": Case(lambda: gen.make_image("PNG", (2200, 11)), "ok", check=_is_untouched),
    "1:200": Case(lambda: gen.make_image("PNG", (11, 2200)), "ok", check=_is_untouched),
    "geometry checked before decoding (aspect)": Case(lambda: gen.bomb_png(100_000, 11), "image.bad_aspect_ratio"),
    "geometry checked before decoding (small)": Case(lambda: gen.bomb_png(5, 5000), "image.too_small"),
    "wide and large 200:1": Case(lambda: gen.make_image("PNG", (28000, 140)), "ok"),
    # pixels
    "bomb 60000x60000": Case(gen.bomb_png, "image.too_many_pixels"),
    "bomb jpeg": Case(lambda: gen.bomb("JPEG"), "image.too_many_pixels"),
    "bomb bmp": Case(lambda: gen.bomb("BMP"), "image.too_many_pixels"),
    "bomb tiff": Case(lambda: gen.bomb("TIFF"), "image.too_many_pixels"),
    "bomb webp": Case(lambda: gen.bomb("WEBP", 16384, 16384), "image.too_many_pixels"),
    "bomb heic": Case(lambda: gen.bomb("HEIC"), "image.too_many_pixels"),
    "bomb just over the limit": Case(lambda: gen.bomb_png(10000, 8948), "image.too_many_pixels"),
    "bomb tall": Case(lambda: gen.bomb_png(2000, 100000), "image.too_many_pixels"),
    "large jpeg downscaled": Case(lambda: gen.gradient_image("JPEG", (4000, 3000)), "ok", check=_check_downscaled),
    "large jpeg high resolution": Case(lambda: gen.gradient_image("JPEG", (4000, 3000)), "ok", True,
                                       _check_high_res),
    "large rgba png downscaled": Case(lambda: gen.make_image("PNG", (2000, 1500), (0, 0, 255, 128), mode="RGBA"),
                                      "ok", check=_check_downscaled_keeps_alpha),
    "large heic becomes jpeg": Case(lambda: gen.gradient_image("HEIC", (1600, 1200)), "ok",
                                    check=_check_sent_as("image/jpeg")),
    "large bmp becomes png": Case(lambda: gen.make_image("BMP", (1600, 1200)), "ok", check=_check_sent_as("image/png")),
    "large tiff becomes png": Case(lambda: gen.make_image("TIFF", (1600, 1200)), "ok",
                                   check=_check_sent_as("image/png")),
    "large webp stays webp": Case(lambda: gen.gradient_image("WEBP", (1600, 1200)), "ok",
                                  check=_check_sent_as("image/webp")),
    # content, not name
    "png named .jpg": Case(lambda: gen.make_image("PNG"), "ok", check=_check_sent_as("image/png"), ref="photo.jpg"),
    "jpeg named .png": Case(lambda: gen.make_image("JPEG"), "ok", check=_check_sent_as("image/jpeg"),
                            ref="s3://b/x.png"),
    # modes and frames the model may not read as they are
    "16-bit rgb png": Case(gen.png16_rgb, "ok", check=_check_png16),
    "16-bit gray png": Case(gen.png16_gray, "ok", check=_check_png16_gray),
    "cmyk jpeg": Case(gen.cmyk_jpeg, "ok", check=_check_cmyk),
    "palette png with transparency": Case(gen.palette_png_with_transparency, "ok", check=_check_palette),
    "grayscale+alpha png": Case(lambda: gen.make_image("PNG", (64, 48), (100, 50), mode="LA"), "ok",
                                check=_is_untouched),
    "1-bit tiff": Case(lambda: gen.make_image("TIFF", (64, 48), 1, mode="1"), "ok", check=_is_untouched),
    "animated webp": Case(gen.animated_webp, "ok", check=_check_first_frame((0, 0, 255))),
    "multi-page tiff": Case(gen.multipage_tiff, "ok", check=_check_first_frame((0, 0, 0))),
    "exif-rotated jpeg": Case(gen.exif_rotated_jpeg, "ok", check=_check_rotated("image/jpeg")),
    "exif-rotated png": Case(lambda: gen.exif_rotated("PNG"), "ok", check=_check_rotated("image/png")),
    "exif-rotated webp": Case(lambda: gen.exif_rotated("WEBP"), "ok", check=_check_rotated("image/webp")),
    "exif-rotated tiff": Case(lambda: gen.exif_rotated("TIFF"), "ok", check=_check_rotated("image/png")),
    "exif-rotated heic": Case(lambda: gen.exif_rotated("HEIC"), "ok", check=_check_size(40, 80)),
    "re-encoded high resolution capped at 16384 tokens": Case(lambda: gen.exif_rotated("JPEG", (4800, 3000)), "ok",
                                                              True, _check_high_res_cap),
    "exif-rotated large jpeg downscaled": Case(lambda: gen.exif_rotated_jpeg((2400, 1200), 8), "ok",
                                               check=_check_rotated_large),
    # base64 budget: sent as-is would be over 10 MB of base64
    "bmp over the base64 budget": Case(lambda: gen.make_image("BMP", (1700, 1600)), "ok", True,
                                       _check_reencoded_within_budget("image/png")),
    "noise png over the base64 budget": Case(lambda: gen.noise_image("PNG", (1800, 1600), seed=4), "ok", True,
                                             _check_reencoded_within_budget("image/jpeg")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_validation_table(name: str) -> None:
    case = CASES[name]
    raw = case.make()
    if case.expect == "ok":
        image = prepare_image(case.ref, raw, high_resolution=case.high_resolution)
        assert_sendable(image, case.high_resolution)
        if case.check:
            case.check(image)
        return
    with pytest.raises(ImageError) as caught:
        prepare_image(case.ref, raw, high_resolution=case.high_resolution)
    assert caught.value.code == case.expect, caught.value.message
    assert caught.value.ref == case.ref
    assert case.ref in str(caught.value)  # the message says which image


def test_errors_say_why() -> None:
    with pytest.raises(ImageError, match=r"10x11 px: width and height must both be greater than 10 px"):
        prepare_image("tiny.png", gen.make_image("PNG", (10, 11)), high_resolution=False)
    with pytest.raises(ImageError, match="GIF is not an accepted format"):
        prepare_image("cat.png", gen.gif(), high_resolution=False)
    with pytest.raises(ImageError, match="aspect ratio over 200:1"):
        prepare_image("strip.png", gen.make_image("PNG", (2211, 11)), high_resolution=False)


def test_sniffing_is_by_content() -> None:
    assert sniff_format(gen.make_image("PNG")) == "PNG"
    assert sniff_format(gen.heic()) == "HEIC"
    assert sniff_format(gen.avif()) is None
    assert sniff_format(gen.gif()) is None
    assert sniff_format(b"BMW is a car, not a bitmap") is None  # "BM" alone is not a BMP header


def test_the_cli_refuses_what_the_worker_refuses_from_the_same_first_bytes() -> None:
    # The CLI checks a local file's head (SNIFF_BYTES) before queueing; it must agree with the worker.
    samples = {"png": gen.make_image("PNG"), "heic": gen.heic(), "gif": gen.gif(), "avif": gen.avif(),
               "text": b"shopping list", "empty": b""}
    for name, raw in samples.items():
        worker_refuses = False
        try:
            prepare_image(name, raw, high_resolution=False)
        except ImageError as exc:
            worker_refuses = exc.code == "image.unsupported_format"
        assert (unsupported_reason(raw[:SNIFF_BYTES]) is not None) == worker_refuses, name


# -- decompression bombs -------------------------------------------------------------------------
def test_bomb_is_refused_from_the_header_without_decoding() -> None:
    bomb = gen.bomb_png(60000, 60000)
    assert len(bomb) < 200
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageError) as caught:
            prepare_image("bomb.png", bomb, high_resolution=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.code == "image.too_many_pixels"
    assert time.perf_counter() - started < 2
    assert peak < 5 * 1024 * 1024  # decoding would need 10 GB


def test_bomb_is_refused_even_when_pillow_warnings_are_ignored() -> None:
    # Production does not turn warnings into errors: our own header check must refuse it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError) as caught:
            prepare_image("bomb.png", gen.bomb_png(10000, 8948), high_resolution=False)
    assert caught.value.code == "image.too_many_pixels"
    assert "89,478,485" in caught.value.message


def test_an_image_at_the_pixel_limit_is_not_a_bomb() -> None:
    assert MAX_PIXELS >= 9459 * 9459
    # Refused for another reason (its pixel data is missing), not as a bomb: the limit is inclusive.
    with pytest.raises(ImageError) as caught:
        prepare_image("big.png", gen.bomb_png(9459, 9459), high_resolution=True)
    assert caught.value.code == "image.corrupt"


# -- downscaling and tokens ----------------------------------------------------------------------
def test_just_over_the_recommended_pixels_is_downscaled_and_at_it_is_not() -> None:
    at = gen.make_image("PNG", (1120, 896))  # exactly 1,003,520 px
    assert prepare_image("at.png", at, high_resolution=False).data is at
    over = prepare_image("over.png", gen.make_image("PNG", (1121, 896)), high_resolution=False)
    assert over.sent_width * over.sent_height <= RECOMMENDED_MAX_PIXELS
    assert (over.width, over.height) == (1121, 896)


def test_tokens_count_the_sent_size() -> None:
    image = prepare_image("big.jpg", gen.gradient_image("JPEG", (4000, 3000)), high_resolution=False)
    assert image.tokens == image_tokens(image.sent_width, image.sent_height, False) <= 1280 + 2
    assert image.summary() == {
        "ref": "big.jpg", "format": "JPEG", "width": 4000, "height": 3000, "bytes": image.bytes,
        "sent_width": image.sent_width, "sent_height": image.sent_height, "tokens": image.tokens,
        "sha256": image.sha256,
    }
    assert len(image.sha256) == 64


def test_vendor_table() -> None:
    assert scaled_size(1280, 1280) == (980, 980)
    assert image_tokens(1280, 1280) == 1227
    assert image_tokens(1288, 1288, high_resolution=True) == 2118
    assert scaled_size(1024, 406) == (1036, 392)  # 406/28 = 14.5 rounds half to even: 14
    assert image_tokens(1024, 406) - 2 == 518 and image_tokens(1024, 406) == 520


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 30000), st.integers(1, 30000), st.booleans())
def test_scaled_size_stays_within_the_cap_in_multiples_of_28(width: int, height: int, high: bool) -> None:
    w, h = scaled_size(width, height, high)
    assert w % PATCH == 0 and h % PATCH == 0
    assert w >= PATCH and h >= PATCH
    assert (w // PATCH) * (h // PATCH) <= token_cap(high)
    assert image_tokens(width, height, high) >= 4 + 2


# -- a job's images --------------------------------------------------------------------------------
class FakeFetcher:
    """Bytes by ref, an optional delay per ref; counts the fetches."""

    def __init__(self, files: dict[str, bytes], delays: dict[str, float] | None = None) -> None:
        self.files, self.delays = files, delays or {}
        self.calls: list[str] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def fetch(self, ref: str) -> bytes:
        with self._lock:
            self.calls.append(ref)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delays.get(ref, 0.0))
            if ref not in self.files:
                raise ImageError("no such object", code="image.not_found", ref=ref)
            return self.files[ref]
        finally:
            with self._lock:
                self.active -= 1


def _fetcher(**delays: float) -> FakeFetcher:
    files = {
        "a.png": gen.make_image("PNG", (64, 48)), "b.jpg": gen.make_image("JPEG", (100, 50)),
        "c.webp": gen.make_image("WEBP", (30, 30)), "tiny.png": gen.make_image("PNG", (5, 5)),
        "anim.gif": gen.gif(),
    }
    return FakeFetcher(files, {k.replace("_", "."): v for k, v in delays.items()})


def test_prepare_images_keeps_input_order_and_fetches_a_repeated_ref_once() -> None:
    fetcher = _fetcher(a_png=0.1)
    images = prepare_images(["a.png", "b.jpg", "a.png", "c.webp"], fetcher, high_resolution=False)
    assert [i.ref for i in images] == ["a.png", "b.jpg", "a.png", "c.webp"]
    assert [i.format for i in images] == ["PNG", "JPEG", "PNG", "WEBP"]
    assert sorted(fetcher.calls) == ["a.png", "b.jpg", "c.webp"]
    assert images[0] is images[2]


def test_prepare_images_fetches_concurrently() -> None:
    fetcher = _fetcher(a_png=0.5, b_jpg=0.5, c_webp=0.5)
    prepare_images(["a.png", "b.jpg", "c.webp"], fetcher, high_resolution=False)
    assert fetcher.max_active == 3


def test_prepare_images_raises_the_first_error_in_input_order() -> None:
    # tiny.png fails slowly, anim.gif fails at once: the error of the earlier ref wins.
    fetcher = _fetcher(tiny_png=0.2)
    with pytest.raises(ImageError) as caught:
        prepare_images(["a.png", "tiny.png", "anim.gif", "missing.png"], fetcher, high_resolution=False)
    assert (caught.value.code, caught.value.ref) == ("image.too_small", "tiny.png")


def test_prepare_images_uses_the_given_executor() -> None:
    fetcher = _fetcher()
    names: list[str] = []
    real = prepare_image

    with ThreadPoolExecutor(2, thread_name_prefix="shared-pool") as pool:
        def spy(ref: str, raw: bytes, *, high_resolution: bool) -> Any:
            names.append(threading.current_thread().name)
            return real(ref, raw, high_resolution=high_resolution)

        import worker.intake.images as images_module

        original = images_module.prepare_image
        images_module.prepare_image = spy  # type: ignore[assignment]
        try:
            prepare_images(["a.png", "b.jpg"], fetcher, high_resolution=False, executor=pool)
        finally:
            images_module.prepare_image = original
    assert names and all(n.startswith("shared-pool") for n in names)


def test_prepare_images_with_one_ref_and_none() -> None:
    fetcher = _fetcher()
    assert prepare_images([], fetcher, high_resolution=False) == []
    images = prepare_images(["a.png", "a.png"], fetcher, high_resolution=True)
    assert len(images) == 2 and fetcher.calls == ["a.png"]


def test_many_images_validate_in_parallel_threads_safely() -> None:
    files = {f"img{i}.{fmt.lower()}": gen.make_image(fmt, (64 + i, 48 + i))
             for i, fmt in enumerate(["PNG", "JPEG", "BMP", "TIFF", "WEBP", "HEIC"] * 5)}
    images = prepare_images(list(files), FakeFetcher(files), high_resolution=False)
    assert [(i.width, i.height) for i in images] == [(64 + n, 48 + n) for n in range(30)]


def test_memory_budget_makes_big_decodes_wait_their_turn() -> None:
    budget = MemoryBudget(100)
    inside: list[int] = []
    most = 0
    lock = threading.Lock()

    def decode(cost: int) -> None:
        nonlocal most
        with budget.reserve(cost):
            with lock:
                inside.append(cost)
                most = max(most, sum(inside))
            time.sleep(0.05)
            with lock:
                inside.remove(cost)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(decode, [60, 60, 60, 30, 10, 100]))  # 100 is the whole budget: it runs alone
    assert most <= 100 and budget.used == 0 and budget.peak == most


def test_an_image_over_the_whole_memory_budget_is_refused() -> None:
    budget = MemoryBudget(100 << 20)
    with pytest.raises(ImageError) as refused, budget.reserve(101 << 20, "s3://b/huge.png"):
        pass
    assert refused.value.code == "image.too_many_pixels" and "QVQ_DECODE_MEMORY_MB" in refused.value.message
    assert budget.used == 0


def test_images_wait_for_room_in_a_budget_of_one_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.intake.images as images_module

    one_decode = 1200 * 904 * 4 * 2  # the largest of the four
    monkeypatch.setattr(images_module, "decode_budget", MemoryBudget(one_decode))
    files = {f"{i}.png": gen.make_image("PNG", (1200, 900 + i)) for i in range(4)}
    images = prepare_images(list(files), FakeFetcher(files), high_resolution=False)
    assert len(images) == 4 and images_module.decode_budget.used == 0
    assert images_module.decode_budget.peak <= one_decode


def test_big_decodes_give_their_memory_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps freed pages in its arenas: without malloc_trim, RSS stays at the peak of the decodes."""
    psutil = pytest.importorskip("psutil")
    import worker.intake.images as images_module
    import worker.intake.memory as memory_module

    if memory_module._malloc_trim is None:
        pytest.skip("not glibc")
    monkeypatch.setattr(images_module, "decode_budget", MemoryBudget(1 << 30))
    raw = gen.make_image("PNG", (6000, 6000), color=(10, 200, 30))
    process = psutil.Process()
    before = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with ThreadPoolExecutor(4) as pool:
        ready = list(pool.map(lambda i: prepare_image(f"{i}.png", raw, high_resolution=False), range(8)))
    done.set()
    sampler.join()
    assert all(image.sent_width * image.sent_height <= RECOMMENDED_MAX_PIXELS for image in ready)
    peak_mb, after_mb = (peak - before) / 2**20, (process.memory_info().rss - before) / 2**20
    assert peak_mb > 250  # three 36 MP decodes at once (the budget's 1 GiB)
    assert after_mb < peak_mb / 2, f"RSS still {after_mb:.0f} MB above where it started (peak {peak_mb:.0f} MB)"
