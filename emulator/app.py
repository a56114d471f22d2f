"""The emulator's HTTP app: POST /v1/chat/completions, GET /v1/models, GET /_emulator/stats."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from contracts.catalog import MODELS
from contracts.tokens import estimate_text_tokens
from emulator import errors
from emulator.config import EmulatorConfig
from emulator.directives import parse_directives, strip_directives
from emulator.faults import ATTEMPT_HEADER, AttemptCounter, attempt_from_header, fault_for
from emulator.images import ImageInfo, describe_url
from emulator.ratelimit import RateLimit
from emulator.request import ChatRequest, parse_request
from emulator.script import write_script
from emulator.stats import Stats
from emulator.stream import Completion, hide_stream_cuts_in_uvicorn_log, sse_events

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EmulatorState:
    """Everything one emulator app holds: its settings, counters and the attempts it has seen."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.attempts = AttemptCounter()
        self.rate = RateLimit(config.rpm, config.tpm, self.stats)
        self.stopping = False

    def stop_streams(self) -> None:
        """Open streams end at once (the clients see a dropped connection) instead of holding shutdown."""
        self.stopping = True

    def is_stopping(self) -> bool:
        return self.stopping


def create_app(config: EmulatorConfig | None = None) -> FastAPI:
    state = EmulatorState(config or EmulatorConfig())
    hide_stream_cuts_in_uvicorn_log()
    app = FastAPI(title="QVQ emulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.emulator = state

    @app.exception_handler(errors.ApiError)
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.ApiError)
        state.stats.errors += 1
        return exc.response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state.stats.requests += 1
        arrived = state.rate.clock()
        return await _chat(state, await request.body(), request.headers.get(ATTEMPT_HEADER), arrived)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(name) for name in MODELS]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        if model not in MODELS:
            raise errors.model_not_found(model)
        return _model_card(model)

    @app.get("/_emulator/stats")
    async def stats() -> dict[str, int]:
        return state.stats.as_dict()

    @app.post("/_emulator/reset")
    async def reset() -> dict[str, int]:
        state.stats.reset()
        state.attempts.clear()
        state.rate = RateLimit(state.config.rpm, state.config.tpm, state.stats)
        return state.stats.as_dict()

    return app


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 1_742_860_800, "owned_by": "system"}


async def _chat(state: EmulatorState, body: bytes, attempt_header: str | None, arrived: float) -> Response:
    request = parse_request(body)
    raw_prompt = "\n".join(request.last_user.texts)
    directives = parse_directives(raw_prompt)
    config = directives.apply(state.config)
    header_attempt = attempt_from_header(attempt_header)
    counted_attempt = state.attempts.next_attempt(request.raw_messages)
    fault = fault_for(directives.faults, header_attempt or counted_attempt)
    http_error = fault.http_error(config.retry_after_s) if fault else None
    if http_error is not None:
        raise http_error

    infos = await asyncio.to_thread(_describe_images, request.all_image_urls)
    last_images = [infos[url] for url in request.last_user.image_urls]
    script = write_script(
        last_images, strip_directives(raw_prompt), config.reasoning_tokens, config.answer_tokens
    )
    counted = _usage(request, infos, script.completion_tokens)
    retry_after = state.rate.admit(counted["prompt_tokens"], arrived)
    if retry_after is not None:
        raise errors.rate_limited(retry_after)
    usage = counted if request.include_usage and not config.no_usage else None
    completion = Completion(request.model, script, usage, config, fault)
    return StreamingResponse(
        _charged(sse_events(completion, state.stats, state.is_stopping), state.rate, script.completion_tokens),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _charged(body: AsyncIterator[bytes], rate: RateLimit, output_tokens: int) -> AsyncIterator[bytes]:
    """The stream, then its output tokens charged to the rate limit (however it ended)."""
    try:
        async for data in body:
            yield data
    finally:
        rate.charge_output(output_tokens)


def _describe_images(urls: tuple[str, ...]) -> dict[str, ImageInfo]:
    return {url: describe_url(url) for url in dict.fromkeys(urls)}


def _usage(request: ChatRequest, images: dict[str, ImageInfo], completion_tokens: int) -> dict[str, Any]:
    """Every image of every message counts, each time it appears (history images are billed again)."""
    text_tokens = estimate_text_tokens(request.all_text)
    image_tokens = sum(images[url].tokens(request.high_resolution) for url in request.all_image_urls)
    prompt_tokens = text_tokens + image_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {"text_tokens": completion_tokens},
        "prompt_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
    }
