"""Re-serving stored records: one pair of routes per top-level resource, plus readings."""

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline_service.api.deps import LimitParam, PageParam, SessionDep
from pipeline_service.resources import MACHINES, READINGS, RESOURCES, Resource
from pipeline_service.schemas import ErrorBody, Page

router = APIRouter()

NOT_FOUND = {404: {"model": ErrorBody, "description": "No such record"}}
BAD_REQUEST = {400: {"model": ErrorBody, "description": "A parameter is invalid"}}


def fetch_page(session: Session, resource: Resource, page: int, limit: int, *where) -> dict:
    """Page ``page`` of the records matching ``where``, in key order, with their total."""
    total = session.execute(
        select(func.count()).select_from(resource.table).where(*where)
    ).scalar_one()
    rows = session.execute(
        select(*resource.columns)
        .where(*where)
        .order_by(*resource.key_columns)
        .offset((page - 1) * limit)
        .limit(limit)
    ).mappings()
    return {"data": [dict(r) for r in rows], "total": total, "page": page, "limit": limit}


def fetch_one(session: Session, resource: Resource, record_id: str) -> dict[str, Any]:
    row = (
        session.execute(select(*resource.columns).where(resource.key_columns[0] == record_id))
        .mappings()
        .first()
    )
    if row is None:
        raise HTTPException(404, f"no {resource.name[:-1]} with id {record_id!r}")
    return dict(row)


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
    def list_records(session: SessionDep, page: PageParam = 1, limit: LimitParam = 10) -> dict:
        return fetch_page(session, resource, page, limit)

    @router.get(
        f"/{resource.name}/{{record_id}}",
        response_model=resource.record,
        responses=NOT_FOUND,
        name=f"get_{noun}",
        summary=f"One stored {noun} by its id",
        tags=[resource.name],
    )
    def get_record(record_id: str, session: SessionDep) -> dict:
        return fetch_one(session, resource, record_id)


for _resource in RESOURCES.values():
    if _resource.parent is None:
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
    fetch_one(session, MACHINES, machine_id)


@router.get(
    "/machines/{machine_id}/readings",
    response_model=Page[READINGS.record],
    responses=NOT_FOUND | BAD_REQUEST,
    summary="One machine's stored readings, oldest first",
    tags=["machines"],
)
def list_machine_readings(
    machine_id: str,
    session: SessionDep,
    page: PageParam = 1,
    limit: LimitParam = 10,
    start: FromParam = None,
    end: ToParam = None,
) -> dict:
    require_machine(session, machine_id)
    where = [READINGS.table.c.machine_id == machine_id, *time_window(start, end)]
    return fetch_page(session, READINGS, page, limit, *where)
