"""The ingest: walk every page of the source, validate, upsert, and keep the run ledger.

Guarantees:
- one run at a time across processes (a PostgreSQL advisory lock held by the run);
- each page commits in one transaction together with its counts and the run's checkpoint,
  so an interrupted run loses nothing committed and can be resumed where it stopped;
- an invalid record is stored in ``rejected_records`` with its reason, never dropped and
  never fatal to the rest of its page; within a page and a run, the later record wins;
- unchanged records are not rewritten.
"""

import io
import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    Table,
    Text,
    Uuid,
    cast,
    func,
    insert,
    literal_column,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.schema import CreateTable

from pipeline_service.models import IngestRun, IngestRunResource, RejectedRecord
from pipeline_service.resources import RESOURCES, Resource
from pipeline_service.schemas import describe_errors
from pipeline_service.source import SourceClient, SourceError, SourcePage

log = logging.getLogger(__name__)

INGEST_LOCK_ID = 0x1A6E_57  # pg advisory lock key shared by every pipeline process


class IngestBusy(Exception):
    """Another ingest holds the lock."""

    def __init__(self, running_run_id: int | None) -> None:
        super().__init__(f"ingest run {running_run_id} is already running")
        self.running_run_id = running_run_id


class RunNotResumable(Exception):
    """The run asked to be resumed does not exist or has not failed."""


class IngestFailed(Exception):
    """The run stopped on an error; what it committed stays, and it can be resumed."""

    def __init__(self, run_id: int, cause: Exception) -> None:
        super().__init__(str(cause))
        self.run_id = run_id
        self.cause = cause


@dataclass
class Counts:
    pages: int = 0
    fetched: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0

    @property
    def processed(self) -> int:
        return self.inserted + self.updated + self.unchanged


@dataclass
class Rejection:
    raw: Any
    reason: str
    key: str | None


@dataclass
class ValidatedPage:
    valid: list[BaseModel] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def validate_page(resource: Resource, raw_records: Sequence[Any]) -> ValidatedPage:
    """Split raw records into valid ones (deduplicated on key, later wins) and rejections."""
    result = ValidatedPage()
    by_key: dict[tuple, BaseModel] = {}
    for raw in raw_records:
        try:
            record = resource.record.model_validate(raw)
        except ValidationError as exc:
            result.rejected.append(
                Rejection(raw=raw, reason=describe_errors(exc), key=_raw_key(resource, raw))
            )
            continue
        key = resource.key_of(record)
        by_key.pop(key, None)  # re-inserting keeps dict order = position of the later record
        by_key[key] = record
    result.valid = list(by_key.values())
    return result


def _raw_key(resource: Resource, raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return None
    parts = [raw.get(name) for name in resource.key]
    if any(p is None or isinstance(p, dict | list) for p in parts):
        return None
    return "/".join(str(p) for p in parts)


# --- writing one page ------------------------------------------------------------------


def _copy_value(value: Any) -> str:
    """A value in PostgreSQL COPY text format."""
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return (
            value.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Decimal | int):
        return str(value)
    raise TypeError(f"cannot stage a {type(value).__name__}")


class PageWriter:
    """Upserts pages of validated records: COPY into a staging table, then one
    ``INSERT ... SELECT ... ON CONFLICT DO UPDATE ... WHERE IS DISTINCT FROM`` statement."""

    def __init__(self, resource: Resource) -> None:
        self.resource = resource
        self.fields = resource.fields
        self.stage = Table(
            f"stage_{resource.table.name}",
            MetaData(),
            *(Column(c.name, c.type) for c in resource.columns),
            prefixes=["TEMPORARY"],
        )
        target = resource.table
        changing = [f for f in self.fields if f not in resource.key]
        # The hash of the record as taken in decides whether a stored row changes: a field
        # edited through the API (a machine's status) survives re-ingesting the same record.
        source_hash = cast(func.md5(cast(tuple_(*self.stage.c), Text)), Uuid).label("source_hash")
        stmt = pg_insert(target).from_select(
            [*self.fields, "source_hash"], select(*self.stage.c, source_hash)
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=list(resource.key),
            set_={
                **{f: stmt.excluded[f] for f in changing},
                "source_hash": stmt.excluded.source_hash,
                "updated_at": func.now(),
            },
            where=target.c.source_hash.is_distinct_from(stmt.excluded.source_hash),
        )
        # xmax is 0 only for a freshly inserted row version.
        self.upsert = stmt.returning(literal_column("xmax = 0").label("inserted"))
        self.create_stage = CreateTable(self.stage, if_not_exists=True)
        self.copy_sql = 'COPY "{}" ({}) FROM STDIN'.format(
            self.stage.name, ", ".join(f'"{f}"' for f in self.fields)
        )

    def write(self, conn: Connection, records: Sequence[BaseModel]) -> tuple[int, int, int]:
        """Upsert ``records`` (unique on key) in ``conn``'s transaction, without committing.

        Returns (inserted, updated, unchanged).
        """
        if not records:
            return 0, 0, 0
        buffer = io.StringIO()
        for record in records:
            buffer.write("\t".join(_copy_value(getattr(record, f)) for f in self.fields) + "\n")
        buffer.seek(0)
        conn.execute(self.create_stage)
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.copy_expert(self.copy_sql, buffer)
        finally:
            cursor.close()
        flags = conn.execute(self.upsert).scalars().all()
        conn.execute(text(f'TRUNCATE "{self.stage.name}"'))
        inserted = sum(1 for f in flags if f)
        updated = len(flags) - inserted
        return inserted, updated, len(records) - len(flags)


def split_orphans(
    conn: Connection, resource: Resource, records: list[BaseModel]
) -> tuple[list[BaseModel], list[Rejection]]:
    """Separate records whose parent row does not exist (e.g. a reading of an unknown machine)."""
    if resource.parent is None or not records:
        return records, []
    parent = RESOURCES[resource.parent.resource]
    column = resource.parent.column
    wanted = {getattr(r, column) for r in records}
    known = set(
        conn.execute(
            select(parent.table.c[column]).where(parent.table.c[column].in_(wanted))
        ).scalars()
    )
    kept, orphans = [], []
    for record in records:
        value = getattr(record, column)
        if value in known:
            kept.append(record)
        else:
            orphans.append(
                Rejection(
                    raw=record.model_dump(mode="json"),
                    reason=f"{column}: no {parent.name[:-1]} {value!r} exists",
                    key="/".join(
                        str(v)
                        for v in record.model_dump(mode="json", include=set(resource.key)).values()
                    ),
                )
            )
    return kept, orphans


def store_rejections(
    conn: Connection,
    resource: Resource,
    rejections: Sequence[Rejection],
    run_id: int | None,
    source_page: int | None,
) -> None:
    """Insert rejections into ``rejected_records`` in ``conn``'s transaction."""
    if not rejections:
        return
    rows = []
    for rejection in rejections:
        payload, altered = storable_json(rejection.raw)
        reason = rejection.reason
        if altered:
            reason += " (payload shown with characters PostgreSQL cannot store escaped)"
        rows.append(
            {
                "run_id": run_id,
                "resource": resource.name,
                "record_key": rejection.key,
                "source_page": source_page,
                "payload": payload,
                "reason": reason,
            }
        )
    conn.execute(insert(RejectedRecord.__table__), rows)


def storable_json(value: Any) -> tuple[Any, bool]:
    """``value`` made storable as jsonb: NUL characters, lone surrogates and non-finite
    numbers become escaped text. Returns (value, whether anything had to change)."""
    if isinstance(value, str):
        safe = value.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode()
        return safe, safe != value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value), True
    if isinstance(value, list):
        items = [storable_json(v) for v in value]
        return [v for v, _ in items], any(a for _, a in items)
    if isinstance(value, dict):
        altered = False
        out = {}
        for k, v in value.items():
            (safe_k, a1), (safe_v, a2) = storable_json(k), storable_json(v)
            out[safe_k] = safe_v
            altered = altered or a1 or a2
        return out, altered
    return value, False


# --- the run -----------------------------------------------------------------------------


@dataclass
class RunResult:
    run_id: int
    status: str
    counts: dict[str, Counts]

    @property
    def records_processed(self) -> int:
        return sum(c.processed for c in self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "success" if self.status == "succeeded" else self.status,
            "run_id": self.run_id,
            "records_processed": self.records_processed,
            "rejected": sum(c.rejected for c in self.counts.values()),
            "resources": {name: asdict(c) for name, c in self.counts.items()},
        }


class Ingest:
    """Runs ingests against one database and one source."""

    def __init__(
        self, engine: Engine, client: SourceClient, page_size: int, prefetch_pages: int = 2
    ) -> None:
        self.engine = engine
        self.client = client
        self.page_size = page_size
        self.prefetch_pages = prefetch_pages

    def run(
        self,
        resources: Sequence[str] | None = None,
        trigger: str = "api",
        resume_run_id: int | None = None,
    ) -> RunResult:
        """Ingest ``resources`` (all by default), or resume a failed run.

        Raises :class:`IngestBusy` when another run holds the lock, :class:`IngestFailed`
        when the run stops on an error (its committed pages stay).
        """
        with self.engine.connect() as lock_conn:
            got_lock = lock_conn.execute(
                select(func.pg_try_advisory_lock(INGEST_LOCK_ID))
            ).scalar_one()
            lock_conn.commit()
            if not got_lock:
                raise IngestBusy(self._running_run_id())
            try:
                self._fail_abandoned_runs()
                if resume_run_id is None:
                    run_id = self._start_run(resources or list(RESOURCES), trigger)
                else:
                    run_id = self._reopen_run(resume_run_id)
                return self._execute(run_id)
            finally:
                lock_conn.execute(select(func.pg_advisory_unlock(INGEST_LOCK_ID)))
                lock_conn.commit()

    def _running_run_id(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(IngestRun.id)
                .where(IngestRun.status == "running")
                .order_by(IngestRun.id.desc())
                .limit(1)
            ).scalar()

    def _fail_abandoned_runs(self) -> None:
        """Runs still 'running' while we hold the lock belong to a process that died."""
        with self.engine.begin() as conn:
            conn.execute(
                update(IngestRun)
                .where(IngestRun.status == "running")
                .values(
                    status="failed",
                    finished_at=func.now(),
                    error="interrupted: the process running it stopped before it finished",
                )
            )

    def _start_run(self, resources: Sequence[str], trigger: str) -> int:
        ordered = [name for name in RESOURCES if name in set(resources)]
        with self.engine.begin() as conn:
            run_id = conn.execute(
                insert(IngestRun).values(trigger=trigger, status="running").returning(IngestRun.id)
            ).scalar_one()
            conn.execute(
                insert(IngestRunResource),
                [
                    {"run_id": run_id, "resource": name, "position": i}
                    for i, name in enumerate(ordered)
                ],
            )
        log.info("ingest run %d started (%s): %s", run_id, trigger, ", ".join(ordered))
        return run_id

    def _reopen_run(self, run_id: int) -> int:
        with self.engine.begin() as conn:
            status = conn.execute(
                select(IngestRun.status).where(IngestRun.id == run_id).with_for_update()
            ).scalar()
            if status is None:
                raise RunNotResumable(f"ingest run {run_id} does not exist")
            if status != "failed":
                raise RunNotResumable(f"ingest run {run_id} is {status}; only a failed run resumes")
            conn.execute(
                update(IngestRun)
                .where(IngestRun.id == run_id)
                .values(status="running", finished_at=None, error=None)
            )
        log.info("ingest run %d resumed", run_id)
        return run_id

    def _execute(self, run_id: int) -> RunResult:
        with self.engine.connect() as conn:
            plan = conn.execute(
                select(IngestRunResource.__table__)
                .where(IngestRunResource.run_id == run_id)
                .order_by(IngestRunResource.position)
            ).all()
        try:
            for row in plan:
                if not row.done:
                    self._ingest_resource(run_id, RESOURCES[row.resource], row.next_page)
        except Exception as exc:
            self._finish(run_id, "failed", error=str(exc))
            raise IngestFailed(run_id, exc) from exc
        self._finish(run_id, "succeeded")
        return self.result(run_id)

    def _ingest_resource(self, run_id: int, resource: Resource, start_page: int) -> None:
        writer = PageWriter(resource)
        for page_no, fetched in self._pages(resource, start_page):
            checked = validate_page(resource, fetched.records)
            with self.engine.begin() as conn:
                valid, orphans = split_orphans(conn, resource, checked.valid)
                rejected = checked.rejected + orphans
                inserted, updated, unchanged = writer.write(conn, valid)
                store_rejections(conn, resource, rejected, run_id, page_no)
                conn.execute(
                    update(IngestRunResource)
                    .where(
                        IngestRunResource.run_id == run_id,
                        IngestRunResource.resource == resource.name,
                    )
                    .values(
                        next_page=page_no + 1,
                        pages=IngestRunResource.pages + 1,
                        fetched=IngestRunResource.fetched + len(fetched.records),
                        inserted=IngestRunResource.inserted + inserted,
                        updated=IngestRunResource.updated + updated,
                        unchanged=IngestRunResource.unchanged + unchanged,
                        rejected=IngestRunResource.rejected + len(rejected),
                    )
                )
            if rejected:
                log.info("%s page %d: %d rejected", resource.name, page_no, len(rejected))
        with self.engine.begin() as conn:
            conn.execute(
                update(IngestRunResource)
                .where(
                    IngestRunResource.run_id == run_id,
                    IngestRunResource.resource == resource.name,
                )
                .values(done=True)
            )

    def _pages(self, resource: Resource, start_page: int) -> Iterator[tuple[int, SourcePage]]:
        """Pages from ``start_page`` on, in order; up to ``prefetch_pages`` are fetched ahead
        while the caller writes, so at most that many pages (plus one) sit in memory."""
        path, limit = resource.source_path, self.page_size
        first = self.client.get_page(path, start_page, limit)
        yield start_page, first
        last_page = math.ceil(first.total / limit)
        if not first.records or start_page >= last_page:
            log.info("%s: stopped after page %d of %d", resource.name, start_page, last_page)
            return
        upcoming = iter(range(start_page + 1, last_page + 1))
        with ThreadPoolExecutor(max(self.prefetch_pages, 1), "fetch") as pool:
            window: deque[tuple[int, Future[SourcePage]]] = deque()

            def schedule() -> None:
                page_no = next(upcoming, None)
                if page_no is not None:
                    window.append(
                        (page_no, pool.submit(self.client.get_page, path, page_no, limit))
                    )

            for _ in range(max(self.prefetch_pages, 1)):
                schedule()
            try:
                while window:
                    page_no, future = window.popleft()
                    fetched = future.result()
                    if not fetched.records:
                        log.info("%s: page %d was empty; stopping", resource.name, page_no)
                        return
                    schedule()
                    yield page_no, fetched
            finally:
                for _, future in window:
                    future.cancel()

    def _finish(self, run_id: int, status: str, error: str | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(IngestRun)
                .where(IngestRun.id == run_id)
                .values(status=status, finished_at=func.now(), error=error)
            )
        log.info("ingest run %d %s%s", run_id, status, f": {error}" if error else "")

    def result(self, run_id: int) -> RunResult:
        with self.engine.connect() as conn:
            status = conn.execute(
                select(IngestRun.status).where(IngestRun.id == run_id)
            ).scalar_one()
            rows = conn.execute(
                select(IngestRunResource.__table__)
                .where(IngestRunResource.run_id == run_id)
                .order_by(IngestRunResource.position)
            ).all()
        return RunResult(
            run_id=run_id,
            status=status,
            counts={
                r.resource: Counts(
                    pages=r.pages,
                    fetched=r.fetched,
                    inserted=r.inserted,
                    updated=r.updated,
                    unchanged=r.unchanged,
                    rejected=r.rejected,
                )
                for r in rows
            },
        )


__all__ = ["Ingest", "IngestBusy", "IngestFailed", "RunNotResumable", "SourceError"]
