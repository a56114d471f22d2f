"""The service's image resize rule (Qwen2-VL smart_resize, factor 28) and the token count it gives.

Used by the worker to budget a job before the call and by the emulator to report usage.
"""

from __future__ import annotations

import math

PATCH = 28
MIN_TOKENS = 4
DEFAULT_TOKEN_CAP = 1280
HIGH_RES_TOKEN_CAP = 16384
EXTRA_TOKENS = 2  # the vision start/end markers around each image
RECOMMENDED_MAX_PIXELS = DEFAULT_TOKEN_CAP * PATCH * PATCH  # 1,003,520


def token_cap(high_resolution: bool) -> int:
    return HIGH_RES_TOKEN_CAP if high_resolution else DEFAULT_TOKEN_CAP


def scaled_size(width: int, height: int, high_resolution: bool = False) -> tuple[int, int]:
    """(width, height) the service scales an image to: multiples of 28 within [4, cap] blocks."""
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    min_px = MIN_TOKENS * PATCH * PATCH
    max_px = token_cap(high_resolution) * PATCH * PATCH
    h_bar = max(PATCH, round(height / PATCH) * PATCH)
    w_bar = max(PATCH, round(width / PATCH) * PATCH)
    if h_bar * w_bar > max_px:
        beta = math.sqrt(height * width / max_px)
        h_bar = max(PATCH, math.floor(height / beta / PATCH) * PATCH)
        w_bar = max(PATCH, math.floor(width / beta / PATCH) * PATCH)
    elif h_bar * w_bar < min_px:
        beta = math.sqrt(min_px / (height * width))
        h_bar = math.ceil(height * beta / PATCH) * PATCH
        w_bar = math.ceil(width * beta / PATCH) * PATCH
    return w_bar, h_bar


def image_tokens(width: int, height: int, high_resolution: bool = False) -> int:
    """Tokens the service counts for one image: one per 28x28 block of the scaled image, plus 2."""
    w_bar, h_bar = scaled_size(width, height, high_resolution)
    return (w_bar // PATCH) * (h_bar // PATCH) + EXTRA_TOKENS


def estimate_text_tokens(text: str) -> int:
    """A deliberately generous estimate for budgeting (the service's count is authoritative).

    CJK characters are about one token each; other text about four characters a token.
    """
    cjk = sum(1 for ch in text if ord(ch) >= 0x2E80)
    return cjk + math.ceil((len(text) - cjk) / 3) + 4
