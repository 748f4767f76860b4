"""Machine events over PostgreSQL LISTEN/NOTIFY: new readings and status changes, heard
from every process that writes to the database.

Publishing is done by the database itself (triggers of migration 0002), so a change is
announced exactly when it commits, whoever commits it: an ingest, a pushed reading, a
status update, or psql. Every notification goes to the one channel ``machine_events``
with the machine in its payload:

- ``{"kind": "readings", "machine_id", "count", "from", "to", "changed_at", "readings"}``:
  one per machine per statement; ``readings`` holds the readings when a few fit the
  8000-byte NOTIFY limit, otherwise it is missing and the listener reads those rows back
  (they are the machine's rows in [from, to] whose ``updated_at`` is ``changed_at``).
- ``{"kind": "status", "id", "machine_id", "old_status", "new_status", "source",
  "changed_at"}``: one per status change, the row written to machine_status_history.

Listening: each stream client gets a :class:`MachineListener`, one dedicated psycopg2
connection (outside the pool, in asynchronous mode, so waiting for a notification holds
no thread) that is closed when the client goes away.
"""

import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Self

import anyio
import psycopg2
import psycopg2.extensions
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Engine

from pipeline_service.schemas import ReadingRecord, Timestamp
from pipeline_service.telemetry import StatusChange

log = logging.getLogger(__name__)

CHANNEL = "machine_events"
LISTENER_APPLICATION_NAME = "pipeline-service-stream"
"""How a listener's connection shows up in pg_stat_activity."""
DEFAULT_HEARTBEAT_SECONDS = 15.0
READBACK_LIMIT = 1000
"""A statement that wrote more readings of one machine than this (a bulk load, not an
ingest page or a pushed batch) is announced as one ``bulk-readings`` event."""
CONNECT_TIMEOUT_SECONDS = 5.0
_STOP_CHECK_SECONDS = 1.0

_READBACK_SQL = """
    SELECT machine_id, "timestamp", temperature, speed, status
    FROM machine_readings
    WHERE machine_id = %s AND "timestamp" BETWEEN %s AND %s AND updated_at = %s
    ORDER BY "timestamp"
"""


class ListenerLost(Exception):
    """The listener's database connection failed; the stream cannot go on."""


class BulkReadings(BaseModel):
    """Many readings of one machine written by one statement: fetch them with
    GET /api/machines/{machine_id}/readings?from=...&to=... (serialize by alias)."""

    model_config = ConfigDict(populate_by_name=True)

    machine_id: str
    count: int
    from_: Timestamp = Field(alias="from")
    to: Timestamp


@dataclass(frozen=True)
class MachineEvent:
    kind: Literal["reading", "status", "bulk-readings"]
    data: BaseModel


async def _settle(conn: Any) -> None:
    """Drive an asynchronous psycopg2 operation to completion without blocking the loop."""
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        if state == psycopg2.extensions.POLL_READ:
            await anyio.wait_readable(conn.fileno())
        elif state == psycopg2.extensions.POLL_WRITE:
            await anyio.wait_writable(conn.fileno())
        else:  # pragma: no cover - psycopg2 documents no other state
            raise psycopg2.OperationalError(f"unexpected poll state {state}")


_open_listeners: "weakref.WeakSet[MachineListener]" = weakref.WeakSet()


def stop_all_listeners() -> None:
    """Ask every open listener to end its stream within about a second (server shutdown:
    uvicorn waits for open responses, and a stream would otherwise never end)."""
    for listener in list(_open_listeners):
        listener.stopping = True


class MachineListener:
    """A LISTEN connection that yields the events of one machine, in commit order."""

    def __init__(self, conn: Any, machine_id: str) -> None:
        self.conn = conn
        self.machine_id = machine_id
        self.stopping = False
        _open_listeners.add(self)

    @classmethod
    async def open(cls, engine: Engine, machine_id: str) -> Self | None:
        """Connect, LISTEN, and check that the machine exists; None (and nothing left
        open) when it does not. Raises :class:`ListenerLost` when the database fails."""
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        cparams = cparams | {
            "application_name": LISTENER_APPLICATION_NAME,
            "options": "-c timezone=UTC",
            "async_": True,
        }
        conn = None
        try:
            conn = psycopg2.connect(*cargs, **cparams)
            with anyio.fail_after(CONNECT_TIMEOUT_SECONDS):
                await _settle(conn)
                cursor = conn.cursor()
                cursor.execute(f"LISTEN {CHANNEL}")
                await _settle(conn)
                # After LISTEN, so nothing committed between the check and it is missed.
                cursor.execute("SELECT 1 FROM machines WHERE machine_id = %s", (machine_id,))
                await _settle(conn)
                found = cursor.fetchone() is not None
        except (psycopg2.Error, TimeoutError) as exc:
            if conn is not None:
                conn.close()
            raise ListenerLost(str(exc).strip() or "timed out connecting") from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if not found:
            conn.close()
            return None
        return cls(conn, machine_id)

    def close(self) -> None:
        """Close the connection (ending its LISTEN); safe to call twice."""
        _open_listeners.discard(self)
        self.conn.close()

    async def next_events(self, timeout: float) -> list[MachineEvent]:
        """This machine's events, waiting up to ``timeout`` seconds for the first; an empty
        list when none came (or the listener is stopping). Raises :class:`ListenerLost`."""
        deadline = anyio.current_time() + timeout
        try:
            while not self.stopping:
                events = []
                for payload in self._drain():
                    events.extend(await self._events_of(payload))
                if events:
                    return events
                remaining = deadline - anyio.current_time()
                if remaining <= 0:
                    return []
                with anyio.move_on_after(min(remaining, _STOP_CHECK_SECONDS)):
                    await anyio.wait_readable(self.conn.fileno())
                    self.conn.poll()
        except psycopg2.Error as exc:
            raise ListenerLost(str(exc).strip()) from exc
        return []

    def _drain(self) -> list[dict]:
        """Pending notifications about this machine, oldest first."""
        self.conn.poll()
        payloads = []
        while self.conn.notifies:
            notify = self.conn.notifies.pop(0)
            try:
                payload = json.loads(notify.payload)
            except ValueError:
                log.warning("ignoring a malformed notification on %s", CHANNEL)
                continue
            if isinstance(payload, dict) and payload.get("machine_id") == self.machine_id:
                payloads.append(payload)
        return payloads

    async def _events_of(self, payload: dict) -> list[MachineEvent]:
        try:
            if payload.get("kind") == "status":
                return [MachineEvent("status", StatusChange.model_validate(payload))]
            if payload.get("kind") != "readings":
                return []
            readings = payload.get("readings")
            if readings is None:
                if payload["count"] > READBACK_LIMIT:
                    bulk = BulkReadings(
                        machine_id=self.machine_id,
                        count=payload["count"],
                        from_=payload["from"],
                        to=payload["to"],
                    )
                    return [MachineEvent("bulk-readings", bulk)]
                readings = await self._read_back(payload)
            own = {"machine_id": self.machine_id}
            return [
                MachineEvent("reading", ReadingRecord.model_validate(r | own)) for r in readings
            ]
        except (KeyError, TypeError, ValidationError) as exc:
            log.warning("ignoring an unexpected notification on %s: %s", CHANNEL, exc)
            return []

    async def _read_back(self, payload: dict) -> list[dict]:
        cursor = self.conn.cursor()
        cursor.execute(
            _READBACK_SQL,
            (self.machine_id, payload["from"], payload["to"], payload["changed_at"]),
        )
        await _settle(self.conn)
        names = [d.name for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
