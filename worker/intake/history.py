"""A conversation's earlier turns as they are sent again: each turn's images, fetched and validated anew,
must be the images that turn sent.

The vendor keeps the whole `messages` list between turns, so a later request holds the first user message
with its image. The worker keeps only references, so it fetches an earlier turn's images again; when one
is gone, or no longer the same object (its content hash, or for rows older than the hash its size and
dimensions, differ from what that turn recorded), the turn is refused with that image's error naming the
turn: answering about another picture than the one the conversation discussed would be silently wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from contracts.errors import ImageError
from contracts.job import JobRequest
from contracts.store import HistoryTurn
from worker.intake.fetch import ImageFetcher
from worker.intake.images import PreparedImage, prepare_images
from worker.intake.prompt import Turn


@dataclass(frozen=True)
class PreparedConversation:
    history: list[Turn]  # the earlier turns, ready to send
    images: list[PreparedImage]  # this turn's own images
    summaries: list[dict[str, Any]]  # images.ready's list: the earlier turns' (marked) then this turn's
    tokens: int  # the tokens of every image sent


def prepare_conversation(job: JobRequest, turns: Sequence[HistoryTurn], fetcher: ImageFetcher,
                         executor: Executor | None) -> PreparedConversation:
    """Fetch and validate the earlier turns' images and this turn's, all at once; an earlier image that
    fails or changed refuses the turn, naming the earlier turn."""
    earlier = [ref for turn in turns for ref in turn.images]
    turn_of = [number for number, turn in enumerate(turns, start=1) for _ in turn.images]
    try:
        prepared = prepare_images([*earlier, *job.images], fetcher, high_resolution=job.high_resolution,
                                  executor=executor)
    except ImageError as error:
        named = name_turn(error, earlier, turn_of, job.images)
        if named is error:
            raise
        raise named from error
    summaries = [{**image.summary(), "history": True, "turn": number}
                 for image, number in zip(prepared[:len(earlier)], turn_of, strict=True)]
    own = prepared[len(earlier):]
    return PreparedConversation(history=history_turns(turns, prepared[:len(earlier)]), images=own,
                                summaries=summaries + [image.summary() for image in own],
                                tokens=sum(image.tokens for image in prepared))


def history_turns(turns: Sequence[HistoryTurn], images: Sequence[PreparedImage]) -> list[Turn]:
    """The turns ready to send; `images` are the earlier turns' images in order, prepared anew."""
    out: list[Turn] = []
    start = 0
    for number, turn in enumerate(turns, start=1):
        own = list(images[start:start + len(turn.images)])
        start += len(turn.images)
        for index, image in enumerate(own):
            _check_unchanged(image, turn.summaries[index] if index < len(turn.summaries) else None, number)
        out.append(Turn(prompt=turn.prompt, images=own, answer=turn.answer))
    return out


def _check_unchanged(image: PreparedImage, recorded: dict[str, Any] | None, turn: int) -> None:
    if not recorded:
        return
    if recorded.get("sha256"):
        same = recorded["sha256"] == image.sha256
    else:
        same = (recorded.get("bytes"), recorded.get("width"), recorded.get("height")) == (
            image.bytes, image.width, image.height)
    if not same:
        raise ImageError(f"turn {turn} of the conversation sent this image, and it has changed since; the "
                         "conversation cannot go on about a different picture: start a new one",
                         code="image.not_found", ref=image.ref)


def name_turn(error: ImageError, earlier: Sequence[str], turn_of: Sequence[int], current: Sequence[str]) -> ImageError:
    """An image error, naming the earlier turn whose image it is (this turn's own images stay as they are)."""
    if error.ref is None or error.ref in current or error.ref not in earlier:
        return error
    turn = turn_of[list(earlier).index(error.ref)]
    named = ImageError(f"turn {turn} of the conversation: {error.message}", code=error.code,
                       retryable=error.retryable)
    named.ref = error.ref
    return named
