"""What `qvq submit` checks before anything is queued, so a job that cannot run is refused at once
(exit 2) instead of failing in a worker later, possibly after it was billed.

- the question: `--prompt TEXT`, `--prompt -` (stdin) or `--prompt-file PATH`
- local image files: present, readable, at most 10 MB, and an accepted format by their first bytes
  (a worker's QVQ_ALLOW_LOCAL_FILES cannot be known from here: the CLI prints a hint instead)
- `--conversation ID`: it exists, unless the turn starts it (images, or `--new-conversation`)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from contracts.errors import ImageError, RequestError
from contracts.image_formats import MAX_IMAGE_BYTES, SNIFF_BYTES, unsupported_reason


def read_question(prompt: str | None, prompt_file: str | None, stdin: TextIO | None = None) -> str:
    """The question from --prompt, --prompt - (stdin) or --prompt-file PATH (exactly one of them)."""
    if prompt is not None and prompt_file is not None:
        raise RequestError("give the question once: --prompt or --prompt-file, not both", field="prompt")
    source = prompt_file if prompt_file is not None else ("-" if prompt == "-" else None)
    if source is None:
        if prompt is None:
            raise RequestError("a question is required: --prompt TEXT, --prompt - (stdin) or --prompt-file PATH",
                               field="prompt")
        return prompt
    try:
        if source == "-":
            return (stdin or sys.stdin).read()
        with open(os.path.expanduser(source), encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError:
        raise RequestError(f"{source!r} is not UTF-8 text", field="prompt") from None
    except OSError as exc:
        raise RequestError(f"cannot read {source!r}: {exc.strerror or exc}", field="prompt") from None


def is_local(ref: str) -> bool:
    return "://" not in ref or ref.startswith("file://")


def check_local_images(images: Sequence[str]) -> None:
    """Refuse a local file that is missing, unreadable, too large or not an image."""
    for index, ref in enumerate(images):
        if is_local(ref):
            _check_image_file(ref, f"images[{index}]")


def _check_image_file(ref: str, field: str) -> None:
    path = os.path.expanduser(ref.removeprefix("file://"))
    if os.path.isdir(path):
        raise RequestError(f"{ref!r} is a directory: name the image files in it (e.g. {ref.rstrip('/')}/*.png)",
                           field=field)
    if not os.path.isfile(path):
        raise RequestError(f"no such file {ref!r}", field=field)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
    except OSError as exc:
        raise RequestError(f"cannot read {ref!r}: {exc.strerror or exc}", field=field) from None
    if size > MAX_IMAGE_BYTES:
        raise ImageError(f"{size:,} bytes, over the limit of {MAX_IMAGE_BYTES:,}", code="image.too_large", ref=ref)
    reason = unsupported_reason(head)
    if reason:
        raise ImageError(reason, code="image.unsupported_format", ref=ref)


def check_conversation(exists: Callable[[str], bool], conversation_id: str | None, *, new: bool,
                       with_images: bool) -> bool:
    """Refuse an unknown conversation unless this turn starts it; True when it starts one. `exists` asks
    the client whether the conversation has a turn already (whatever that turn's status)."""
    if conversation_id is None:
        if new:
            raise RequestError("--new-conversation needs --conversation ID", field="conversation_id")
        return False
    known = exists(conversation_id)
    if known and new:
        raise RequestError(f"conversation {conversation_id!r} already exists: leave out --new-conversation "
                           "to continue it", field="conversation_id")
    if not known and not with_images:
        raise RequestError(f"no conversation {conversation_id!r}: check the id, or start it with images "
                           "(and --new-conversation)", field="conversation_id", code="conversation.not_found")
    return not known
