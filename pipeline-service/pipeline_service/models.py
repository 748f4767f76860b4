"""SQLAlchemy models: the tables the ingest writes and the API re-serves."""

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    false,
    func,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MACHINE_STATUSES = ("IDLE", "STARTED", "COMPLETED", "ERROR")
_STATUS_CHECK = "status IN ('IDLE', 'STARTED', 'COMPLETED', 'ERROR')"


KEY = String(50, collation="C")
"""Record keys compare in byte order whatever the database's locale, as Python compares
strings: the ingest relies on it to number positions itself (migration 0005)."""


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class _Bookkeeping:
    """When the ingest first stored a row, when it last changed it, and a hash of the source
    record it last took in (so an unchanged source record is never written again)."""

    source_hash: Mapped[bytes | None] = mapped_column(LargeBinary)
    ingested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class _BytesDigest:
    """A hash of the source record's JSON exactly as the source wrote it: a re-ingest skips
    a record whose bytes it has stored without parsing or validating it again."""

    source_bytes_hash: Mapped[bytes | None] = mapped_column(LargeBinary)


class Customer(_Bookkeeping, _BytesDigest, Base):
    __tablename__ = "customers"

    customer_id: Mapped[str] = mapped_column(KEY, primary_key=True)
    first_name: Mapped[str] = mapped_column(String(100))
    last_name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(255))
    phone: Mapped[str | None] = mapped_column(String(20))
    address: Mapped[str | None] = mapped_column(Text)
    date_of_birth: Mapped[date | None] = mapped_column(Date)
    account_balance: Mapped[Decimal | None] = mapped_column(Numeric(15, 2))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    position: Mapped[int | None] = mapped_column(BigInteger, index=True)
    """1-based rank in key order, kept by the ingest so that page P is a range seek."""


class Machine(_Bookkeeping, _BytesDigest, Base):
    __tablename__ = "machines"
    __table_args__ = (CheckConstraint(_STATUS_CHECK, name="status"),)

    machine_id: Mapped[str] = mapped_column(KEY, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(100))
    location: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    position: Mapped[int | None] = mapped_column(BigInteger, index=True)
    """1-based rank in key order, kept by the ingest so that page P is a range seek."""


class MachineReading(_Bookkeeping, Base):
    __tablename__ = "machine_readings"
    __table_args__ = (
        CheckConstraint(_STATUS_CHECK, name="status"),
        # A reading's key is two columns: the re-ingest finds stored readings by source hash
        # (customers and machines are found by their one-column key).
        Index("ix_machine_readings_source_hash", "source_hash"),
    )

    machine_id: Mapped[str] = mapped_column(
        KEY, ForeignKey("machines.machine_id", ondelete="CASCADE"), primary_key=True
    )
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    temperature: Mapped[float] = mapped_column(Double)
    speed: Mapped[float] = mapped_column(Double)
    status: Mapped[str] = mapped_column(String(20))


class CollectionStats(Base):
    """Per top-level collection: its exact size and whether ``position`` is exact, both
    kept by the ingest (the only writer of those rows) in each page's transaction."""

    __tablename__ = "collection_stats"

    resource: Mapped[str] = mapped_column(String(50), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, server_default="0")
    positions_exact: Mapped[bool] = mapped_column(Boolean, server_default=true())


RUN_STATUSES = ("running", "succeeded", "failed")


class IngestRun(Base):
    """One ingest: who started it, how it ended, and (per resource) what it did."""

    __tablename__ = "ingest_runs"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'succeeded', 'failed')", name="status"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    trigger: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class IngestRunResource(Base):
    """A run's counts and checkpoint for one resource, committed with each page it writes."""

    __tablename__ = "ingest_run_resources"

    run_id: Mapped[int] = mapped_column(
        ForeignKey("ingest_runs.id", ondelete="CASCADE"), primary_key=True
    )
    resource: Mapped[str] = mapped_column(String(50), primary_key=True)
    position: Mapped[int] = mapped_column(SmallInteger)
    next_page: Mapped[int] = mapped_column(Integer, server_default="1")
    done: Mapped[bool] = mapped_column(Boolean, server_default=false())
    pages: Mapped[int] = mapped_column(Integer, server_default="0")
    fetched: Mapped[int] = mapped_column(Integer, server_default="0")
    inserted: Mapped[int] = mapped_column(Integer, server_default="0")
    updated: Mapped[int] = mapped_column(Integer, server_default="0")
    unchanged: Mapped[int] = mapped_column(Integer, server_default="0")
    rejected: Mapped[int] = mapped_column(Integer, server_default="0")


class RejectedRecord(Base):
    """A source or pushed record that failed validation, kept with the reason why."""

    __tablename__ = "rejected_records"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("ingest_runs.id", ondelete="SET NULL"), index=True
    )
    resource: Mapped[str] = mapped_column(String(50))
    record_key: Mapped[str | None] = mapped_column(Text)
    source_page: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[Any] = mapped_column(JSONB)
    reason: Mapped[str] = mapped_column(Text)
    rejected_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


CHANGE_SOURCES = ("api", "ingest")


class MachineStatusChange(Base):
    """One change of a machine's status, written by a trigger on ``machines`` (migration
    0002) whoever made it: ``source`` is 'api' for POST /status, else 'ingest'."""

    __tablename__ = "machine_status_history"
    __table_args__ = (
        CheckConstraint("source IN ('api', 'ingest')", name="source"),
        Index("ix_machine_status_history_machine_id_changed_at", "machine_id", "changed_at", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    machine_id: Mapped[str] = mapped_column(
        KEY, ForeignKey("machines.machine_id", ondelete="CASCADE")
    )
    old_status: Mapped[str | None] = mapped_column(String(20))
    new_status: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(20))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
