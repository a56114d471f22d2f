"""The messages sent to QVQ (history as prompts and answers only, never reasoning) and the token budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from contracts.catalog import model_info
from contracts.errors import ImageError
from contracts.tokens import estimate_text_tokens


class SendableImage(Protocol):
    @property
    def tokens(self) -> int: ...

    def data_url(self) -> str: ...


def build_messages(
    prompt: str, images: Sequence[SendableImage], history: Sequence[tuple[str, str]],
    url_for: Callable[[Any], str] | None = None,
) -> list[dict[str, Any]]:
    """The chat messages; each image goes as `url_for(image)`, by default its base64 data URL."""
    url_for = url_for or (lambda image: image.data_url())
    messages: list[dict[str, Any]] = []
    for past_prompt, past_answer in history:
        messages.append({"role": "user", "content": past_prompt})
        messages.append({"role": "assistant", "content": past_answer})
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": url_for(image)}} for image in images
    ]
    parts.append({"type": "text", "text": prompt})
    messages.append({"role": "user", "content": parts})
    return messages


def check_token_budget(
    model: str, prompt: str, images: Sequence[SendableImage], history: Sequence[tuple[str, str]]
) -> int:
    """Estimated input tokens; refuses before the call when the job cannot fit the model's max input."""
    image_tokens = sum(image.tokens for image in images)
    text = prompt + "".join(p + a for p, a in history)
    estimate = image_tokens + estimate_text_tokens(text)
    limit = model_info(model).max_input
    if estimate > limit:
        raise ImageError(
            f"the job needs about {estimate} input tokens ({image_tokens} for {len(images)} image(s)), "
            f"over {model}'s maximum input of {limit}; send fewer or smaller images",
            code="images.token_budget_exceeded",
        )
    return estimate
