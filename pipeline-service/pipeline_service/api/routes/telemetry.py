"""Machine analytics, status updates, pushed readings and the live stream (issue 5).

The SQL lives in :mod:`pipeline_service.telemetry`, the LISTEN side in
:mod:`pipeline_service.events`; this module speaks HTTP.
"""

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from pipeline_service import events, telemetry
from pipeline_service.api.deps import (
    DEFAULT_LIMIT,
    LimitParam,
    PageParam,
    SessionDep,
    require_api_key,
)
from pipeline_service.api.routes.records import FromParam, ToParam, require_machine, time_window
from pipeline_service.events import ListenerLost, MachineListener
from pipeline_service.limits import MAX_BODY_BYTES
from pipeline_service.schemas import ErrorBody, Page, ReadingRecord, Timestamp
from pipeline_service.telemetry import ALLOWED_STATUSES, MAX_PUSHED_READINGS, Metric, StatusChange

log = logging.getLogger(__name__)

router = APIRouter(tags=["machines"])

STATUS_BODY_BYTES = 64 * 1024
MISSING_STATUS = "Missing 'status' field in request data"
INVALID_STATUS = "Invalid status. Allowed statuses: " + ", ".join(ALLOWED_STATUSES)
STREAM_RETRY_MS = 3000
"""How long an EventSource client waits before reconnecting to a stream that ended."""

NOT_FOUND = {404: {"model": ErrorBody, "description": "No such machine"}}
BAD_REQUEST = {400: {"model": ErrorBody, "description": "A parameter or the body is invalid"}}
WRITE_ERRORS = {
    **BAD_REQUEST,
    401: {"model": ErrorBody, "description": "Missing or wrong API key"},
    **NOT_FOUND,
    413: {"model": ErrorBody, "description": "The body is too large"},
}


class Anomaly(BaseModel):
    timestamp: Timestamp
    value: float
    deviation: float
    """Distance from the average in the value's unit (never negative), 2 decimals."""
    deviation_pct: float | None
    """The same in percent of the average's magnitude; null when the average is 0."""


class MachineStats(BaseModel):
    machine_id: str
    metric: Metric
    count: int
    average: float | None
    max: float | None
    min: float | None
    anomaly_count: int
    """Every anomaly in the window; ``anomalies`` lists the first ``max_anomalies``."""
    anomalies: list[Anomaly]


class MovingAverage(BaseModel):
    machine_id: str
    window: int
    count: int
    """Readings averaged: ``window``, or fewer when the machine has fewer."""
    average_temperature: float | None
    average_speed: float | None
    status: str | None
    """Status of the newest reading."""
    as_of: Timestamp | None
    """Timestamp of the newest reading."""


class StatusUpdated(BaseModel):
    message: str
    machine_id: str
    status: str
    previous_status: str


class RejectedReading(BaseModel):
    index: int
    """Position in the submitted list (0 for a single reading)."""
    reason: str
    record: Any


class PushedReadings(BaseModel):
    accepted: int
    """Submitted readings that passed validation; accepted + len(rejected) = submitted."""
    inserted: int
    updated: int
    unchanged: int
    rejected: list[RejectedReading]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body parsed as JSON (whatever its declared content type); 413 beyond
    ``max_bytes``, 400 when it is not JSON. Never trusts Content-Length alone."""
    too_large = HTTPException(413, f"request body too large: at most {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    try:
        return json.loads(bytes(body), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        problem = "is empty" if not body.strip() else f"is not valid JSON ({exc})"
        raise HTTPException(400, f"request body {problem}") from None


async def status_body(request: Request) -> Any:
    return await read_json(request, STATUS_BODY_BYTES)


async def readings_body(request: Request) -> Any:
    return await read_json(request, MAX_BODY_BYTES)


MachineId = Annotated[str, Path(description="The machine's id")]


def _pushed_reading_schema() -> dict:
    schema = ReadingRecord.model_json_schema()
    schema["required"] = [f for f in schema["required"] if f != "machine_id"]
    schema["properties"]["machine_id"]["description"] = "Optional; must be the path's machine"
    return schema


STATUS_REQUEST = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string", "enum": list(ALLOWED_STATUSES)}},
                },
                "example": {"status": "STARTED"},
            }
        },
    }
}
READINGS_REQUEST = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _pushed_reading_schema(),
                        {
                            "type": "array",
                            "items": _pushed_reading_schema(),
                            "maxItems": MAX_PUSHED_READINGS,
                        },
                    ]
                },
                "example": {
                    "timestamp": "2024-06-01T08:30:00Z",
                    "temperature": 101.5,
                    "speed": 1210,
                    "status": "STARTED",
                },
            }
        },
    }
}


@router.get(
    "/machines/{machine_id}/stats",
    response_model=MachineStats,
    responses=NOT_FOUND | BAD_REQUEST,
    summary="Count, average, max, min and anomalies of one metric, computed in PostgreSQL",
)
def machine_stats(
    machine_id: MachineId,
    session: SessionDep,
    metric: Annotated[Metric, Query(description="Which measurement")],
    start: FromParam = None,
    end: ToParam = None,
    threshold: Annotated[
        float,
        Query(
            ge=0,
            allow_inf_nan=False,
            description="An anomaly lies farther from the average than this fraction of it",
        ),
    ] = 0.2,
    max_anomalies: Annotated[
        int, Query(ge=1, le=10_000, description="List at most this many anomalies (all counted)")
    ] = telemetry.DEFAULT_MAX_ANOMALIES,
) -> dict:
    window = time_window(start, end)
    require_machine(session, machine_id)
    return telemetry.machine_stats(
        session, machine_id, metric, threshold, window, max_anomalies=max_anomalies
    )


@router.get(
    "/machines/{machine_id}/moving-average",
    response_model=MovingAverage,
    responses=NOT_FOUND | BAD_REQUEST,
    summary="Averages over the newest readings, with the latest status",
)
def moving_average(
    machine_id: MachineId,
    session: SessionDep,
    window: Annotated[int, Query(ge=1, le=1000, description="How many newest readings")] = 5,
) -> dict:
    require_machine(session, machine_id)
    return telemetry.moving_average(session, machine_id, window)


@router.get(
    "/machines/{machine_id}/readings/latest",
    response_model=ReadingRecord,
    responses={404: {"model": ErrorBody, "description": "No such machine, or no readings"}},
    summary="The machine's newest reading",
)
def latest_reading(machine_id: MachineId, session: SessionDep) -> dict:
    require_machine(session, machine_id)
    reading = telemetry.latest_reading(session, machine_id)
    if reading is None:
        raise HTTPException(404, f"machine {machine_id!r} has no readings")
    return reading


@router.post(
    "/machines/{machine_id}/status",
    dependencies=[Depends(require_api_key)],
    response_model=StatusUpdated,
    responses=WRITE_ERRORS,
    openapi_extra=STATUS_REQUEST,
    summary='Set the machine\'s status: {"status": "STARTED"}',
)
def update_status(
    machine_id: MachineId, body: Annotated[Any, Depends(status_body)], session: SessionDep
) -> dict:
    if not isinstance(body, dict):
        raise HTTPException(400, 'request body must be a JSON object like {"status": "STARTED"}')
    if "status" not in body:
        raise HTTPException(400, MISSING_STATUS)
    status = body["status"]
    if not isinstance(status, str) or status not in ALLOWED_STATUSES:
        raise HTTPException(400, INVALID_STATUS)
    previous = telemetry.set_status(session, machine_id, status)
    if previous is None:
        raise HTTPException(404, f"no machine with id {machine_id!r}")
    session.commit()
    return {
        "message": "Status updated",
        "machine_id": machine_id,
        "status": status,
        "previous_status": previous,
    }


@router.get(
    "/machines/{machine_id}/status-history",
    response_model=Page[StatusChange],
    responses=NOT_FOUND | BAD_REQUEST,
    summary="The machine's status changes, newest first",
)
def status_history(
    machine_id: MachineId,
    request: Request,
    session: SessionDep,
    page: PageParam = 1,
    limit: LimitParam = DEFAULT_LIMIT,
) -> dict:
    require_machine(session, machine_id)
    answer = telemetry.status_history(session, machine_id, page, limit)
    more = page * limit < answer["total"]
    query = urlencode({"page": page + 1, "limit": limit})
    return answer | {"next": f"{request.url.path}?{query}" if more else None}


@router.post(
    "/machines/{machine_id}/readings",
    dependencies=[Depends(require_api_key)],
    status_code=201,
    response_model=PushedReadings,
    responses=WRITE_ERRORS,
    openapi_extra=READINGS_REQUEST,
    summary=f"Store one reading or a list of up to {MAX_PUSHED_READINGS}",
)
def push_readings(
    machine_id: MachineId, body: Annotated[Any, Depends(readings_body)], session: SessionDep
) -> dict:
    if isinstance(body, dict):
        submitted = [body]
    elif isinstance(body, list):
        submitted = body
    else:
        raise HTTPException(400, "request body must be a reading object or a list of them")
    if len(submitted) > MAX_PUSHED_READINGS:
        raise HTTPException(
            413,
            f"too many readings: at most {MAX_PUSHED_READINGS} per request, got {len(submitted)}",
        )
    result = telemetry.push_readings(session, machine_id, submitted)
    if result is None:
        raise HTTPException(404, f"no machine with id {machine_id!r}")
    session.commit()
    return {
        "accepted": result.accepted,
        "inserted": result.inserted,
        "updated": result.updated,
        "unchanged": result.unchanged,
        "rejected": [vars(r) for r in result.rejected],
    }


async def machine_listener(
    machine_id: MachineId, request: Request
) -> AsyncIterator[MachineListener]:
    """A listener for the stream's whole life: opened (and the machine checked) before the
    response starts, closed after it ends however it ends, client gone included."""
    try:
        listener = await MachineListener.open(request.app.state.engine, machine_id)
    except ListenerLost as exc:
        log.warning("cannot listen for machine events: %s", exc)
        raise HTTPException(
            503, "database unavailable; check that PostgreSQL is running and DATABASE_URL"
        ) from None
    if listener is None:
        raise HTTPException(404, f"no machine with id {machine_id!r}")
    try:
        yield listener
    finally:
        listener.close()


async def _server_sent_events(listener: MachineListener, heartbeat: float) -> AsyncIterator[bytes]:
    yield format_sse_event(
        comment=f"events of machine {listener.machine_id}", retry=STREAM_RETRY_MS
    )
    sent = 0
    while not listener.stopping:
        try:
            batch = await listener.next_events(heartbeat)
        except ListenerLost as exc:
            log.warning("machine event stream ended: %s", exc)
            return
        if not batch:
            if not listener.stopping:
                yield b": keep-alive\n\n"
            continue
        for event in batch:
            sent += 1
            yield format_sse_event(
                event=event.kind, data_str=event.data.model_dump_json(by_alias=True), id=str(sent)
            )


@router.get(
    "/machines/{machine_id}/stream",
    # Not response_class=EventSourceResponse: FastAPI would then expect a generator
    # endpoint and add its own fixed 15 s ': ping' comments.
    responses={
        200: {
            "description": "Server-Sent Events: reading, status, bulk-readings",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **NOT_FOUND,
    },
    summary="Live readings and status changes of one machine (Server-Sent Events)",
)
async def stream_machine_events(
    listener: Annotated[MachineListener, Depends(machine_listener)],
    heartbeat: Annotated[
        float,
        Query(ge=1, le=60, description="Seconds between keep-alive comments while idle"),
    ] = events.DEFAULT_HEARTBEAT_SECONDS,
) -> EventSourceResponse:
    """Each committed new (or corrected) reading and status change of the machine, from
    any process, as it commits. Event ids count up from 1 per connection."""
    return EventSourceResponse(
        _server_sent_events(listener, heartbeat),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
