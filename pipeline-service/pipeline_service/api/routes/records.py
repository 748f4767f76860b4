"""Re-serving stored records: one pair of routes per top-level resource, plus readings.

PostgreSQL renders the JSON of each answer, and each answer is one statement (its total
and its records see one snapshot) run on the event loop through asyncpg. Page P of a
top-level collection is a range seek on ``position`` and its total a one-row read (both
kept exact by the ingest), so the last page costs what the first does. Clients that walk
everything can follow ``next``, an opaque ``after`` cursor that stays correct while records
are being added. The plainest of these reads are answered by ``api/fast_reads.py`` with the
same functions, before FastAPI's routing; these routes define them and answer the rest.
"""

import base64
import binascii
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import asyncpg
import orjson
from fastapi import APIRouter, HTTPException, Query, Request, Response
from sqlalchemy import Connection, DateTime, select
from sqlalchemy.orm import Session

from pipeline_service.api.deps import DEFAULT_LIMIT, LimitParam, PageParam
from pipeline_service.resources import MACHINES, READINGS, RESOURCES, Resource
from pipeline_service.schemas import ErrorBody, Page

router = APIRouter()

NOT_FOUND = {404: {"model": ErrorBody, "description": "No such record"}}
BAD_REQUEST = {400: {"model": ErrorBody, "description": "A parameter is invalid"}}
AfterParam = Annotated[
    str | None,
    Query(max_length=2048, description="Cursor from a previous answer's 'next' (replaces page)"),
]


class ServingQueries:
    """The SQL that renders one resource's stored rows as JSON, built once per resource.

    Identifiers come from the resource definition only; every value is a numbered
    parameter ($1, $2, ...).
    """

    def __init__(self, resource: Resource) -> None:
        self.table = resource.table.name
        self.columns = ", ".join(f'"{name}"' for name in resource.fields)
        rendered = []
        for name in resource.fields:
            column = f'"{name}"'
            if isinstance(resource.table.c[name].type, DateTime):
                # ISO-8601 in UTC written with 'Z', as the source writes it (sessions are UTC).
                rendered.append(
                    f"replace(to_json(t.{column}) #>> '{{}}', '+00:00', 'Z') AS {column}"
                )
            else:
                rendered.append(f"t.{column}")
        # The JSON of row t. Sorting happens on t's own columns: a rendered timestamp is
        # text, whose order is not time order ('00:00:00.5Z' sorts before '00:00:00Z').
        self.render = f"CROSS JOIN LATERAL (SELECT {', '.join(rendered)}) r"
        self.one = (
            f'SELECT row_to_json(r)::text FROM (SELECT {self.columns} FROM "{self.table}" '
            f'WHERE "{resource.key[-1]}" = $1) t {self.render}'
        )
        if resource.positioned:
            # $1 resource, $2 < position <= $3. No rows unless positions are exact.
            (key,) = resource.key
            rows = self.rows(["s.positions_exact", "position > $2", "position <= $3"], key, "")
            self.by_position = (
                f"SELECT s.total, p.data, p.n, p.last, s.positions_exact FROM collection_stats s "
                f"CROSS JOIN LATERAL ({rows}) p WHERE s.resource = $1"
            )

    def rows(self, conditions: list[str], order: str, tail: str) -> str:
        """The JSON array of the rows matching ``conditions``, by column ``order`` (unique
        among them), then ``tail`` (LIMIT/OFFSET), as column ``data``; their count as
        ``n``; and the last row's ``order`` value in a JSON array, ``last``."""
        return (
            f"SELECT coalesce(json_agg(r ORDER BY t.\"{order}\"), '[]')::text AS data, "
            f'count(*) AS n, json_build_array(max(t."{order}"))::text AS last '
            f'FROM (SELECT {self.columns} FROM "{self.table}" '
            f'WHERE {" AND ".join(conditions) or "true"} ORDER BY "{order}" {tail}) t '
            f"{self.render}"
        )

    def page(self, total: str, conditions: list[str], order: str, tail: str) -> str:
        """:meth:`rows` with the total the query ``total`` gives, in one statement."""
        return (
            f"SELECT ({total}), p.data, p.n, p.last, true "
            f"FROM ({self.rows(conditions, order, tail)}) p"
        )

    def count(self, conditions: list[str]) -> str:
        return f'SELECT count(*) FROM "{self.table}" WHERE {" AND ".join(conditions) or "true"}'


QUERIES = {name: ServingQueries(resource) for name, resource in RESOURCES.items()}
MACHINE_EXISTS = f'SELECT true FROM "{MACHINES.table.name}" WHERE machine_id = $1'


def _encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    """The last value of the order column that the page before ``cursor`` held."""
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        values = None
    if not isinstance(values, list) or len(values) != 1 or not isinstance(values[0], str):
        raise HTTPException(400, "after: not a cursor this API gave out")
    return values[0]


async def json_page(
    conn: asyncpg.Connection,
    request: Request,
    resource: Resource,
    page: int,
    limit: int,
    after: str | None,
    where: dict[str, Any],
    order: str,
) -> Response:
    """One page as a JSON answer: records matching ``where`` (column = value, plus the
    'from'/'to' bounds of a time window) by column ``order`` (page ``page``, or the
    records after the cursor ``after``), their exact total, and a ``next`` link."""
    queries = QUERIES[resource.name]
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    conditions = []
    for column, value in where.items():
        if column == "from":
            conditions.append(f'"timestamp" >= {arg(value)}')
        elif column == "to":
            conditions.append(f'"timestamp" <= {arg(value)}')
        else:
            conditions.append(f'"{column}" = {arg(value)}')
    unfiltered = resource.positioned and not conditions
    if unfiltered:
        total = f"SELECT total FROM collection_stats WHERE resource = {arg(resource.name)}"
    else:
        total = queries.count(conditions)

    row = None
    if after is not None:
        value: Any = _decode_cursor(after)
        if order == "timestamp":
            value = _parse_cursor_time(value)
        seek = f'"{order}" > {arg(value)}'
        query = queries.page(total, [*conditions, seek], order, f"LIMIT {arg(limit)}")
        row = await conn.fetchrow(query, *args)
    else:
        if unfiltered:
            first, last = (page - 1) * limit, page * limit
            row = await conn.fetchrow(queries.by_position, resource.name, first, last)
        if row is None or not row[4]:  # positions not exact (an ingest is settling them)
            tail = f"LIMIT {arg(limit)} OFFSET {arg((page - 1) * limit)}"
            row = await conn.fetchrow(queries.page(total, conditions, order, tail), *args)
    total_count, data, count, last, _ = row

    next_link = None
    if count == limit:
        cursor = _encode_cursor(orjson.loads(last))
        query_params = dict(request.query_params) | {"limit": limit, "after": cursor}
        query_params.pop("page", None)
        next_link = f"{request.url.path}?{urlencode(query_params)}"
    body = b'{"data":%s,"total":%d,"page":%s,"limit":%d,"next":%s}' % (
        data.encode(),
        total_count,
        b"null" if after else str(page).encode(),
        limit,
        orjson.dumps(next_link),
    )
    return Response(body, media_type="application/json")


def _parse_cursor_time(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except (ValueError, OverflowError):
        raise HTTPException(400, "after: not a cursor this API gave out") from None


async def json_record(conn: asyncpg.Connection, resource: Resource, record_id: str) -> Response:
    """The stored record with key ``record_id`` as a JSON answer; 404 when there is none."""
    found = await conn.fetchval(QUERIES[resource.name].one, record_id)
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
    async def list_records(
        request: Request,
        page: PageParam = 1,
        limit: LimitParam = DEFAULT_LIMIT,
        after: AfterParam = None,
    ) -> Response:
        async with request.app.state.reads.connection() as conn:
            (order,) = resource.key
            return await json_page(conn, request, resource, page, limit, after, {}, order)

    @router.get(
        f"/{resource.name}/{{record_id}}",
        response_model=resource.record,
        responses=NOT_FOUND,
        name=f"get_{noun}",
        summary=f"One stored {noun} by its id",
        tags=[resource.name],
    )
    async def get_record(record_id: str, request: Request) -> Response:
        async with request.app.state.reads.connection() as conn:
            return await json_record(conn, resource, record_id)


for _resource in RESOURCES.values():
    if _resource.positioned:
        add_collection_routes(_resource)


def as_utc(value: datetime | None, name: str = "from") -> datetime | None:
    """A query timestamp in UTC; one without an offset is taken as UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise HTTPException(400, f"{name}: out of the range of timestamps") from None


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
    start, end = as_utc(start, "from"), as_utc(end, "to")
    if start is not None and end is not None and start > end:
        raise HTTPException(400, "from: must not be later than 'to'")
    column = READINGS.table.c.timestamp
    clauses = []
    if start is not None:
        clauses.append(column >= start)
    if end is not None:
        clauses.append(column <= end)
    return clauses


def require_machine(session: Session | Connection, machine_id: str) -> None:
    """Raises a 404 answer unless machine ``machine_id`` is stored."""
    table = MACHINES.table
    if (
        session.execute(select(table.c.machine_id).where(table.c.machine_id == machine_id)).first()
        is None
    ):
        raise _no_machine(machine_id)


def _no_machine(machine_id: str) -> HTTPException:
    return HTTPException(404, f"no machine with id {machine_id!r}")


@router.get(
    "/machines/{machine_id}/readings",
    response_model=Page[READINGS.record],
    responses=NOT_FOUND | BAD_REQUEST,
    summary="One machine's stored readings, oldest first",
    tags=["machines"],
)
async def list_machine_readings(
    machine_id: str,
    request: Request,
    page: PageParam = 1,
    limit: LimitParam = DEFAULT_LIMIT,
    start: FromParam = None,
    end: ToParam = None,
    after: AfterParam = None,
) -> Response:
    time_window(start, end)  # validates the window
    where: dict[str, Any] = {"machine_id": machine_id}
    if start is not None:
        where["from"] = as_utc(start, "from")
    if end is not None:
        where["to"] = as_utc(end, "to")
    async with request.app.state.reads.connection() as conn:
        if await conn.fetchval(MACHINE_EXISTS, machine_id) is None:
            raise _no_machine(machine_id)
        return await json_page(conn, request, READINGS, page, limit, after, where, "timestamp")
