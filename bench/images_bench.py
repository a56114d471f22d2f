"""Validation cost per format: time and peak memory of prepare_image for a ~10 MB image and for a bomb.

    python bench/images_bench.py [--target-mb 9.5] [--repeat 3]

Each measurement runs in a fresh (spawned) process. Two memory figures:
  py peak   tracemalloc's peak: allocations through Python (the bytes we hold and send)
  rss peak  the process's resident high-water mark above its level at the start (Linux: reset via
            /proc/self/clear_refs), which includes Pillow's and libheif's C buffers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import multiprocessing
import os
import re
import statistics
import sys
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from contracts.errors import ImageError  # noqa: E402
from tests import imagegen  # noqa: E402
from worker.intake.images import prepare_image  # noqa: E402
from worker.intake.memory import DECODE_MEMORY_BUDGET  # noqa: E402

FORMATS = ["JPEG", "PNG", "WEBP", "HEIC", "BMP", "TIFF"]
_SAVE = {"HEIC": "HEIF"}
_OPTS: dict[str, dict[str, Any]] = {"JPEG": {"quality": 92}, "WEBP": {"quality": 92}, "HEIC": {"quality": 90}}


def photo_like(size: tuple[int, int], seed: int = 7) -> Image.Image:
    """A gradient with grain: compresses like a photo rather than like flat colour or pure noise."""
    w, h = size
    x = Image.linear_gradient("L").resize((w, h))
    y = x.transpose(Image.Transpose.ROTATE_90).resize((w, h))
    base = Image.merge("RGB", (x, y, Image.new("L", (w, h), 128)))
    grain = Image.frombytes("RGB", (w, h), imagegen._seeded_bytes(w * h * 3, seed)).point(lambda v: v // 6)
    return Image.blend(base, grain, 0.35)


def encode(fmt: str, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    photo_like(size).save(out, _SAVE.get(fmt, fmt), **_OPTS.get(fmt, {}))
    return out.getvalue()


def image_near(fmt: str, target: int) -> bytes:
    """An image of ``fmt`` whose file is close to (and not over) ``target`` bytes, 4:3."""
    side = 400
    sample = len(encode(fmt, (side * 4 // 3, side)))
    data = b""
    for _ in range(4):
        scale = (target / sample) ** 0.5
        side = int(side * scale * 0.98)
        data = encode(fmt, (side * 4 // 3, side))
        sample = len(data)
        if 0.9 * target <= len(data) <= target:
            break
    return data


def _hwm_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def _rss_kb() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def measure(raw: bytes, high_resolution: bool) -> dict[str, Any]:
    """Runs in a child process: one prepare_image, timed and measured."""
    for fmt in FORMATS:  # warm up: Pillow loads its plugins and codecs on first use
        prepare_image("warm-up", imagegen.make_image(fmt, (64, 48)), high_resolution=False)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse shows in the RSS again
    can_reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        can_reset = False
    base = _rss_kb()
    tracemalloc.start()
    started = time.perf_counter()
    outcome: str
    try:
        image = prepare_image("bench", raw, high_resolution=high_resolution)
        outcome = f"{image.sent_width}x{image.sent_height} {image.mime.split('/')[1]}"
        if image.data is raw:
            outcome += " (as is)"
    except ImageError as exc:
        outcome = exc.code
    elapsed = time.perf_counter() - started
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = (_hwm_kb() - base) * 1024 if can_reset else -1
    return {"seconds": elapsed, "py_peak": py_peak, "rss_peak": rss, "outcome": outcome}


def run(raw: bytes, high_resolution: bool, repeat: int) -> dict[str, Any]:
    results = []
    ctx = multiprocessing.get_context("spawn")  # fork would reuse the parent's already-resident heap
    for _ in range(repeat):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            results.append(pool.submit(measure, raw, high_resolution).result())
    best = min(results, key=lambda r: r["seconds"])
    return {**best, "seconds": statistics.median(r["seconds"] for r in results)}


def _mb(n: int) -> str:
    return "n/a" if n < 0 else f"{n / 1e6:7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-mb", type=float, default=9.5, help="file size of the large images (MB, 1e6)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    target = int(args.target_mb * 1e6)

    print(f"Pillow {Image.__version__}, {os.cpu_count()} CPUs; median of {args.repeat} runs, each in a fresh process; "
          f"decode budget {DECODE_MEMORY_BUDGET / 2**30:g} GiB\n")
    header = f"{'format':<6} {'case':<22} {'pixels':>11} {'file MB':>8} {'ms':>8} {'py peak MB':>11} " \
             f"{'rss peak MB':>12}  outcome"
    print(header)
    print("-" * len(header))
    for fmt in FORMATS:
        raw = image_near(fmt, target)
        with Image.open(io.BytesIO(raw)) as im:
            pixels = im.width * im.height
            dims = f"{im.width}x{im.height}"
        for high in (False, True):
            r = run(raw, high, args.repeat)
            case = f"~10 MB {dims}" + (" hi-res" if high else "")
            print(f"{fmt:<6} {case:<22} {pixels:>11,} {len(raw) / 1e6:>8.2f} {r['seconds'] * 1000:>8.1f} "
                  f"{_mb(r['py_peak']):>11} {_mb(r['rss_peak']):>12}  {r['outcome']}")
        bomb = imagegen.bomb(fmt, 16384, 16384) if fmt == "WEBP" else imagegen.bomb(fmt)
        declared = "16384x16384" if fmt == "WEBP" else "60000x60000"
        r = run(bomb, False, args.repeat)
        n = 16384 * 16384 if fmt == "WEBP" else 60000 * 60000
        print(f"{fmt:<6} {'bomb ' + declared:<22} {n:>11,} {len(bomb) / 1e6:>8.4f} {r['seconds'] * 1000:>8.2f} "
              f"{_mb(r['py_peak']):>11} {_mb(r['rss_peak']):>12}  {r['outcome']}")


if __name__ == "__main__":
    main()
