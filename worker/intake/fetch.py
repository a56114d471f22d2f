"""Fetching an image reference: the source for its scheme (worker/intake/sources/) reads the bytes.

    s3:// oss://      sources/objects.py
    https:// http://  sources/web.py
    file:// a path    sources/files.py (FileSource)
    upload://         sources/files.py (UploadSource)

Every failure is an ImageError (image.not_found, image.access_denied, image.too_large,
image.fetch_failed); the schemes a job may name are contracts.job.IMAGE_SCHEMES.
"""

from __future__ import annotations

import ssl
from collections.abc import Collection

from contracts.errors import ImageError
from contracts.settings import Settings
from contracts.ssrf import Resolver
from worker.intake.sources.common import Source, scheme_of
from worker.intake.sources.files import FileSource, UploadSource
from worker.intake.sources.objects import ObjectSource
from worker.intake.sources.web import WebSource


class ImageFetcher:
    """Fetches the bytes of one image reference; thread-safe, built once per worker process.

    ``resolver``, ``trusted`` and ``ssl_context`` exist for tests (see sources/web.py)."""

    def __init__(self, settings: Settings, *, resolver: Resolver | None = None,
                 trusted: Collection[tuple[str, int]] = (), ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.objects = ObjectSource(settings)
        sources: list[Source] = [
            self.objects,
            WebSource(settings, resolver=resolver, trusted=trusted, ssl_context=ssl_context),
            FileSource(settings),
            UploadSource(settings, self.objects),
        ]
        self._sources = sources
        self._by_scheme = {scheme: source for source in sources for scheme in source.schemes}

    def close(self) -> None:
        for source in self._sources:
            source.close()

    def fetch(self, ref: str) -> bytes:
        scheme = scheme_of(ref)
        source = self._by_scheme.get(scheme)
        if source is None:
            raise ImageError(f"unsupported reference scheme {scheme}://; use s3://, oss://, https:// or a local path",
                             code="image.access_denied", ref=ref)
        return source.fetch(ref)

    def presigned_url(self, ref: str, expires_s: int) -> str | None:
        """A time-limited GET URL for an s3:// or oss:// object (QVQ_IMAGE_DELIVERY=presigned); None
        for other references, which are always sent inline."""
        return self.objects.presigned_url(ref, expires_s)
