"""The messages sent to QVQ and the token budget.

A conversation's history goes as the vendor keeps it: every earlier user turn whole, its images
included, then its answer as the assistant's message; never the reasoning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from contracts.catalog import model_info
from contracts.errors import ImageError
from contracts.tokens import estimate_text_tokens


class SendableImage(Protocol):
    @property
    def tokens(self) -> int: ...

    def data_url(self) -> str: ...


@dataclass(frozen=True)
class Turn:
    """An earlier turn of the conversation, ready to send: its question, its images, its answer."""

    prompt: str
    images: Sequence[SendableImage]
    answer: str

    @property
    def tokens(self) -> int:
        return sum(image.tokens for image in self.images) + estimate_text_tokens(self.prompt + self.answer)


def build_messages(
    prompt: str, images: Sequence[SendableImage], history: Sequence[Turn] = (),
    url_for: Callable[[Any], str] | None = None,
) -> list[dict[str, Any]]:
    """The chat messages; each image goes as `url_for(image)`, by default its base64 data URL."""
    url_for = url_for or (lambda image: image.data_url())
    messages: list[dict[str, Any]] = []
    for turn in history:
        messages.append({"role": "user", "content": _user_content(turn.prompt, turn.images, url_for)})
        messages.append({"role": "assistant", "content": turn.answer})
    messages.append({"role": "user", "content": _user_content(prompt, images, url_for)})
    return messages


def _user_content(prompt: str, images: Sequence[SendableImage], url_for: Callable[[Any], str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url_for(image)}} for image in images]
    parts.append({"type": "text", "text": prompt})
    return parts


def check_token_budget(model: str, prompt: str, images: Sequence[SendableImage], history: Sequence[Turn] = ()) -> int:
    """Estimated input tokens, history included; refuses before the call when the job cannot fit the
    model's max input (naming the earlier turn from which the history alone does not fit)."""
    limit = model_info(model).max_input
    history_tokens = 0
    for number, turn in enumerate(history, start=1):
        history_tokens += turn.tokens
        if history_tokens > limit:
            raise ImageError(
                f"the conversation's history does not fit {model}'s maximum input of {limit} tokens from turn "
                f"{number} on (about {history_tokens} tokens with its images); start a new conversation",
                code="images.token_budget_exceeded")
    image_tokens = sum(image.tokens for image in images)
    estimate = history_tokens + image_tokens + estimate_text_tokens(prompt)
    if estimate > limit:
        earlier = f", with {len(history)} earlier turn(s) of {history_tokens} tokens" if history else ""
        raise ImageError(
            f"the job needs about {estimate} input tokens ({image_tokens} for {len(images)} image(s){earlier}), "
            f"over {model}'s maximum input of {limit}; send fewer or smaller images",
            code="images.token_budget_exceeded",
        )
    return estimate
