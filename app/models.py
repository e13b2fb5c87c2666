"""Job store tables. The job row is the source of truth: the queue carries only its id.

Status moves queued -> running -> succeeded | failed | cancelled (and running -> queued when the reaper requeues a
job whose worker vanished). Timestamps are timezone-aware UTC on every backend.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
JOB_KINDS = ("merge", "analyze")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; SQLite drops the zone, so it is put back on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; use timezone-aware UTC")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class ApiToken(Base):
    """A bearer token, stored as the sha256 of its (256-bit random) secret; the secret is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_token_id: Mapped[str] = mapped_column(ForeignKey("api_tokens.id"), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_token_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner_token_id", "created_at", "id"),
        Index("ix_jobs_owner_digest_status", "owner_token_id", "recipe_digest", "status"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(16), default="merge")
    #: a label the submitter chose ("lambda=0.3", "math+code v2"), shown in lists; not part of the recipe
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    owner_token_id: Mapped[str] = mapped_column(ForeignKey("api_tokens.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    #: The normalized recipe (merge) or analysis request (analyze); local paths already absolute and confined.
    recipe_json: Mapped[str] = mapped_column(Text)
    recipe_digest: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"), nullable=True, index=True)
    #: {source uri as submitted: pinned uri (hf://org/name@<40-hex sha>)} for Hub sources.
    pinned_sources_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    tensors_done: Mapped[int] = mapped_column(Integer, default=0)
    tensors_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: what the counts above measure: "merge" (the main pass), a first pass ("global_stats", "lines_alpha"),
    #: "evaluate" (greedy soup) or "train" (aTLAS); null before the first progress report
    progress_phase: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    output_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_context_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    report_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    @property
    def recipe(self) -> dict[str, Any]:
        return json.loads(self.recipe_json)

    @property
    def pinned_sources(self) -> dict[str, str]:
        return json.loads(self.pinned_sources_json) if self.pinned_sources_json else {}

    @property
    def report(self) -> dict[str, Any] | None:
        return json.loads(self.report_json) if self.report_json else None

    @property
    def error(self) -> dict[str, Any] | None:
        """The MergeError.to_dict() the worker recorded, or None."""
        if not self.error_code:
            return None
        error: dict[str, Any] = {"code": self.error_code, "detail": self.error_detail or ""}
        if self.error_context_json:
            error["context"] = json.loads(self.error_context_json)
        return error
