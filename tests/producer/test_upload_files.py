"""Uploaded files never outlive their rows: the row is written first, a failed write keeps no file, and
the sweeper deletes files that have no row (left by an older version, or by a crash)."""

from __future__ import annotations

import datetime as dt
import os
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from contracts.settings import Settings
from contracts.tenants import Principal
from contracts.uploads import UploadStorage
from producer.service.uploads import ORPHAN_AGE_S, UploadService, clean_filename
from tests.doubles import memory_store
from tests.imagegen import make_image


@pytest.fixture()
def service(tmp_path: Path) -> UploadService:
    store = memory_store()
    return UploadService(Settings(), store, UploadStorage(Settings(), directory=tmp_path / "uploads"))


def test_a_failed_row_write_keeps_no_file(service: UploadService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          ) -> None:
    def down(*args: object, **kwargs: object) -> None:
        raise sa.exc.OperationalError("INSERT", {}, Exception("the database is gone"))

    monkeypatch.setattr(service.store, "add_upload", down)
    for _ in range(3):
        with pytest.raises(sa.exc.OperationalError):
            service.add(Principal(tenant="acme"), make_image("PNG", size=(64, 64)), "a.png", "file")
    uploads = tmp_path / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def test_a_failed_file_write_keeps_no_row(service: UploadService, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service.storage, "put", full)
    with pytest.raises(OSError):
        service.add(Principal(tenant="acme"), make_image("PNG", size=(64, 64)), "a.png", "file")
    assert service.store.expired_uploads(at=dt.datetime.max.replace(tzinfo=dt.UTC)) == []


def test_the_sweeper_deletes_old_files_without_rows_and_keeps_the_rest(service: UploadService,
                                                                        tmp_path: Path) -> None:
    kept = service.add(Principal(tenant="acme"), make_image("PNG", size=(64, 64)), "a.png", "file")
    uploads = tmp_path / "uploads"
    orphan, fresh_orphan = uploads / uuid.uuid4().hex, uploads / uuid.uuid4().hex
    foreign = uploads / "notes.txt"  # not an upload's name: never touched
    for path in (orphan, fresh_orphan, foreign):
        path.write_bytes(b"x")
    old = time.time() - ORPHAN_AGE_S - 60
    for path in (orphan, foreign, uploads / kept.id):
        os.utime(path, (old, old))
    assert service.delete_expired() == 1
    assert sorted(p.name for p in uploads.iterdir()) == sorted([kept.id, fresh_orphan.name, "notes.txt"])


@pytest.mark.parametrize(("given", "expected"), [
    ("a\x00b.png", "a_b.png"), ("../../etc/passwd", "passwd"), ("C:\\temp\\x.png", "x.png"),
    ("\ud800.png", "_.png"), ("", "upload"), (None, "upload"), ("  ", "upload"), ("é.png", "é.png"),
])
def test_file_names_are_cleaned(given: str | None, expected: str) -> None:
    assert clean_filename(given) == expected
