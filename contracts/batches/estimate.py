"""What a batch will cost, before a fen is spent: each object's pixel size from its first bytes (one
ranged GET of HEAD_BYTES, never the whole object), the service's token rule (contracts/tokens.py), and the
catalog's prices (contracts/catalog.py), as a min-max range in CNY.

    min  every image's tokens less TOKEN_SLACK, the question's text, and no output at all
    max  every image's tokens plus TOKEN_SLACK, a generous count of the text and the chat template, and
         the model's largest output (thinking + answer) for every item

An object whose header cannot be read this way (not in a bucket, a format whose size sits past the
first bytes, a read that failed) counts from the smallest to the largest image the service takes
(`unread` says how many).

A batch that runs (not a dry run, no `max_cost_cny`) reads at most SAMPLE (200) headers before it answers
(10,000 ranged reads would take longer than queuing 10,000 items): the others count from the smallest to
the largest image in the range, and at the sample's mean in `image_tokens` (`sampled` says how many were
read). The range is then wider, never wrong; a dry run reads every header.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal

from PIL import Image, UnidentifiedImageError

from contracts.catalog import MODELS, cost_decimal, money_text
from contracts.errors import ImageError
from contracts.object_store import OBJECT_SCHEMES, ObjectClients, scheme_of
from contracts.tokens import EXTRA_TOKENS, MIN_TOKENS, estimate_text_tokens, image_tokens, token_cap

SAMPLE = 200  # headers a run reads before it answers (a dry run reads all): 500 took 1 s of a 10 s submit
HEAD_BYTES = 64 * 1024  # JPEG's size marker follows its EXIF block, which is at most 64 KiB
HEAD_READERS = 16  # ranged reads in flight at once
TOKEN_SLACK = 0.1  # our downscale and the service's rounding move a count by a few percent at most
TEMPLATE_TOKENS = 64  # the chat template around the question


def pixel_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's first bytes, or None when they do not tell it."""
    try:
        with Image.open(io.BytesIO(head)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    return (width, height) if width > 0 and height > 0 else None


@dataclass
class Estimate:
    """A running estimate over a batch's items; `add` an item's image tokens (None: not read)."""

    model: str
    prompt: str
    high_resolution: bool
    items: int = 0
    image_tokens: int = 0
    image_tokens_min: int = 0
    image_tokens_max: int = 0
    unread: int = 0
    unsampled: int = 0  # not read (a run reads SAMPLE headers): bounded by the limits, at the sample's mean
    _read_tokens: int = 0
    _read: int = 0
    _text: tuple[int, int] = field(default=(0, 0), repr=False)

    def __post_init__(self) -> None:
        generous = estimate_text_tokens(self.prompt)
        self._text = (max(1, len(self.prompt) // 4), generous + TEMPLATE_TOKENS)

    def add(self, tokens: int | None) -> None:
        self.items += 1
        if tokens is None:
            self.unread += 1
            self.image_tokens += token_cap(self.high_resolution) + EXTRA_TOKENS
            self.image_tokens_min += MIN_TOKENS + EXTRA_TOKENS
            self.image_tokens_max += token_cap(self.high_resolution) + EXTRA_TOKENS
            return
        self._read += 1
        self._read_tokens += tokens
        self.image_tokens += tokens
        self.image_tokens_min += int(tokens * (1 - TOKEN_SLACK))
        self.image_tokens_max += int(tokens * (1 + TOKEN_SLACK)) + 1

    def add_unsampled(self) -> None:
        """An item whose header is not read (past the sample)."""
        self.items += 1
        self.unsampled += 1
        self.image_tokens_min += MIN_TOKENS + EXTRA_TOKENS
        self.image_tokens_max += token_cap(self.high_resolution) + EXTRA_TOKENS

    @property
    def point_tokens(self) -> int:
        """The image tokens expected: the read ones, and the sample's mean for each unread one."""
        mean = self._read_tokens / self._read if self._read else token_cap(self.high_resolution) + EXTRA_TOKENS
        return self.image_tokens + round(mean * self.unsampled)

    @property
    def cost_min(self) -> Decimal:
        return cost_decimal(self.model, self.image_tokens_min + self.items * self._text[0], 0)["total"]

    @property
    def cost_max(self) -> Decimal:
        info = MODELS[self.model]
        output = self.items * (info.max_thinking + info.max_answer)
        return cost_decimal(self.model, self.image_tokens_max + self.items * self._text[1], output)["total"]

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"image_tokens": self.point_tokens, "cost_cny_min": money_text(self.cost_min),
                                  "cost_cny_max": money_text(self.cost_max), "currency": "CNY", "unread": self.unread}
        if self.unsampled:
            out["sampled"] = self.items - self.unsampled
        return out


class HeaderReader:
    """Image tokens of many objects, read HEAD_READERS at a time (boto3's clients are thread-safe)."""

    def __init__(self, clients: ObjectClients, *, high_resolution: bool) -> None:
        self.clients = clients
        self.high_resolution = high_resolution
        self._pool = ThreadPoolExecutor(HEAD_READERS, thread_name_prefix="qvq-batch-head")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def tokens(self, refs: Iterable[str]) -> list[int | None]:
        """Each reference's image tokens (None: not read), in order."""
        return list(self._pool.map(self._tokens, refs))

    def _tokens(self, ref: str) -> int | None:
        if scheme_of(ref) not in OBJECT_SCHEMES:
            return None
        try:
            head, _size = self.clients.read_head(ref, HEAD_BYTES)
        except ImageError:
            return None
        size = pixel_size(head)
        return image_tokens(*size, self.high_resolution) if size else None
