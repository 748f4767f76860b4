"""Re-serving stored records: one pair of routes per top-level resource, plus readings.

PostgreSQL renders the JSON of each answer. Page P of a top-level collection is a range
seek on ``position`` and its total a one-row read (both kept exact by the ingest), so the
last page costs what the first does. Clients that walk everything can follow ``next``, an
opaque ``after`` cursor that stays correct while records are being added.
"""

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response
from sqlalchemy import ColumnElement, DateTime, Text, func, select, text, tuple_
from sqlalchemy.orm import Session

from pipeline_service.api.deps import LimitParam, PageParam, SessionDep
from pipeline_service.resources import MACHINES, READINGS, RESOURCES, Resource
from pipeline_service.schemas import ErrorBody, Page

router = APIRouter()

NOT_FOUND = {404: {"model": ErrorBody, "description": "No such record"}}
BAD_REQUEST = {400: {"model": ErrorBody, "description": "A parameter is invalid"}}
AfterParam = Annotated[
    str | None,
    Query(max_length=2048, description="Cursor from a previous answer's 'next' (replaces page)"),
]


def json_object(resource: Resource, table=None) -> ColumnElement:
    """The SQL expression rendering one stored row as its record's JSON object."""
    columns = (table if table is not None else resource.table).c
    pairs = []
    for name in resource.fields:
        value = columns[name]
        if isinstance(resource.table.c[name].type, DateTime):
            # ISO-8601 in UTC written with 'Z', as the source writes it (sessions are UTC).
            value = func.replace(func.to_json(value).op("#>>")(text("'{}'")), "+00:00", "Z")
        pairs += [text(f"'{name}'"), value]
    return func.json_build_object(*pairs)


def _encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def _decode_cursor(cursor: str, size: int) -> list[Any]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        values = None
    if not isinstance(values, list) or len(values) != size:
        raise HTTPException(400, "after: not a cursor this API gave out")
    return values


def json_page(
    session: Session,
    request: Request,
    resource: Resource,
    page: int,
    limit: int,
    after: str | None,
    where: list,
    order: list,
) -> Response:
    """One page as a JSON answer: records matching ``where`` in ``order`` (page ``page``, or
    those after the cursor ``after``), their total, and a ``next`` link."""
    table = resource.table
    stats = None
    if resource.positioned and not where:
        stats = session.execute(
            text("SELECT total, positions_exact FROM collection_stats WHERE resource = :r"),
            {"r": resource.name},
        ).one_or_none()
    if stats is not None:
        total = stats.total
    else:
        total = session.execute(select(func.count()).select_from(table).where(*where)).scalar_one()

    query = select(*(table.c[name] for name in resource.fields)).where(*where)
    if after is not None:
        values = _decode_cursor(after, len(order))
        if order[-1].key == "timestamp":
            values[-1] = _parse_cursor_time(values[-1])
        query = query.where(tuple_(*order) > tuple_(*values)).order_by(*order).limit(limit)
    elif stats is not None and stats.positions_exact:
        first = (page - 1) * limit
        query = query.where(table.c.position > first, table.c.position <= first + limit).order_by(
            table.c.position
        )
    else:
        query = query.order_by(*order).offset((page - 1) * limit).limit(limit)
    rows = query.subquery()
    data, count, last = session.execute(
        select(
            func.coalesce(func.json_agg(json_object(resource, rows)), text("'[]'::json")).cast(
                Text
            ),
            func.count(),
            func.json_agg(func.json_build_array(*(rows.c[o.key] for o in order))).cast(Text),
        ).select_from(rows)
    ).one()
    next_link = None
    if count == limit:
        last_key = orjson.loads(last)[-1]
        params = dict(request.query_params) | {"limit": limit, "after": _encode_cursor(last_key)}
        params.pop("page", None)
        next_link = f"{request.url.path}?{urlencode(params)}"
    body = (
        b'{"data":'
        + data.encode()
        + b',"total":%d,"page":%s,"limit":%d,"next":%s}'
        % (total, b"null" if after else str(page).encode(), limit, orjson.dumps(next_link))
    )
    return Response(body, media_type="application/json")


def _parse_cursor_time(value: Any) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise HTTPException(400, "after: not a cursor this API gave out") from None


def json_record(session: Session, resource: Resource, record_id: str) -> Response:
    """The stored record with key ``record_id`` as a JSON answer; 404 when there is none."""
    found = session.execute(
        select(json_object(resource).cast(Text)).where(resource.key_columns[0] == record_id)
    ).scalar()
    if found is None:
        raise HTTPException(404, f"no {resource.name[:-1]} with id {record_id!r}")
    return Response(found.encode(), media_type="application/json")


def add_collection_routes(resource: Resource) -> None:
    noun = resource.name[:-1]

    @router.get(
        f"/{resource.name}",
        response_model=Page[resource.record],
        responses=BAD_REQUEST,
        name=f"list_{resource.name}",
        summary=f"List stored {resource.name} in key order",
        tags=[resource.name],
    )
    def list_records(
        request: Request,
        session: SessionDep,
        page: PageParam = 1,
        limit: LimitParam = 10,
        after: AfterParam = None,
    ) -> Response:
        return json_page(session, request, resource, page, limit, after, [], resource.key_columns)

    @router.get(
        f"/{resource.name}/{{record_id}}",
        response_model=resource.record,
        responses=NOT_FOUND,
        name=f"get_{noun}",
        summary=f"One stored {noun} by its id",
        tags=[resource.name],
    )
    def get_record(record_id: str, session: SessionDep) -> Response:
        return json_record(session, resource, record_id)


for _resource in RESOURCES.values():
    if _resource.positioned:
        add_collection_routes(_resource)


def as_utc(value: datetime | None) -> datetime | None:
    """Query timestamps without an offset are taken as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


FromParam = Annotated[
    datetime | None,
    Query(alias="from", description="Earliest timestamp, inclusive (ISO-8601; UTC if no offset)"),
]
ToParam = Annotated[
    datetime | None,
    Query(alias="to", description="Latest timestamp, inclusive (ISO-8601; UTC if no offset)"),
]


def time_window(start: datetime | None, end: datetime | None) -> list:
    """WHERE clauses for an inclusive [from, to] window on reading timestamps."""
    start, end = as_utc(start), as_utc(end)
    if start is not None and end is not None and start > end:
        raise HTTPException(400, "from: must not be later than 'to'")
    column = READINGS.table.c.timestamp
    clauses = []
    if start is not None:
        clauses.append(column >= start)
    if end is not None:
        clauses.append(column <= end)
    return clauses


def require_machine(session: Session, machine_id: str) -> None:
    """Raises a 404 answer unless machine ``machine_id`` is stored."""
    table = MACHINES.table
    if (
        session.execute(select(table.c.machine_id).where(table.c.machine_id == machine_id)).first()
        is None
    ):
        raise HTTPException(404, f"no machine with id {machine_id!r}")


@router.get(
    "/machines/{machine_id}/readings",
    response_model=Page[READINGS.record],
    responses=NOT_FOUND | BAD_REQUEST,
    summary="One machine's stored readings, oldest first",
    tags=["machines"],
)
def list_machine_readings(
    machine_id: str,
    request: Request,
    session: SessionDep,
    page: PageParam = 1,
    limit: LimitParam = 10,
    start: FromParam = None,
    end: ToParam = None,
    after: AfterParam = None,
) -> Response:
    require_machine(session, machine_id)
    table = READINGS.table
    where = [table.c.machine_id == machine_id, *time_window(start, end)]
    return json_page(session, request, READINGS, page, limit, after, where, [table.c.timestamp])
