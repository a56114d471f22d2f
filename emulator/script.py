"""The emulated thinking and answer: deterministic, derived from the request, cut into tokens.

One token is one chunk: a word with the whitespace after it. Both parts are padded with filler
thoughts up to the configured minimum, so the same request always streams the same text.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from emulator.images import REMOTE_SIZE, ImageInfo

MAX_ECHO_WORDS = 200
_TOKEN = re.compile(r"\S+\s*")

REASONING_FILLER = (
    "Let me look at the proportions once more.",
    "The colours seem consistent across the frame.",
    "I should check the corners for anything easy to miss.",
    "Counting the images again gives the same number.",
    "Nothing here suggests a different reading.",
    "The question deserves a careful, plain answer.",
    "I will keep the description short and exact.",
)
ANSWER_FILLER = ("That is what the request shows.", "Nothing more can be read from it.")


@dataclass(frozen=True)
class Script:
    reasoning: tuple[str, ...]
    answer: tuple[str, ...]

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def answer_text(self) -> str:
        return "".join(self.answer)

    @property
    def completion_tokens(self) -> int:
        return len(self.reasoning) + len(self.answer)


def write_script(
    images: Sequence[ImageInfo], prompt: str, reasoning_tokens: int, answer_tokens: int
) -> Script:
    echo = _echo(prompt)
    thoughts = [f"Let me look at the request: {len(images)} image(s) and a question."]
    thoughts += [f"Image {n} {_describe(image, long=True)}." for n, image in enumerate(images, 1)]
    thoughts.append(f'The user asks: "{echo}"' if echo else "There is no question text.")
    reasoning = _tokens(" ".join(thoughts), REASONING_FILLER, reasoning_tokens)

    summary = "; ".join(f"image {n} {_describe(image, long=False)}" for n, image in enumerate(images, 1))
    answer = f"Answer: {len(images)} image(s)" + (f"; {summary}." if summary else ".")
    answer += f" You asked: {echo}" if echo else " You asked nothing in words."
    return Script(reasoning, _tokens(answer, ANSWER_FILLER, answer_tokens))


def _describe(image: ImageInfo, long: bool) -> str:
    if image.remote:
        width, height = REMOTE_SIZE
        return (
            f"is a remote image ({image.url}), counted as {width}x{height}" if long else "is a remote image"
        )
    if long:
        return f"is {image.width}x{image.height} pixels, mostly {image.colour} ({image.hex})"
    return f"is {image.width}x{image.height}, mostly {image.colour}"


def _echo(prompt: str) -> str:
    words = _TOKEN.findall(prompt)
    if len(words) <= MAX_ECHO_WORDS:
        return prompt
    return "".join(words[:MAX_ECHO_WORDS]).rstrip() + " ..."


def _tokens(text: str, filler: Iterable[str], minimum: int) -> tuple[str, ...]:
    tokens = _TOKEN.findall(text.strip() + " ")
    if len(tokens) < minimum:
        words = itertools.cycle(word + " " for sentence in filler for word in sentence.split())
        tokens += itertools.islice(words, minimum - len(tokens))
    tokens[-1] = tokens[-1].rstrip()
    return tuple(tokens)
