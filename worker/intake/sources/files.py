"""Files on this machine: file:// references and local paths (only with QVQ_ALLOW_LOCAL_FILES=1), and
upload:// references (images uploaded over HTTP, kept where QVQ_UPLOAD_URL says: a directory, or
s3://bucket/prefix read through the object source)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from contracts.errors import ImageError
from contracts.job import UPLOAD_REF
from contracts.settings import Settings
from contracts.uploads import UploadStorage
from worker.intake.sources.common import check_size
from worker.intake.sources.objects import ObjectSource


class FileSource:
    schemes: tuple[str, ...] = ("file", "")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_bytes = settings.max_image_bytes

    def close(self) -> None:
        pass

    def fetch(self, ref: str) -> bytes:
        if not self.settings.allow_local_files:
            raise ImageError("local files are not allowed on this worker (set QVQ_ALLOW_LOCAL_FILES=1 to allow)",
                             code="image.access_denied", ref=ref)
        if ref.lower().startswith("file://"):
            parts = urlsplit(ref)
            if parts.netloc not in ("", "localhost"):
                raise ImageError(f"file URL names a remote host {parts.netloc!r}", code="image.access_denied",
                                 ref=ref)
            path = Path(unquote(parts.path))
        else:
            path = Path(ref).expanduser()
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ImageError("not a regular file", code="image.not_found", ref=ref)
            if size > self.max_bytes:
                raise ImageError(f"{size:,} bytes, over the limit of {self.max_bytes:,}", code="image.too_large",
                                 ref=ref)
            with path.open("rb") as fh:
                data = fh.read(self.max_bytes + 1)
        except FileNotFoundError as exc:
            raise ImageError("no such file", code="image.not_found", ref=ref) from exc
        except PermissionError as exc:
            raise ImageError("permission denied reading the file", code="image.access_denied", ref=ref) from exc
        except OSError as exc:
            raise ImageError(f"cannot read the file ({exc.strerror or exc})", code="image.not_found", ref=ref) from exc
        check_size(len(data), self.max_bytes, ref)
        return data


class UploadSource:
    schemes: tuple[str, ...] = ("upload",)

    def __init__(self, settings: Settings, objects: ObjectSource) -> None:
        self.max_bytes = settings.max_image_bytes
        self._uploads = UploadStorage(settings)
        self._objects = objects

    def close(self) -> None:
        pass

    def fetch(self, ref: str) -> bytes:
        match = UPLOAD_REF.fullmatch(ref)
        if match is None:
            raise ImageError("not an upload reference", code="image.not_found", ref=ref)
        location = self._uploads.location(match.group(1))
        if location.startswith("s3://"):
            return self._objects.fetch(location, allowed=True)
        try:
            with open(location, "rb") as fh:
                data = fh.read(self.max_bytes + 1)
        except FileNotFoundError as exc:
            raise ImageError("the upload is gone (expired, or QVQ_UPLOAD_URL differs between the API and "
                             "this worker)", code="image.not_found", ref=ref) from exc
        check_size(len(data), self.max_bytes, ref)
        return data
