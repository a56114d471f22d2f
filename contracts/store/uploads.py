"""Uploads in the store: which tenant uploaded what, and until when it is kept (contracts/uploads.py has the bytes)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict

from sqlalchemy.engine import Engine

from contracts.store.records import UploadRecord
from contracts.store.tables import now, uploads


class UploadStore:
    engine: Engine

    def add_upload(self, upload_id: str, *, tenant: str | None, filename: str | None, format_: str,
                   size: int, ttl_s: int) -> UploadRecord:
        created = now()
        record = UploadRecord(id=upload_id, tenant=tenant, filename=filename, format=format_, bytes=size,
                              created_at=created, expires_at=created + dt.timedelta(seconds=ttl_s))
        with self.engine.begin() as conn:
            conn.execute(uploads.insert(), asdict(record))
        return record

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(uploads.select().where(uploads.c.id == upload_id)).mappings().first()
        return UploadRecord(**row) if row else None

    def known_upload_ids(self, upload_ids: list[str]) -> set[str]:
        """Which of `upload_ids` have a row."""
        if not upload_ids:
            return set()
        query = uploads.select().with_only_columns(uploads.c.id).where(uploads.c.id.in_(upload_ids))
        with self.engine.connect() as conn:
            return set(conn.execute(query).scalars())

    def expired_uploads(self, at: dt.datetime | None = None, limit: int = 500) -> list[UploadRecord]:
        query = uploads.select().where(uploads.c.expires_at <= (at or now())).limit(limit)
        with self.engine.connect() as conn:
            return [UploadRecord(**row) for row in conn.execute(query).mappings()]

    def delete_upload(self, upload_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(uploads.delete().where(uploads.c.id == upload_id))

