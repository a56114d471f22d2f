"""schemathesis extension hooks (loaded through SCHEMATHESIS_HOOKS by tests/producer/test_openapi.py): what
bytes an image part of an upload holds. The OpenAPI document says each part is one of the image media
types, and the API sniffs the format from the bytes: a generated part is therefore a real image of one of
those types, small, of a random size and colour, as a client would send."""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

from contracts.image_formats import MIME
from tests.imagegen import make_image

#: The formats Pillow writes here (HEIC needs an encoder the test machine may not have).
GENERATED = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")


def _images(fmt: str) -> st.SearchStrategy[bytes]:
    sizes = st.tuples(st.integers(11, 64), st.integers(11, 64))
    colours = st.tuples(*(st.integers(0, 255),) * 3)
    return st.builds(lambda size, colour: make_image(fmt, size=size, color=colour), sizes, colours)


for _fmt in GENERATED:
    schemathesis.openapi.media_type(MIME[_fmt], _images(_fmt))

