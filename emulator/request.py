"""A chat-completions request body, checked the way the service checks it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from contracts.catalog import MODELS, REFUSED_MODELS
from emulator import errors

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    texts: tuple[str, ...]
    image_urls: tuple[str, ...]


@dataclass(frozen=True)
class ChatRequest:
    model: str
    raw_messages: list[Any]
    messages: tuple[Message, ...]
    include_usage: bool
    high_resolution: bool

    @property
    def last_user(self) -> Message:
        return next(m for m in reversed(self.messages) if m.role == "user")

    @property
    def all_text(self) -> str:
        return "".join(text for m in self.messages for text in m.texts)

    @property
    def all_image_urls(self) -> tuple[str, ...]:
        return tuple(url for m in self.messages for url in m.image_urls)


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.invalid_parameter(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise errors.invalid_parameter("The request body must be a JSON object.")
    model = _check_model(data.get("model"))
    if data.get("stream") is not True:
        raise errors.stream_only()
    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise errors.invalid_parameter("messages must be a non-empty list.")
    messages = tuple(_parse_message(i, m) for i, m in enumerate(raw_messages))
    if not any(m.role == "user" for m in messages):
        raise errors.invalid_parameter("messages must contain a user message.")
    stream_options = data.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise errors.invalid_parameter("stream_options must be an object.")
    return ChatRequest(
        model=model,
        raw_messages=raw_messages,
        messages=messages,
        include_usage=stream_options.get("include_usage") is True,
        high_resolution=data.get("vl_high_resolution_images") is True,
    )


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model:
        raise errors.invalid_parameter("model is required.")
    if model in REFUSED_MODELS:
        error = errors.model_not_found(model)
        error.message = f"{error.message} {REFUSED_MODELS[model]}."
        raise error
    if model not in MODELS:
        raise errors.model_not_found(model)
    return model


def _parse_message(index: int, message: Any) -> Message:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise errors.invalid_parameter(f"messages[{index}] must be an object with role {', '.join(ROLES)}.")
    content = message.get("content")
    if isinstance(content, str):
        return Message(message["role"], (content,), ())
    if not isinstance(content, list):
        raise errors.invalid_parameter(f"messages[{index}].content must be a string or a list of parts.")
    texts: list[str] = []
    urls: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            urls.append(_image_url(index, part.get("image_url")))
        else:
            raise errors.invalid_parameter(
                f"messages[{index}].content holds a part that is neither text nor image_url: {str(part)[:80]}"
            )
    return Message(message["role"], tuple(texts), tuple(urls))


def _image_url(index: int, value: Any) -> str:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise errors.invalid_parameter(f"messages[{index}] has an image_url part without a url.")
    return url
