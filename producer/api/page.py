"""The web viewer (GET /): one static page, given the event types from contracts/events.py when the app is
built (so a new type needs no change here), with a Content-Security-Policy that allows its inline script
and style by their hashes only."""

from __future__ import annotations

import json
from pathlib import Path

from contracts import events as ev
from contracts.errors import InternalError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
TYPES_SLOT = "/* the event types, filled in by the API from contracts/events.py */ []"


def viewer_page() -> str:
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if TYPES_SLOT not in page:
        raise InternalError("static/index.html has lost its event types slot")
    return page.replace(TYPES_SLOT, json.dumps(list(ev.EVENT_TYPES)))
