"""The ingest: walk every page of the source, validate, upsert, and keep the run ledger.

Guarantees:
- one run at a time across processes (a PostgreSQL advisory lock held by the run);
- each page commits in one transaction together with its counts and the run's checkpoint,
  so an interrupted run loses nothing committed and can be resumed where it stopped;
- an invalid record is stored in ``rejected_records`` with its reason, never dropped and
  never fatal to the rest of its page; within a page and a run, the later record wins;
- unchanged records are not rewritten.

How: worker processes fetch, validate and render pages ahead (:class:`PageMaker`) while
this process writes them in order (:class:`PageWriter`): a page of new keys that all sort
after the stored ones with one COPY into the table (its lines numbered with positions by
the worker, :class:`Numbered`), any other page with COPY into a temporary table and one
``INSERT ... ON CONFLICT``. On a re-ingest the workers send pages
unparsed instead (:class:`RawPage`), and only the records whose bytes are not the stored
ones are parsed, validated and rendered here. While a page's outcome is foreseeable, it
is written on a thread of its own as the next page arrives, and up to
:data:`PAGES_WRITTEN_AT_ONCE` pages so, each on its own connection
(:meth:`PageTransactions.write_ahead`): they commit in page order, and a page whose outcome
turns out otherwise is rolled back and written again in turn.
"""

import fcntl
import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import asdict, dataclass, field
from functools import cached_property
from operator import itemgetter
from typing import Any, NamedTuple

import msgspec
import orjson
from pydantic import ValidationError
from sqlalchemy import (
    Connection,
    Engine,
    func,
    insert,
    select,
    text,
    update,
)
from xxhash import xxh3_128_hexdigest

from pipeline_service.config import Settings
from pipeline_service.models import IngestRun, IngestRunResource, RejectedRecord
from pipeline_service.resources import RESOURCES, Resource
from pipeline_service.schemas import describe_errors
from pipeline_service.source import (
    SourceClient,
    SourceError,
    SourcePage,
    parse_json,
    split_records,
)

log = logging.getLogger(__name__)

INGEST_LOCK_ID = 0x1A6E_57  # pg advisory lock key shared by every pipeline process
WORKER_PROCESSES_MIN_PAGES = 8
"""Fewer pages left than this are prepared in threads: starting worker processes costs more."""
PAGES_WRITTEN_AT_ONCE = 1
"""Pages written at the same time, each in its own transaction (see :class:`Ahead`). Two
COPYs appending to one table at once cost PostgreSQL more CPU than they save (both insert
at the right edge of the same indexes). Ingests of a million, four of each, alternating:
PostgreSQL's CPU 3.13-3.24 s with two, 2.86-3.05 s with one; 4.21 s against 4.03 s
(means). A re-ingest, which only reads, took as long either way."""

digest = xxh3_128_hexdigest
"""The digest by which a stored record is recognised, of its fields' CSV row or of its
bytes: 128-bit XXH3 as 32 hex digits, stored as its 16 bytes (bytea). A fast hash, not a
cryptographic one: only the source could make two of its records collide, and would only
hide its own change. Versions before XXH3 stored md5 digests (see :meth:`PageWriter.changed`)."""


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

    @classmethod
    def of(cls, row: Any) -> "Counts":
        """The counts of a ledger row (an ``ingest_run_resources`` row or object)."""
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})


@dataclass
class Rejection:
    raw: Any
    reason: str
    key: str | None


@dataclass
class ValidatedPage:
    valid: list[dict[str, Any]] = field(default_factory=list)
    """The valid source records, unique on key (the later record wins)."""
    bytes_digests: list[str | None] = field(default_factory=list)
    """The :func:`bytes_digests` of each valid record."""
    rejected: list[Rejection] = field(default_factory=list)


def bytes_digests(fetched: SourcePage) -> list[str | None]:
    """The :data:`digest` of each fetched record's JSON exactly as the source wrote it, by
    which a record stored before is recognised without parsing it (:class:`RawPage`); None
    for each record of a page that did not split into records' bytes."""
    if fetched.raws is None:
        return [None] * len(fetched.records)
    return list(map(digest, fetched.raws))


def validate_page(
    resource: Resource,
    raw_records: Sequence[Any],
    digests: Sequence[str | None] | None = None,
) -> ValidatedPage:
    """Validate each raw record on its own: valid ones (deduplicated on key, the later
    record winning) with their ``digests`` of bytes (if known), and rejections with their
    reasons, in input order."""
    if digests is None:
        digests = [None] * len(raw_records)
    result = ValidatedPage()
    by_key: dict[tuple, tuple[dict[str, Any], str | None]] = {}
    for raw, bytes_digest in zip(raw_records, digests, strict=True):
        try:
            record = resource.record.model_validate(raw)
        except ValidationError as exc:
            result.rejected.append(
                Rejection(raw=raw, reason=describe_errors(exc), key=_raw_key(resource, raw))
            )
            continue
        key = resource.key_of(record)
        by_key.pop(key, None)  # re-inserting keeps dict order = position of the later record
        by_key[key] = (raw, bytes_digest)
    result.valid = [raw for raw, _ in by_key.values()]
    result.bytes_digests = [bytes_digest for _, bytes_digest in by_key.values()]
    return result


def check_page(resource: Resource, fetched: SourcePage) -> ValidatedPage:
    """:func:`validate_page` for a fetched page, taking the one-pass fast path when the
    whole page is valid (the common case) and the per-record path otherwise."""
    digests = bytes_digests(fetched)
    if fetched.body is None or not resource.page_validator.all_valid(fetched.body):
        return validate_page(resource, fetched.records, digests)
    last = later_wins(list(map(itemgetter(*resource.key), fetched.records)))
    records = fetched.records
    return ValidatedPage([records[i] for i in last], [digests[i] for i in last])


def later_wins(keys: Sequence[Hashable]) -> list[int]:
    """The places in ``keys`` to keep so that each key stays once, at its last place (the
    later record wins), in order."""
    return sorted({key: i for i, key in enumerate(keys)}.values())


def _raw_key(resource: Resource, raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return None
    parts = [raw.get(name) for name in resource.key]
    if any(p is None or isinstance(p, dict | list) for p in parts):
        return None
    key, _ = storable_json("/".join(str(p) for p in parts))  # a NUL escaped, for one
    return key


class Prepared(NamedTuple):
    """A valid source record made ready to store."""

    key: tuple
    """As PostgreSQL compares keys (timestamps as UTC instants)."""
    line: bytes
    """Its CSV line: the fields, then the digest (and the bytes digest, where kept)."""
    digest: str
    """The :data:`digest` of its fields as rendered: equal digests, equal stored rows."""
    bytes_digest: str | None
    """The :data:`digest` of its JSON as the source wrote it, where known."""
    raw: dict[str, Any] | None
    """The source record, kept only where a missing parent row may still reject it."""


# --- writing one page ------------------------------------------------------------------


class Written(NamedTuple):
    """What an upsert did, counting distinct keys."""

    inserted: int
    updated: int
    unchanged: int
    in_key_order: bool = True
    """Every inserted key sorts after the stored ones: positions numbered on stay exact."""


@dataclass(frozen=True)
class Tail:
    """The greatest stored key of a positioned collection and the greatest position (None
    and 0 when the collection is empty): where appended records go."""

    key: str | None
    position: int


class Append(NamedTuple):
    """Records of new keys that sort after every stored one, ready to COPY into the table."""

    data: bytes
    """Their CSV lines in key order, each with its position."""
    records: int
    tail: Tail
    """The tail once they are stored."""


class PageWriter:
    """Stores pages of validated source records. A page whose keys all sort after every
    stored key (a first load, or a source that grew at its end) is appended with one COPY
    straight into the table; any other page is upserted with two statements: COPY into a
    temporary table, then one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE ... WHERE
    source_hash IS DISTINCT FROM ...``.

    Each row carries a hash of its source record: a stored row is rewritten only when its
    source record changed, so a field edited through the API (a machine's status) survives
    re-ingesting the same record, and an unchanged re-ingest writes no row versions.
    """

    def __init__(self, resource: Resource) -> None:
        target = resource.table.name
        self.resource_name = resource.name
        self.fields = resource.fields
        self.stage = f"stage_{target}"
        self.keeps_bytes_digest = "source_bytes_hash" in resource.table.c
        digests = ("source_hash", "source_bytes_hash")[: 1 + self.keeps_bytes_digest]
        columns = ", ".join(f'"{f}"' for f in (*self.fields, *digests))
        changing = [f for f in self.fields if f not in resource.key]
        updates = ", ".join(f'"{f}" = excluded."{f}"' for f in (*changing, *digests))
        # ord: the record's place in the page, so that PostgreSQL (which knows when two
        # timestamps written differently are the same instant) keeps the later duplicate.
        self.create_stage = text(
            f'CREATE TEMPORARY TABLE IF NOT EXISTS "{self.stage}" ON COMMIT DELETE ROWS '
            f'AS SELECT {columns}, 0::bigint AS ord FROM "{target}" WITH NO DATA'
        )
        # CSV with JSON's own quoting: NULL is an unquoted null, \" a quote inside a string.
        csv = "WITH (FORMAT csv, NULL 'null', ESCAPE '\\')"
        self.copy_sql = f'COPY "{self.stage}" ({columns}, ord) FROM STDIN {csv}'
        key = ", ".join(f'"{k}"' for k in resource.key)
        conflict = f"""
            ON CONFLICT ({key}) DO UPDATE
            SET {updates}, updated_at = now()
            WHERE "{target}".source_hash IS DISTINCT FROM excluded.source_hash
            RETURNING xmax = 0 AS inserted
        """
        self.positioned = resource.positioned
        if not self.positioned:
            self.upsert = text(
                f"""
                WITH src AS (
                    SELECT DISTINCT ON ({key}) {columns} FROM "{self.stage}"
                    ORDER BY {key}, ord DESC
                ), written AS (
                    INSERT INTO "{target}" ({columns}) SELECT {columns} FROM src
                    {conflict}
                )
                SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted),
                       true, (SELECT count(*) FROM src)
                FROM written
                """
            )
        else:
            # New keys get the next positions in key order. That keeps every position
            # exact when they all sort after the stored keys (an append, the usual case);
            # otherwise the collection is marked for renumbering once the resource is done.
            (k,) = resource.key
            self.append_sql = f'COPY "{target}" ({columns}, position) FROM STDIN {csv}'
            self.read_tail = text(f'SELECT max("{k}"), coalesce(max(position), 0) FROM "{target}"')
            staged = ", ".join(f's."{f}"' for f in (*self.fields, *digests))
            self.upsert = text(
                f"""
                WITH fresh AS (
                    -- A LATERAL probe per staged key: an index lookup each, where a plain
                    -- NOT EXISTS may be planned as a scan of the whole table per page.
                    SELECT s."{k}" FROM "{self.stage}" s
                    LEFT JOIN LATERAL (
                        SELECT true AS stored FROM "{target}" t WHERE t."{k}" = s."{k}" LIMIT 1
                    ) found ON true
                    WHERE found.stored IS NULL
                ), top AS (
                    SELECT coalesce(max(position), 0) AS position, max("{k}") AS "{k}"
                    FROM "{target}"
                ), numbered AS (
                    SELECT f."{k}", top.position + row_number() OVER (ORDER BY f."{k}") AS position
                    FROM fresh f CROSS JOIN top
                ), written AS (
                    INSERT INTO "{target}" ({columns}, position)
                    SELECT {staged}, n.position
                    FROM "{self.stage}" s LEFT JOIN numbered n ON n."{k}" = s."{k}"
                    {conflict}
                )
                SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted),
                       coalesce((SELECT min("{k}") FROM fresh) > (SELECT "{k}" FROM top), true),
                       (SELECT count(*) FROM "{self.stage}")
                FROM written
                """
            )
            self.renumber = text(
                f"""
                UPDATE "{target}" t SET position = r.position
                FROM (SELECT "{k}", row_number() OVER (ORDER BY "{k}") AS position
                      FROM "{target}") r
                WHERE t."{k}" = r."{k}" AND t.position IS DISTINCT FROM r.position
                """
            )
            self.mark_exact = text(
                "UPDATE collection_stats SET positions_exact = true WHERE resource = :resource"
            ).bindparams(resource=resource.name)
        self.clear_stage = text(f'DELETE FROM "{self.stage}"')
        # A candidate is stored unchanged when a row carries its digest. Where the key is
        # one column, the stored digests are read with one range scan of the primary key
        # over the page's keys (a page is usually a run of neighbouring keys) and compared
        # here; LIMIT bounds the scan when it is not, and a candidate it misses is merely
        # written again, as an unchanged upsert. Otherwise a LATERAL probe per candidate
        # (LIMIT 1 keeps it an index lookup) finds the row by the digest's own index.
        if len(resource.key) == 1:
            k = resource.key[0]

            def read(columns: Sequence[str]) -> str:
                hexes = ", ".join(f"encode({c}, 'hex')" for c in columns)
                return (
                    f'SELECT "{k}", {hexes} FROM "{target}" '
                    f'WHERE "{k}" BETWEEN %(low)s AND %(high)s ORDER BY "{k}" LIMIT %(most)s'
                )

            self.read_digests = read(digests)
            if self.keeps_bytes_digest:
                self.read_bytes_digests = read(["source_bytes_hash"])
                # :func:`page_digest` of the byte digests stored in a range of keys, in key
                # order (which the primary key's scan gives without a sort).
                self.read_page_digest = (
                    "SELECT count(*), sha256(string_agg(h, '' ORDER BY k)) FROM ("
                    f'SELECT "{k}" AS k, source_bytes_hash AS h FROM "{target}" '
                    f'WHERE "{k}" BETWEEN %(low)s AND %(high)s ORDER BY "{k}" LIMIT %(most)s) s'
                )
            renewed = ["source_hash = decode(v.digest, 'hex')"]
            if self.keeps_bytes_digest:
                renewed.append(
                    "source_bytes_hash = coalesce(decode(v.bytes, 'hex'), t.source_bytes_hash)"
                )
            self.renew_sql = (
                f'UPDATE "{target}" t SET {", ".join(renewed)} '
                "FROM unnest(%(keys)s::text[], %(digests)s::text[], %(bytes)s::text[]) "
                f'v(key, digest, bytes) WHERE t."{k}" = v.key'
            )
        else:
            self.find_changed = text(
                f"""
                SELECT coalesce(array_agg(u.i), '{{}}')
                FROM unnest(CAST(:digests AS text[])) WITH ORDINALITY u(h, i)
                LEFT JOIN LATERAL (
                    SELECT true AS stored FROM "{target}" t
                    WHERE t.source_hash = decode(u.h, 'hex') LIMIT 1
                ) found ON true
                WHERE found.stored IS NULL
                """
            )
        self._by_key = len(resource.key) == 1
        if self._by_key:
            # Decoders of a record's key alone, as a string, from one record or a page.
            (self._key,) = resource.key
            key = msgspec.defstruct("Key", [(self._key, str)])
            self._record_key = msgspec.json.Decoder(key)
            self._page_keys = msgspec.json.Decoder(msgspec.defstruct("Keys", [("data", list[key])]))
        if self.positioned and not self.keeps_bytes_digest:
            raise TypeError(f"{target}: a positioned collection keeps its bytes digests")
        self._nulls = dict.fromkeys(self.fields)
        self._values = itemgetter(*self.fields)

    def values(self, record: dict[str, Any]) -> tuple:
        """The fields of one valid record, in column order (None for one left out)."""
        try:
            return self._values(record)
        except KeyError:  # optional fields left out of the record
            return self._values({**self._nulls, **record})

    def csv_rows(self, records: Sequence[dict[str, Any]]) -> list[bytes]:
        """The fields of each valid record as a CSV row."""
        try:
            values = list(map(self._values, records))
        except KeyError:
            values = list(map(self.values, records))
        return self.csv_rows_of(values)

    def csv_rows_of(self, values: Sequence[tuple]) -> list[bytes]:
        """:meth:`csv_rows` from records' :meth:`values`. The whole page is rendered in one
        call when it can be, giving the very same rows."""
        try:
            dumped = orjson.dumps(values)
        except TypeError:  # an integer beyond 64 bits, valid only in a float column
            dumped = None
        if dumped is not None and b"\\" not in dumped:
            rows = dumped[2:-2].split(b"],[")
            # Splitting is exact when "],[" occurs only between records, never in a value.
            if len(rows) == len(values):
                return rows
        return list(map(self._csv_row, values))

    @staticmethod
    def _csv_row(values: tuple) -> bytes:
        row = _dumps(values)[1:-1]
        if b"\\" in row:  # JSON escapes other than \" and \\ mean nothing to CSV
            row = b",".join(_csv_value(v) for v in values)
        return row

    def csv_lines(
        self, rows: Sequence[bytes], bytes_digests: Sequence[str | None]
    ) -> tuple[list[bytes], list[str]]:
        """The CSV line of each of ``rows`` (:meth:`csv_rows`) and its :data:`digest`, of
        the fields' row. A line holds the row, the digest and, where the table keeps it,
        the record's ``bytes_digests`` entry (null if unknown)."""
        digests = list(map(digest, rows))
        ends = self._line_ends(bytes_digests)
        # bytea in its hex form, unquoted: CSV takes the backslash as it is.
        lines = [
            b"%s,\\x%s%s" % (r, d.encode(), e) for r, d, e in zip(rows, digests, ends, strict=False)
        ]
        return lines, digests

    def _line_ends(self, bytes_digests: Sequence[str | None]) -> Iterable[bytes]:
        """What follows the digest in each line: the bytes digest, where the table keeps it."""
        if not self.keeps_bytes_digest:
            return itertools.repeat(b"")
        return [b",\\x%s" % b.encode() if b else b",null" for b in bytes_digests]

    def stored_digests(
        self, conn: Connection, low: str, high: str, records: int, query: str
    ) -> list[tuple]:
        """Stored rows as ``query`` reads them (:attr:`read_digests`, all digests, or
        :attr:`read_bytes_digests`): the key, then digests, of keys from ``low`` to ``high``
        (a one-column key), at most twice as many as ``records``, the records looked for."""
        bounds = {"low": low, "high": high, "most": 2 * records}
        with closing(conn.connection.dbapi_connection.cursor()) as cursor:
            cursor.execute(query, bounds)
            return cursor.fetchall()

    def changed(
        self, conn: Connection, page: "PreparedPage"
    ) -> tuple[list[Prepared], list[Prepared]]:
        """The records of ``page`` that are not stored as they are, to be written; and
        those that are, but under other digests, whose digests alone are to be renewed
        (:meth:`renew_digests`): the source wrote them with other bytes (reformatted, say),
        or an earlier version stored an md5 digest of the same fields' row."""
        candidates = page.candidates()
        if not candidates:
            return page.records, []
        if not self._by_key:
            # Found by the digest's own index. Rows stored under an earlier version's
            # digest are written once more (no field of these is set through the API).
            digests = "{" + ",".join(candidates.values()) + "}"  # cheaper than parameters
            found = conn.execute(self.find_changed, {"digests": digests}).scalar()
            if len(found) == len(candidates):
                return page.records, []
            numbers = set(found)  # 1-based, in the order of candidates
            stale = {d for i, d in enumerate(candidates.values(), 1) if i in numbers}
            return [r for r in page.records if r.key not in candidates or r.digest in stale], []
        keys = [key for (key,) in candidates]
        rows = self.stored_digests(conn, min(keys), max(keys), len(keys), self.read_digests)
        stored = {key: digests for key, *digests in rows}
        changed, renewed = [], []
        for record in page.records:
            found = stored.get(record.key[0]) if record.key in candidates else None
            if found is None:
                changed.append(record)
            elif found[0] == record.digest:
                bytes_digest = record.bytes_digest
                if self.keeps_bytes_digest and bytes_digest not in (None, found[1]):
                    renewed.append(record)
            elif found[0] == self._md5_digest(record):
                renewed.append(record)
            else:
                changed.append(record)
        return changed, renewed

    def _md5_digest(self, record: Prepared) -> str:
        """The digest an earlier version stored for ``record``: the md5 of its fields' row
        (the line without its digests)."""
        row = record.line.rsplit(b",", 1 + self.keeps_bytes_digest)[0]
        return hashlib.md5(row).hexdigest()

    def renew_digests(self, conn: Connection, records: Sequence[Prepared]) -> None:
        """Give the rows of ``records`` (stored with the same fields) the records' digests,
        in ``conn``'s transaction, leaving their fields and ``updated_at`` as they are."""
        if not records:
            return
        params = {
            "keys": [r.key[0] for r in records],
            "digests": [r.digest for r in records],
            "bytes": [r.bytes_digest for r in records],
        }
        with closing(conn.connection.dbapi_connection.cursor()) as cursor:
            cursor.execute(self.renew_sql, params)

    def changed_raw(self, conn: Connection, page: "RawPage") -> list[int]:
        """The places in ``page`` of the records whose bytes are not the stored ones: a
        row stored from these very bytes (which were valid) needs nothing. A key that
        occurs twice is always among them, so that the later record wins."""
        digests = page.bytes_digests
        low, high = page.bounds
        # The usual case in one row: the rows stored between the page's first and last
        # keys carry, in key order, the page's byte digests in page order (a source
        # usually serves its records in key order). Then the page's digests are distinct
        # (keys are stored once, and a record's bytes hold its key) and each is a stored
        # one, so each record is stored as it is; otherwise the rows are read one by one.
        bounds = {"low": low, "high": high, "most": len(digests) + 1}
        with closing(conn.connection.dbapi_connection.cursor()) as cursor:
            cursor.execute(self.read_page_digest, bounds)
            rows, stored_digest = cursor.fetchone()  # bytea comes as a memoryview, or None
        if rows == len(digests) and bytes(stored_digest or b"") == page.page_digest:
            return []
        query = self.read_bytes_digests
        stored = dict(self.stored_digests(conn, low, high, len(digests), query))
        # A row's digest is that of the very bytes it was stored from, its key among them,
        # and a key is stored once: when the page's digests are distinct and each is a
        # stored one, every record is stored as it is, each under a key of its own. Only
        # otherwise are the keys read.
        distinct = set(digests)
        if len(distinct) == len(digests) and distinct <= set(stored.values()):
            return []
        keys = self.page_keys(page.body)
        if keys is None:
            return list(range(len(digests)))
        least, greatest = min(keys), max(keys)
        if least < low or greatest > high:
            stored = dict(self.stored_digests(conn, least, greatest, len(keys), query))
        twice = repeated(keys)
        return [
            i
            for i, (key, digest) in enumerate(zip(keys, digests, strict=True))
            if stored.get(key) != digest or key in twice
        ]

    def key_bounds(self, raws: Sequence[msgspec.Raw]) -> tuple[str, str] | None:
        """The keys of the first and the last of a page's records (``raws``, as the source
        wrote them), least first; None unless both are strings PostgreSQL can compare."""
        try:
            first, last = (
                getattr(self._record_key.decode(r), self._key) for r in (raws[0], raws[-1])
            )
        except msgspec.DecodeError:
            return None
        if "\x00" in first or "\x00" in last:
            return None
        return min(first, last), max(first, last)

    def page_keys(self, body: bytes) -> list[str] | None:
        """The key of each record of a page, read alone; None unless every one is a string
        that PostgreSQL can compare (no NUL)."""
        if b"\\" in body and b"\\u0000" in body:  # a one-byte search first: many times faster
            return None
        try:
            page = self._page_keys.decode(body)
        except msgspec.DecodeError:
            return None
        return [getattr(record, self._key) for record in page.data]

    def tail(self, conn: Connection) -> Tail | None:
        """Where records can be appended; None for a collection without positions."""
        if not self.positioned:
            return None
        key, position = conn.execute(self.read_tail).one()
        return Tail(key, position)

    def plan_append(self, records: "Columns | Numbered", tail: Tail | None) -> "Append | None":
        """If every key of ``records`` (of a positioned collection) sorts after ``tail.key``,
        so that none is stored, the COPY that stores them numbered on from
        ``tail.position`` in key order (:meth:`append`); otherwise None."""
        if tail is None or not isinstance(records, Numbered) or not records.keys:
            return None
        keys = records.keys
        # Python orders strings as the keys' "C" collation does (code points = UTF-8 bytes).
        if tail.key is not None and keys[0] <= tail.key:
            return None
        data = records.numbered_from(tail.position)
        return Append(data, len(keys), Tail(keys[-1], tail.position + len(keys)))

    def numbered(
        self,
        keys: Sequence[str],
        rows: Sequence[bytes],
        bytes_digests: Sequence[str | None],
        base: int,
    ) -> "Numbered":
        """Records of a positioned collection, of unique ``keys``, as :class:`Numbered`
        from their :meth:`csv_rows` and ``bytes_digests``: in key order, numbered on from
        ``base``."""
        order = sorted(range(len(keys)), key=keys.__getitem__)
        rows = [rows[i] for i in order]
        ends = self._line_ends([bytes_digests[i] for i in order])
        numbered = [  # as csv_lines renders them, each with its position
            b"%s,\\x%s%s,%d" % (r, digest(r).encode(), e, n)
            for r, e, n in zip(rows, ends, itertools.count(base + 1))
        ]
        lengths = list(map(len, numbered))
        return Numbered(b"\n".join(numbered), lengths, [keys[i] for i in order], base)

    def append(self, conn: Connection, plan: "Append") -> None:
        """Store the records of ``plan`` (:meth:`plan_append`) in ``conn``'s transaction;
        the caller adds them to the collection's total."""
        self._copy(conn, self.append_sql, plan.data)

    def write(self, conn: Connection, records: Sequence[Prepared]) -> "Written":
        """Upsert ``records`` in ``conn``'s transaction, without committing; of records with
        the same key (as PostgreSQL compares them) the later wins. Counts distinct keys; the
        caller adds the inserted ones to the collection's total."""
        if not records:
            return Written(0, 0, 0)
        data = b"\n".join([b"%s,%d" % (r.line, i) for i, r in enumerate(records)])
        conn.execute(self.create_stage)
        self._copy(conn, self.copy_sql, data)
        inserted, updated, in_key_order, distinct = conn.execute(self.upsert).one()
        conn.execute(self.clear_stage)
        return Written(inserted, updated, distinct - inserted - updated, in_key_order)

    @staticmethod
    def _copy(conn: Connection, sql: str, data: bytes) -> None:
        with closing(conn.connection.dbapi_connection.cursor()) as cursor:
            cursor.copy_expert(sql, io.BytesIO(data), size=len(data) + 1)

    def settle_positions(self, conn: Connection) -> None:
        """Renumber positions in key order if an ingest left them inexact (keys inserted
        between stored ones); rows whose position is already right are not rewritten."""
        if not self.positioned:
            return
        exact = conn.execute(
            text("SELECT positions_exact FROM collection_stats WHERE resource = :r"),
            {"r": self.resource_name},
        ).scalar()
        if exact is False:
            conn.execute(self.renumber)
            conn.execute(self.mark_exact)


def repeated(keys: Sequence[Hashable]) -> set[Hashable]:
    """The keys that occur more than once in ``keys``."""
    if len(set(keys)) == len(keys):
        return set()
    return {key for key, n in Counter(keys).items() if n > 1}


def _csv_value(value: Any) -> bytes:
    if value is None:
        return b"null"
    if isinstance(value, str):
        return b'"' + value.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'
    return _dumps(value)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, valid only in a float column
        return json.dumps(value).encode()


def split_orphans(
    conn: Connection, resource: Resource, records: list[Prepared]
) -> tuple[list[Prepared], list[Rejection]]:
    """Separate records whose parent row does not exist (e.g. a reading of an unknown machine)."""
    if resource.parent is None or not records:
        return records, []
    parent = RESOURCES[resource.parent.resource]
    column = resource.parent.column
    wanted = {r.raw[column] for r in records}
    known = set(
        conn.execute(
            select(parent.table.c[column]).where(parent.table.c[column].in_(wanted))
        ).scalars()
    )
    if len(known) == len(wanted):
        return records, []
    kept, orphans = [], []
    for record in records:
        value = record.raw[column]
        if value in known:
            kept.append(record)
        else:
            orphans.append(
                Rejection(
                    raw=record.raw,
                    reason=f"{column}: no {parent.name[:-1]} {value!r} exists",
                    key=_raw_key(resource, record.raw),
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


class Columns(NamedTuple):
    """Records made ready to store, field by field of :class:`Prepared`: the form in which
    those of a collection without positions leave a worker process (a list of named tuples
    pickles several times slower); see :class:`Numbered` for the others."""

    keys: list[tuple]
    lines: list[bytes]
    digests: list[str]
    bytes_digests: Sequence[str | None]
    raws: list[dict[str, Any]] | None
    """Kept only where a missing parent row may still reject a record."""

    def records(self) -> list[Prepared]:
        """The records, one named tuple each."""
        raws = self.raws or itertools.repeat(None, len(self.keys))
        columns = (self.keys, self.lines, self.digests, self.bytes_digests, raws)
        return list(map(Prepared, *columns))


class Numbered(NamedTuple):
    """Records of a positioned collection made ready to store, in the form in which they
    leave a worker process: one buffer, which pickles far faster than a line per record,
    and which an append sends to PostgreSQL as it is (:meth:`PageWriter.plan_append`) when
    the collection's tail is where the page's asker expected it."""

    data: bytes
    """Their CSV lines in key order, each a :meth:`PageWriter.csv_lines` line and its
    position, joined by newlines. A line may itself hold a newline (inside a quoted value)."""
    lengths: list[int]
    """The length of each line."""
    keys: list[str]
    """Their keys (one text column, unique), in key order."""
    base: int
    """The position before the first record's."""

    def lines(self) -> Iterator[bytes]:
        """Each line without its position."""
        start = 0
        for length in self.lengths:
            yield self.data[start : start + length].rpartition(b",")[0]
            start += length + 1

    def numbered_from(self, base: int) -> bytes:
        """:attr:`data` with the records numbered on from ``base``."""
        if base == self.base:
            return self.data
        return b"\n".join(map(b"%s,%d".__mod__, zip(self.lines(), itertools.count(base + 1))))

    def records(self) -> list[Prepared]:
        """The records, one named tuple each, in key order."""
        records = []
        for key, line in zip(self.keys, self.lines(), strict=True):
            _, field_digest, bytes_digest = line.rsplit(b",", 2)
            known = None if bytes_digest == b"null" else bytes_digest[2:].decode()
            records.append(Prepared((key,), line, field_digest[2:].decode(), known, None))
        return records


@dataclass
class PreparedPage:
    """A fetched page, validated and rendered: just what the writer needs, so that it pickles
    cheaply from a worker process."""

    total: int
    """The collection's size, as the source gave it with this page."""
    fetched: int
    prepared: Columns | Numbered
    """:class:`Numbered` for a positioned collection."""
    rejected: list[Rejection]

    @cached_property
    def records(self) -> list[Prepared]:
        """The valid records, unique on key (the later record wins), in page order."""
        return self.prepared.records()

    def candidates(self) -> dict[tuple, str]:
        """Digest by key of the records that may be found stored unchanged: not those whose
        key occurs twice as PostgreSQL compares keys, where the later record must win."""
        found = {r.key: r.digest for r in self.records}
        if len(found) < len(self.records):
            for key in repeated([r.key for r in self.records]):
                del found[key]
        return found

    def __getstate__(self) -> dict[str, Any]:
        """Only the columns travel; :attr:`records` is rebuilt where it is needed."""
        return {name: value for name, value in vars(self).items() if name != "records"}


@dataclass
class RawPage:
    """A fetched page left as the source wrote it: each record's bytes digest, the keys of
    its first and last records, and the body. When most records are stored already, only
    those whose bytes differ need parsing, validating and rendering
    (:meth:`PageWriter.changed_raw`, :func:`prepare_raw`)."""

    total: int
    bounds: tuple[str, str]
    """The least and the greatest key of its first and last records: where the stored
    records are looked for first."""
    bytes_digests: list[str]
    body: bytes
    """Whole, not split into records: one buffer travels from a worker far cheaper."""
    page_digest: bytes
    """:func:`page_digest` of :attr:`bytes_digests`."""

    @property
    def fetched(self) -> int:
        return len(self.bytes_digests)


def page_digest(bytes_digests: Sequence[str]) -> bytes:
    """SHA-256 of the 16-byte digests given in hex, one after the other: one value for a
    page's records, which :attr:`PageWriter.read_page_digest` computes alike from rows."""
    return hashlib.sha256(bytes.fromhex("".join(bytes_digests))).digest()


def prepare_page(
    resource: Resource, writer: "PageWriter", fetched: SourcePage, base: int = 0
) -> PreparedPage:
    """Validate one fetched page and render its valid records (numbered on from ``base``,
    in a positioned collection)."""
    checked = check_page(resource, fetched)
    prepared = prepare_columns(resource, writer, checked.valid, checked.bytes_digests, base)
    return PreparedPage(fetched.total, len(fetched.records), prepared, checked.rejected)


def prepare_raw(
    resource: Resource, writer: "PageWriter", page: RawPage, places: Sequence[int]
) -> PreparedPage:
    """The records of ``page`` at ``places``, validated and rendered as :func:`prepare_page`
    does (one by one: they are usually few)."""
    raws = split_records(page.body) if places else []
    records = [parse_json(bytes(raws[i])) for i in places]
    checked = validate_page(resource, records, [page.bytes_digests[i] for i in places])
    prepared = prepare_columns(resource, writer, checked.valid, checked.bytes_digests)
    return PreparedPage(page.total, page.fetched, prepared, checked.rejected)


def prepare_records(
    resource: Resource, writer: "PageWriter", valid: Sequence[dict[str, Any]]
) -> list[Prepared]:
    """Valid source records made ready for :meth:`PageWriter.write`."""
    return prepare_columns(resource, writer, valid).records()


def prepare_columns(
    resource: Resource,
    writer: "PageWriter",
    valid: Sequence[dict[str, Any]],
    bytes_digests: Sequence[str | None] | None = None,
    base: int = 0,
) -> Columns | Numbered:
    """:func:`prepare_records`, column by column (in a positioned collection,
    :class:`Numbered` on from ``base``), with the digests of the records' bytes where
    known."""
    bytes_digests = bytes_digests or [None] * len(valid)
    rows = writer.csv_rows(valid)
    if resource.positioned:
        keys = [key for (key,) in resource.canonical_keys(valid)]
        return writer.numbered(keys, rows, bytes_digests, base)
    lines, digests = writer.csv_lines(rows, bytes_digests)
    raws = list(valid) if resource.parent is not None else None
    return Columns(resource.canonical_keys(valid), lines, digests, bytes_digests, raws)


def prepare_values(
    resource: Resource,
    writer: "PageWriter",
    fetched: SourcePage,
    values: list[tuple],
    base: int = 0,
) -> PreparedPage:
    """A fetched page of a resource keyed by one text column and without a parent, all of
    whose records are valid, prepared as :func:`prepare_page` would from its records'
    field values (:meth:`PageValidator.valid_values`): the page is parsed once."""
    digests = bytes_digests(fetched)
    keys = list(map(itemgetter(resource.fields.index(resource.key[0])), values))
    if len(set(keys)) < len(keys):
        last = later_wins(keys)
        keys, values = [keys[i] for i in last], [values[i] for i in last]
        digests = [digests[i] for i in last]
    rows = writer.csv_rows_of(values)
    prepared: Columns | Numbered
    if resource.positioned:
        prepared = writer.numbered(keys, rows, digests, base)
    else:
        lines, field_digests = writer.csv_lines(rows, digests)
        prepared = Columns(list(zip(keys)), lines, field_digests, digests, None)
    return PreparedPage(fetched.total, len(fetched.raws), prepared, [])


class PageMaker:
    """Fetches and prepares pages: in a worker process, or in the caller's threads."""

    def __init__(self, settings: Settings) -> None:
        self.client = SourceClient(settings)
        self.page_size = settings.ingest_page_size
        self.writers = {name: PageWriter(resource) for name, resource in RESOURCES.items()}

    def __call__(
        self, resource_name: str, page_no: int, raw: bool = False, base: int = 0
    ) -> PreparedPage | RawPage:
        """Page ``page_no`` prepared (numbered on from position ``base``, in a positioned
        collection); with ``raw``, as a :class:`RawPage` where the resource's key is one
        column and the keys of the page's first and last records are strings."""
        resource = RESOURCES[resource_name]
        # Pages of records with one text key and no parent are parsed once where valid.
        by_key = len(resource.key) == 1
        by_values = by_key and resource.parent is None
        raw = raw and by_key
        path, size = resource.source_path, self.page_size
        fetched = self.client.get_page(path, page_no, size, parse=not (raw or by_values))
        writer = self.writers[resource_name]
        if fetched.records is None:
            bounds = writer.key_bounds(fetched.raws) if raw and fetched.raws else None
            if bounds is not None:
                digests = bytes_digests(fetched)
                return RawPage(fetched.total, bounds, digests, fetched.body, page_digest(digests))
            values = resource.page_validator.valid_values(fetched.body) if by_values else None
            if values is not None:
                return prepare_values(resource, writer, fetched, values, base)
            fetched.records = parse_json(fetched.body)["data"]
            if by_values:  # the whole page was checked already: record by record now
                fetched.body = None
        return prepare_page(resource, writer, fetched, base)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Page workers fork from a server process that has this module imported already: a
    fresh interpreter, so they inherit neither the serving process's threads nor its
    database connections, yet start in milliseconds."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def start_worker_server() -> None:
    """Start the server page workers fork from, so that no ingest waits for it (it takes
    about half a second); later calls return at once."""
    _worker_context()
    multiprocessing.forkserver.ensure_running()


RESULT_PIPE_BYTES = 1 << 20
"""Room in a worker's result pipe: a whole page (~300 KB for 1,000 customers) at once."""


class WorkerStopped(Exception):
    """A page worker process ended without answering."""


class PageWorkers:
    """Worker processes that fetch and prepare pages (:class:`PageMaker`), each over its
    own pair of pipes: pages asked of one worker come back from it in the order asked.

    Leaner than a process pool, which hands tasks and results over through two threads of
    its own in this process: measured at 200,000 customers, the writing process spent
    3.3-4.1 ms of CPU per page of 1,000 instead of 4.6-4.9. Each result pipe is widened
    where the system allows, so that a page crosses in one piece: through the default
    64 KB, sending and receiving a 290 KB page costs ~1 ms of CPU, in one piece ~0.4 ms.
    """

    def __init__(self, count: int, settings: Settings) -> None:
        context = _worker_context()
        self._links: list[tuple[multiprocessing.connection.Connection, ...]] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        try:
            for _ in range(count):
                task_out, task_in = context.Pipe(duplex=False)
                result_out, result_in = context.Pipe(duplex=False)
                process = context.Process(
                    target=_serve_pages,
                    args=(task_out, result_in, settings, os.getpid()),
                    name="page-worker",
                    daemon=True,
                )
                process.start()
                task_out.close()
                result_in.close()
                widen_pipe(result_out)
                self._links.append((task_in, result_out))
                self.processes.append(process)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._links)

    def ask(self, worker: int, *task: Any) -> None:
        """Ask worker number ``worker`` for ``PageMaker(*task)``."""
        try:
            self._links[worker][0].send(task)
        except BrokenPipeError:
            raise self._stopped(worker) from None

    def answer(self, worker: int) -> PreparedPage | RawPage:
        """The page worker number ``worker`` made for the earliest task not yet answered;
        raises what making it raised."""
        try:
            result = self._links[worker][1].recv()
        except EOFError:
            raise self._stopped(worker) from None
        if isinstance(result, BaseException):
            raise result
        return result

    def _stopped(self, worker: int) -> WorkerStopped:
        process = self.processes[worker]
        process.join(timeout=1)
        return WorkerStopped(f"a page worker stopped unexpectedly (exit code {process.exitcode})")

    def close(self) -> None:
        """Stop the workers: they finish the page at hand and find nobody to send it to."""
        for link in self._links:
            for end in link:
                end.close()
        for process in self.processes:
            process.join(timeout=5)
            if process.exitcode is None:
                process.kill()
                process.join()


def widen_pipe(connection: multiprocessing.connection.Connection) -> bool:
    """Give the pipe read through ``connection`` :data:`RESULT_PIPE_BYTES` of room;
    returns whether it could (Linux only; elsewhere, or beyond the system's limit, the pipe
    stays as it is)."""
    try:
        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, RESULT_PIPE_BYTES)
    except (AttributeError, OSError) as exc:
        log.debug("page results keep the default pipe size: %s", exc)
        return False
    return True


def _serve_pages(
    tasks: multiprocessing.connection.Connection,
    results: multiprocessing.connection.Connection,
    settings: Settings,
    owner_pid: int,
) -> None:
    """A page worker's life: make each page asked for and send it back, until the tasks
    pipe closes or nobody reads the results."""
    threading.Thread(target=_exit_with_owner, args=(owner_pid,), daemon=True).start()
    maker = PageMaker(settings)
    while True:
        try:
            task = tasks.recv()
        except EOFError:
            return
        try:
            result: Any = maker(*task)
        except Exception as exc:
            result = exc
        try:
            results.send(result)
        except BrokenPipeError:
            return
        except Exception as exc:  # a result or exception that does not pickle
            results.send(RuntimeError(f"page worker: {exc!r} while sending {result!r:.200}"))


def _exit_with_owner(owner_pid: int) -> None:
    """End this worker once the process that started it is gone (even killed with -9, when
    it cannot say so): the worker holds its own task pipe open and would wait forever."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            os._exit(0)


# --- the run -----------------------------------------------------------------------------


@dataclass
class PageMode:
    """How pages are asked for: as :class:`RawPage` while the records of those turn out
    stored as they are (a re-ingest), else prepared in full by the workers."""

    raw: bool
    page_size: int
    stored_as_is: bool = False
    """Every record of the last raw page was found stored as it is."""
    known_tail: tuple[int, int] = (0, 0)
    """A page and the collection's last position once it is stored, the latest known."""

    def base(self, page_no: int) -> int:
        """The position the collection is expected to end at before page ``page_no``: each
        page after the latest known adding a page of new records, as on a first ingest.
        Pages are numbered on from it where they are made; a wrong guess costs the writer
        their renumbering (:meth:`Numbered.numbered_from`)."""
        page, position = self.known_tail
        return position + (page_no - page - 1) * self.page_size

    def stored(self, page_no: int, tail: Tail | None) -> None:
        """Learn where page ``page_no`` leaves the collection (no tail: no positions)."""
        if tail is not None:
            self.known_tail = (page_no, tail.position)

    def observe(self, records: int, unrecognised: int) -> None:
        """Learn from a raw page of ``records`` of which ``unrecognised`` had other bytes
        than the stored ones. The writer prepares those alone, which pays only while they
        are few; once they are not, the rest of the pages come prepared in full."""
        self.raw = self.raw and unrecognised * 4 <= records
        self.stored_as_is = unrecognised == 0


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


# The end of a page's transaction, in one round trip: its checkpoint and counts in the
# ledger, and the records inserted added to the collection's total (only collections
# served by position have one), whose positions are marked for renumbering when keys
# landed between stored ones. The commit need not
# wait for its WAL flush: page and checkpoint commit together, so a crash loses both and a
# resume fetches the page again. The run's final commit is synchronous and flushes all.
# A statement prepared once per connection (planning the two updates cost more than
# running them), run on the driver's cursor: through SQLAlchemy, setting up the result
# cost as much again, on every page. (A data-modifying WITH runs whether or not read.)
PREPARE_PAGE_DONE = """
    PREPARE pipeline_page_done(bigint, text, int, int, int, int, int, int, boolean) AS
    WITH stats AS (
        UPDATE collection_stats
        SET total = total + $4, positions_exact = positions_exact AND $9
        WHERE resource = $2 AND ($4 > 0 OR NOT $9)
    )
    UPDATE ingest_run_resources SET
        next_page = $3 + 1, pages = pages + 1, fetched = fetched + $5, inserted = inserted + $4,
        updated = updated + $6, unchanged = unchanged + $7, rejected = rejected + $8
    WHERE run_id = $1 AND resource = $2
"""
PAGE_DONE = """
    SET LOCAL synchronous_commit = off;
    EXECUTE pipeline_page_done(
        %(run_id)s, %(resource)s, %(page_no)s, %(inserted)s, %(fetched)s, %(updated)s,
        %(unchanged)s, %(rejected)s, %(in_key_order)s
    )
"""


class Ahead(NamedTuple):
    """A page being written while the pages before it may still be."""

    page_no: int
    page: "PreparedPage | RawPage"
    tail: Tail | None
    """The collection's tail once it has committed."""
    done: Future
    """True once committed; False if rolled back, to be written again in turn."""


class _WriteInTurn(Exception):
    """A page written ahead cannot commit as it is: roll it back."""


class PageTransactions:
    """The transactions that store one resource's pages in one run: each page's records
    together with its rejections, its counts and the run's checkpoint."""

    def __init__(
        self, engine: Engine, run_id: int, resource: Resource, look_up: bool, mode: "PageMode"
    ) -> None:
        self.engine = engine
        self.run_id = run_id
        self.resource = resource
        self.writer = PageWriter(resource)
        self.look_up = look_up
        """Whether records may be stored already (else the table was empty at the start)."""
        self.mode = mode

    def write(self, page_no: int, page: "PreparedPage | RawPage", tail: Tail | None) -> Tail | None:
        """Store ``page`` with every page before it committed, ``tail`` being where they
        left the collection; returns the tail once it has committed."""
        writer = self.writer
        with self.engine.begin() as conn:
            # Records found stored as they are: by their bytes (a raw page), then by
            # their fields (bytes that differ may still hold the stored fields).
            skipped = 0
            if isinstance(page, RawPage):
                places = writer.changed_raw(conn, page)
                self.mode.observe(page.fetched, len(places))
                skipped = page.fetched - len(places)
                page = prepare_raw(self.resource, writer, page, places)
            rejected = page.rejected
            append = writer.plan_append(page.prepared, tail)
            if append is not None:  # all new: no record to look up
                writer.append(conn, append)
                written, tail = Written(append.records, 0, 0), append.tail
            else:
                records = page.records
                if self.look_up and records:
                    records, renewed = writer.changed(conn, page)
                    writer.renew_digests(conn, renewed)
                skipped += len(page.records) - len(records)
                valid, orphans = split_orphans(conn, self.resource, records)
                rejected = rejected + orphans
                written = writer.write(conn, valid)
                tail = writer.tail(conn) if written.inserted else tail
            self._done(conn, page_no, page.fetched, written, skipped, rejected)
        self._log_rejected(page_no, rejected)
        return tail

    def write_ahead(
        self,
        page_no: int,
        page: "PreparedPage | RawPage",
        append: Append | None,
        before: Future | None,
    ) -> bool:
        """Store ``page`` while the page before it may still be writing (``before``, a
        future of this method's answer): records of new keys as ``append`` says, or (a raw
        page, ``append`` None) nothing, its records being found stored as they are. Only the
        page's checkpoint waits for ``before`` to commit, so pages commit in order.

        Returns True once committed. Returns False, having written nothing, when the raw
        page has records to write or ``before`` did not commit: the caller writes the page
        again, in turn (:meth:`write`). Raises what ``before`` raised."""
        try:
            with self.engine.begin() as conn:
                if append is None:
                    if self.writer.changed_raw(conn, page):
                        raise _WriteInTurn
                    written, skipped, rejected = Written(0, 0, 0), page.fetched, []
                else:
                    self.writer.append(conn, append)
                    written, skipped, rejected = Written(append.records, 0, 0), 0, page.rejected
                if before is not None and not before.result():
                    raise _WriteInTurn
                self._done(conn, page_no, page.fetched, written, skipped, rejected)
        except _WriteInTurn:
            return False
        self._log_rejected(page_no, rejected)
        return True

    def _done(
        self,
        conn: Connection,
        page_no: int,
        fetched: int,
        written: Written,
        skipped: int,
        rejected: Sequence[Rejection],
    ) -> None:
        store_rejections(conn, self.resource, rejected, self.run_id, page_no)
        with closing(conn.connection.dbapi_connection.cursor()) as cursor:
            if not conn.info.get("page_done_prepared"):  # kept with the driver's connection
                cursor.execute(PREPARE_PAGE_DONE)
                conn.info["page_done_prepared"] = True
            cursor.execute(
                PAGE_DONE,
                {
                    "run_id": self.run_id,
                    "resource": self.resource.name,
                    "page_no": page_no,
                    "fetched": fetched,
                    "inserted": written.inserted,
                    "updated": written.updated,
                    "unchanged": written.unchanged + skipped,
                    "rejected": len(rejected),
                    "in_key_order": written.in_key_order,
                },
            )

    def _log_rejected(self, page_no: int, rejected: Sequence[Rejection]) -> None:
        if rejected:
            log.info("%s page %d: %d rejected", self.resource.name, page_no, len(rejected))


class Ingest:
    """Runs ingests against one database and one source."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.page_size = settings.ingest_page_size
        self.workers = settings.ingest_workers

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
        """The run holding the lock; it may take a moment after locking to register."""
        for _ in range(20):
            with self.engine.connect() as conn:
                run_id = conn.execute(
                    select(IngestRun.id)
                    .where(IngestRun.status == "running")
                    .order_by(IngestRun.id.desc())
                    .limit(1)
                ).scalar()
            if run_id is not None:
                return run_id
            time.sleep(0.05)
        return None

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
        """Store every page of ``resource`` from ``start_page`` on, in page order. While
        a page's outcome can be foreseen (new keys after the stored ones; on a re-ingest,
        records stored as they are, as those of the last raw page were), it is written on a
        thread while the next page arrives, beside up to :data:`PAGES_WRITTEN_AT_ONCE` - 1
        pages before it still writing; see :meth:`PageTransactions.write_ahead`."""
        with self.engine.connect() as conn:
            # Records of an empty table cannot be stored unchanged: no need to look for them.
            key = resource.key_columns[0]
            look_up = conn.execute(select(key).limit(1)).first() is not None
            mode = PageMode(raw=look_up, page_size=self.page_size)
            pages = PageTransactions(self.engine, run_id, resource, look_up, mode)
            committed = pages.writer.tail(conn)  # as the last committed page left it
            mode.stored(start_page - 1, committed)
        ahead: deque[Ahead] = deque()
        pool = ThreadPoolExecutor(PAGES_WRITTEN_AT_ONCE, "write")

        def settle(most: int) -> None:
            """Wait until at most ``most`` pages are being written ahead."""
            nonlocal committed
            while len(ahead) > most:
                first = ahead.popleft()
                if first.done.result():  # raises the page's error
                    committed = first.tail
                    if isinstance(first.page, RawPage):
                        mode.observe(first.page.fetched, 0)
                    continue
                # Rolled back, and so is every page after it: write them again, in turn.
                again = [first, *ahead]
                ahead.clear()
                wait([a.done for a in again])
                for a in again:
                    committed = pages.write(a.page_no, a.page, committed)

        try:
            for page_no, page in self._pages(resource, start_page, mode):
                settle(PAGES_WRITTEN_AT_ONCE - 1)
                tail = ahead[-1].tail if ahead else committed
                append = None
                if isinstance(page, PreparedPage):
                    append = pages.writer.plan_append(page.prepared, tail)
                # Otherwise the outcome depends on what is stored: write it in turn.
                if append is None and not (isinstance(page, RawPage) and mode.stored_as_is):
                    settle(0)
                    committed = tail = pages.write(page_no, page, committed)
                else:
                    before = ahead[-1].done if ahead else None
                    done = pool.submit(pages.write_ahead, page_no, page, append, before)
                    tail = append.tail if append else tail
                    ahead.append(Ahead(page_no, page, tail, done))
                mode.stored(page_no, tail)
            settle(0)
        finally:
            pool.shutdown(wait=True)
        with self.engine.begin() as conn:
            pages.writer.settle_positions(conn)
            conn.execute(
                update(IngestRunResource)
                .where(
                    IngestRunResource.run_id == run_id,
                    IngestRunResource.resource == resource.name,
                )
                .values(done=True)
            )

    def _pages(
        self, resource: Resource, start_page: int, mode: "PageMode"
    ) -> Iterator[tuple[int, PreparedPage | RawPage]]:
        """Pages from ``start_page`` on, in order, fetched and prepared (as ``mode`` says
        when each is asked for). The first page tells how many follow; those are fetched
        and prepared ahead while the caller writes: in worker processes when there are
        enough of them to repay starting the processes, else in threads. At most a few
        pages are in memory at once."""
        maker = PageMaker(self.settings)
        first = maker(resource.name, start_page, mode.raw, mode.base(start_page))
        yield start_page, first
        last_page = math.ceil(first.total / self.page_size)
        if not first.fetched or start_page >= last_page:
            log.info("%s: stopped after page %d of %d", resource.name, start_page, last_page)
            return
        pages = range(start_page + 1, last_page + 1)
        yield from self._pages_ahead(maker, resource, pages, mode)

    def _pages_ahead(
        self, maker: PageMaker, resource: Resource, page_numbers: range, mode: "PageMode"
    ) -> Iterator[tuple[int, PreparedPage | RawPage]]:
        """Pages fetched and prepared a few ahead of the caller: by worker processes (page
        ``n`` from worker ``n % workers``, one page more asked for than there are workers)
        when enough pages remain to repay starting them, else by two threads."""
        ask: Callable[[int], None]
        answer: Callable[[int], PreparedPage | RawPage]
        if self.workers and len(page_numbers) >= WORKER_PROCESSES_MIN_PAGES:
            workers = PageWorkers(self.workers, self.settings)

            def ask(page_no: int) -> None:
                task = (resource.name, page_no, mode.raw, mode.base(page_no))
                workers.ask(page_no % len(workers), *task)

            def answer(page_no: int) -> PreparedPage | RawPage:
                return workers.answer(page_no % len(workers))

            ahead, close = len(workers) + 1, workers.close
        else:
            pool = ThreadPoolExecutor(2, "fetch")
            futures: dict[int, Future] = {}

            def ask(page_no: int) -> None:
                task = (resource.name, page_no, mode.raw, mode.base(page_no))
                futures[page_no] = pool.submit(maker, *task)

            def answer(page_no: int) -> PreparedPage | RawPage:
                return futures.pop(page_no).result()

            ahead = 2

            def close() -> None:
                pool.shutdown(wait=True, cancel_futures=True)

        upcoming = iter(page_numbers)
        window: deque[int] = deque()

        def schedule() -> None:
            page_no = next(upcoming, None)
            if page_no is not None:
                ask(page_no)
                window.append(page_no)

        try:
            for _ in range(ahead):
                schedule()
            while window:
                page_no = window.popleft()
                page = answer(page_no)
                if not page.fetched:
                    log.info("%s: page %d was empty; stopping", resource.name, page_no)
                    return
                schedule()
                yield page_no, page
        finally:
            close()

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
            counts={r.resource: Counts.of(r) for r in rows},
        )


__all__ = ["Ingest", "IngestBusy", "IngestFailed", "RunNotResumable", "SourceError"]
