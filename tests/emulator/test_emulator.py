"""The emulator over real HTTP, read with the real openai SDK (and raw httpx where the exact bytes matter)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pillow_heif
import pytest
from PIL import Image

from contracts.catalog import MODELS
from contracts.tokens import estimate_text_tokens
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from tests.waiting import wait_until

RED_PROMPT = "What colour is this?"
MIME = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "HEIF": "image/heic",
}
pillow_heif.register_heif_opener()


@pytest.fixture(scope="module")
def server() -> Iterator[EmulatorServer]:
    with EmulatorServer() as srv:
        yield srv


@pytest.fixture()
def client(server: EmulatorServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url, api_key="x", max_retries=0) as c:
        yield c


def data_url(width: int, height: int, colour: str = "red", fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, fmt)
    return f"data:{MIME[fmt]};base64,{base64.b64encode(buf.getvalue()).decode()}"


def user(text: str, *urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def unique(text: str = "") -> str:
    """A prompt no other test sends, so the emulator's attempt counter starts at 1."""
    return f"{text} ({uuid.uuid4().hex[:8]})"


def stream(client: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    kwargs.setdefault("stream_options", {"include_usage": True})
    return client.chat.completions.create(model="qvq-max", messages=messages, stream=True, **kwargs)  # type: ignore[arg-type]


def collect(client: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    reasoning, answer, usage, chunks = "", "", None, []
    for chunk in stream(client, messages, **kwargs):
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            answer += choice.delta.content or ""
    return {"reasoning": reasoning, "answer": answer, "usage": usage, "chunks": chunks}


def raw_events(server: EmulatorServer, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{server.url}/chat/completions", json=body) as r,
    ):
        lines = [line for line in r.iter_lines() if line]
    return r, lines


# --- the stream -----------------------------------------------------------------------------------


def test_stream_bytes_follow_the_documented_shape(server: EmulatorServer) -> None:
    body = {
        "model": "qvq-plus",
        "stream": True,
        "messages": [user("hi")],
        "stream_options": {"include_usage": True},
    }
    response, lines = raw_events(server, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    for c in chunks:
        assert c["id"].startswith("chatcmpl-") and c["object"] == "chat.completion.chunk"
        assert c["model"] == "qvq-plus" and c["system_fingerprint"] is None and isinstance(c["created"], int)
    assert len({c["id"] for c in chunks}) == 1
    first, *middle, closing, usage = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": None, "reasoning_content": ""},
            "finish_reason": None,
            "logprobs": None,
        }
    ]
    deltas = [c["choices"][0]["delta"] for c in middle]
    kinds = ["reasoning" if "reasoning_content" in d else "answer" for d in deltas]
    assert kinds == sorted(kinds, reverse=True)  # all thinking, then all answer
    assert kinds.count("reasoning") == 40 and kinds.count("answer") == 20  # the default minimums
    assert all(d["content"] is None for d in deltas if "reasoning_content" in d)
    assert all(c["choices"][0]["finish_reason"] is None for c in middle)
    assert closing["choices"][0]["finish_reason"] == "stop"
    assert closing["choices"][0]["delta"] == {"content": "", "reasoning_content": None}
    assert usage["choices"] == []
    assert set(usage["usage"]) == {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "completion_tokens_details",
        "prompt_tokens_details",
    }
    assert "x_sent_at" not in first


def test_usage_chunk_only_when_asked(server: EmulatorServer) -> None:
    _, lines = raw_events(server, {"model": "qvq-max", "stream": True, "messages": [user("hi")]})
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "stop"


def test_sdk_reads_reasoning_then_answer_and_usage(client: openai.OpenAI) -> None:
    result = collect(client, [user(RED_PROMPT, data_url(64, 48))])
    chunks = result["chunks"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert getattr(chunks[0].choices[0].delta, "reasoning_content", None) == ""
    assert getattr(chunks[-3].choices[0].delta, "reasoning_content", None) is None  # an answer chunk
    usage = result["usage"]
    tokens = len([c for c in chunks if c.choices and c.choices[0].finish_reason is None]) - 1
    assert usage.completion_tokens == tokens == 60
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details.text_tokens == tokens
    assert usage.prompt_tokens_details.text_tokens == estimate_text_tokens(RED_PROMPT)


@pytest.mark.parametrize(
    ("width", "height", "high_res", "tokens"),
    [(1024, 406, False, 520), (1280, 1280, False, 1227), (1288, 1288, True, 2118)],
)
def test_usage_counts_image_tokens_by_the_28_pixel_rule(
    client: openai.OpenAI, width: int, height: int, high_res: bool, tokens: int
) -> None:
    extra = {"extra_body": {"vl_high_resolution_images": True}} if high_res else {}
    usage = collect(client, [user("Describe.", data_url(width, height))], **extra)["usage"]
    assert usage.prompt_tokens_details.image_tokens == tokens
    assert usage.prompt_tokens == tokens + estimate_text_tokens("Describe.")


def test_history_images_are_counted_again(client: openai.OpenAI) -> None:
    image = data_url(1024, 406)
    messages = [
        user("First?", image),
        {"role": "assistant", "content": "An answer."},
        user("And now?", data_url(1280, 1280)),
    ]
    result = collect(client, messages)
    assert result["usage"].prompt_tokens_details.image_tokens == 520 + 1227
    assert result["usage"].prompt_tokens_details.text_tokens == estimate_text_tokens(
        "First?An answer.And now?"
    )
    assert "1 image(s)" in result["answer"] and "1280x1280" in result["answer"]


def test_remote_images_are_not_fetched_and_count_as_1280_square(client: openai.OpenAI) -> None:
    result = collect(client, [user("What?", "https://example.invalid/cat.jpg")])
    assert result["usage"].prompt_tokens_details.image_tokens == 1227
    assert "remote image" in result["reasoning"] and "remote image" in result["answer"]


# --- the text -------------------------------------------------------------------------------------


def test_text_names_size_and_colour_of_each_image(client: openai.OpenAI) -> None:
    result = collect(client, [user(RED_PROMPT, data_url(200, 100, "red"), data_url(50, 60, "blue", "JPEG"))])
    assert "Image 1 is 200x100 pixels, mostly red (#ff0000)" in result["reasoning"]
    assert "Image 2 is 50x60 pixels, mostly blue" in result["reasoning"]
    assert f'"{RED_PROMPT}"' in result["reasoning"]
    assert result["answer"].startswith(
        f"Answer: 2 image(s); image 1 is 200x100, mostly red; image 2 is 50x60, mostly blue. You asked: {RED_PROMPT}"
    )


@pytest.mark.parametrize("fmt", sorted(MIME))
def test_every_accepted_format_is_decoded(client: openai.OpenAI, fmt: str) -> None:
    result = collect(client, [user("Which?", data_url(64, 32, "yellow", fmt))])
    assert "image 1 is 64x32, mostly yellow" in result["answer"]


def test_same_request_gives_the_same_text(client: openai.OpenAI) -> None:
    messages = [user("Same?", data_url(30, 30, "green"))]
    first, second = collect(client, messages), collect(client, messages)
    assert (first["reasoning"], first["answer"]) == (second["reasoning"], second["answer"])


def test_directives_set_lengths_and_are_not_echoed(client: openai.OpenAI) -> None:
    prompt = "Tell me. [[emulator: reasoning_tokens=120 answer_tokens=35]]"
    result = collect(client, [user(prompt)])
    assert result["usage"].completion_tokens == 155
    assert "emulator" not in result["reasoning"] + result["answer"]
    assert result["answer"].startswith("Answer: 0 image(s). You asked: Tell me.")


def test_bad_directive_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tsp"):
        collect(client, [user("x [[emulator: tsp=5]]")])


# --- refusals -------------------------------------------------------------------------------------


def test_non_streaming_call_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="qvq-max", messages=[user("hi")])  # type: ignore[arg-type]
    body = caught.value.response.json()
    assert body["error"] == {
        "message": "This model only support stream mode, please enable the stream parameter to access the model.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_parameter_error",
    }
    assert body["request_id"] and body["id"]


@pytest.mark.parametrize("model", ["gpt-4o", "qvq-72b-preview"])
def test_unknown_and_refused_models_are_not_found(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=model, messages=[user("hi")], stream=True)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"


def test_models_lists_the_seven_names(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list()) == sorted(MODELS)


@pytest.mark.parametrize(
    "url",
    ["data:image/png;base64,bm90IGFuIGltYWdl", "data:image/png;base64,@@@", "ftp://x/y.png", data_url(8, 40)],
)
def test_bad_images_are_refused(client: openai.OpenAI, url: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        collect(client, [user("x", url)])
    assert caught.value.code == "invalid_parameter_error"


# --- faults ---------------------------------------------------------------------------------------


def test_429_carries_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        collect(client, [user(unique("x [[emulator: fault=429 retry_after_s=3]]"))])
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.code == "limit_requests"


@pytest.mark.parametrize(("fault", "code"), [("500", "InternalError"), ("503", "ModelUnavailable")])
def test_5xx_faults(client: openai.OpenAI, fault: str, code: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        collect(client, [user(f"x [[emulator: fault={fault}]]")])
    assert caught.value.status_code == int(fault) and caught.value.code == code


def test_inspection_fault(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        collect(client, [user("x [[emulator: fault=inspect]]")])
    assert caught.value.code == "data_inspection_failed"


def test_cut_raises_a_connection_error_mid_stream(client: openai.OpenAI, server: EmulatorServer) -> None:
    cuts = server.stats["streams_cut"]
    received = []
    with pytest.raises(openai.APIConnectionError):  # noqa: PT012 - the error comes while iterating
        for chunk in stream(client, [user("x [[emulator: fault=cut:5]]")]):
            received.append(chunk)
    assert len(received) == 5
    assert server.stats["streams_cut"] == cuts + 1


def test_cut_after_everything_still_withholds_done(server: EmulatorServer) -> None:
    body = {"model": "qvq-max", "stream": True, "messages": [user("x [[emulator: fault=cut:1000]]")]}
    with pytest.raises(httpx.RemoteProtocolError):
        raw_events(server, body)


def test_stall_makes_the_client_time_out_and_is_counted_as_a_disconnect(server: EmulatorServer) -> None:
    before = server.stats["disconnects"]
    with openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=0.5) as c:
        received = []
        with pytest.raises(openai.APITimeoutError):  # noqa: PT012
            for chunk in stream(c, [user("x [[emulator: fault=stall]]")]):
                received.append(chunk)
    assert len(received) == 1
    wait_until(lambda: server.stats["disconnects"] == before + 1)


def test_fault_applies_to_the_attempt_counted_by_identical_requests(client: openai.OpenAI) -> None:
    messages = [user(unique("x [[emulator: fault=429@1,500@2]]"))]
    with pytest.raises(openai.RateLimitError):
        collect(client, messages)
    with pytest.raises(openai.InternalServerError):
        collect(client, messages)
    assert collect(client, messages)["answer"].startswith("Answer:")


def test_attempt_header_overrides_the_counter(client: openai.OpenAI) -> None:
    messages = [user(unique("x [[emulator: fault=503@2+]]"))]
    assert collect(client, messages, extra_headers={"X-Qvq-Attempt": "1"})["answer"]
    with pytest.raises(openai.InternalServerError):
        collect(client, messages, extra_headers={"X-Qvq-Attempt": "3"})
    assert collect(client, messages, extra_headers={"X-Qvq-Attempt": "1"})["answer"]


# --- speed and lifecycle --------------------------------------------------------------------------


def test_pacing_follows_tps_and_first_token_delay(client: openai.OpenAI) -> None:
    started = time.monotonic()
    chunks = iter(stream(client, [user("x [[emulator: tps=200 first_token_s=0.2]]")]))
    next(chunks)
    first = time.monotonic() - started
    for _ in chunks:
        pass
    total = time.monotonic() - started
    assert first >= 0.19
    assert total >= 0.2 + 59 / 200 - 0.02


def test_closing_the_stream_stops_generation(client: openai.OpenAI, server: EmulatorServer) -> None:
    before = server.stats
    chunks = stream(client, [user("x [[emulator: tps=50 reasoning_tokens=1000]]")])
    for n, _ in enumerate(chunks):
        if n == 5:
            break
    chunks.close()
    wait_until(lambda: server.stats["disconnects"] == before["disconnects"] + 1)
    assert server.stats["streams_active"] == 0
    streamed = server.stats["tokens_streamed"]
    time.sleep(0.1)
    assert server.stats["tokens_streamed"] == streamed < before["tokens_streamed"] + 500


def test_many_concurrent_streams_share_one_process(server: EmulatorServer) -> None:
    async def one(c: openai.AsyncOpenAI, n: int) -> int:
        s = await c.chat.completions.create(
            model="qvq-max",
            messages=[user(f"#{n} [[emulator: tps=30 reasoning_tokens=20 answer_tokens=10]]")],  # type: ignore[list-item]
            stream=True,
        )
        return len([chunk async for chunk in s])

    async def main() -> list[int]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(c, n) for n in range(50)))

    started = time.monotonic()
    counts = asyncio.run(main())
    assert counts == [32] * 50
    assert time.monotonic() - started < 25  # each stream takes 1 s: one after another would take 50 s


def test_stopping_the_server_ends_open_streams_and_stamps_are_opt_in() -> None:
    srv = EmulatorServer(EmulatorConfig(stamp_chunks=True)).start()
    with openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=5) as c:
        chunks = stream(c, [user("x [[emulator: fault=stall]]")])
        first = next(iter(chunks))
        assert first.model_extra and isinstance(first.model_extra["x_sent_at"], float)
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 3
        with pytest.raises(openai.APIConnectionError):
            list(chunks)
    srv.stop()  # idempotent


def test_config_reads_the_environment_and_overrides() -> None:
    env = {"QVQ_EMULATOR_TPS": "50", "QVQ_EMULATOR_STAMP_CHUNKS": "true", "QVQ_EMULATOR_ANSWER_TOKENS": "7"}
    config = EmulatorConfig.from_env(env, answer_tokens=9, first_token_s=None)
    assert (config.tps, config.stamp_chunks, config.answer_tokens, config.first_token_s) == (
        50.0,
        True,
        9,
        0.0,
    )
    with pytest.raises(ValueError, match="tps"):
        EmulatorConfig.from_env({"QVQ_EMULATOR_TPS": "fast"})
