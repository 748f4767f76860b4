"""Triggering ingests and reading the run ledger."""

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from pipeline_service.api.deps import LimitParam, PageParam, SessionDep, require_api_key
from pipeline_service.errors import error_response
from pipeline_service.ingest import (
    Counts,
    Ingest,
    IngestBusy,
    IngestFailed,
    RunNotResumable,
)
from pipeline_service.models import IngestRun, IngestRunResource
from pipeline_service.resources import RESOURCES
from pipeline_service.schemas import ErrorBody
from pipeline_service.source import SourceError

router = APIRouter(prefix="/ingest", tags=["ingest"])

ResourceName = Literal[tuple(RESOURCES)]  # type: ignore[valid-type]


@router.post(
    "",
    dependencies=[Depends(require_api_key)],
    responses={
        401: {"model": ErrorBody},
        404: {"model": ErrorBody},
        409: {"model": ErrorBody, "description": "Another ingest is running"},
        502: {"model": ErrorBody, "description": "The source failed"},
        503: {"model": ErrorBody, "description": "The database is unavailable"},
    },
)
def ingest(
    request: Request,
    resource: Annotated[ResourceName | None, Query(description="Ingest only this resource")] = None,
    resume: Annotated[
        int | None,
        Query(
            ge=1, le=2**63 - 1, description="Resume this failed run from its last committed page"
        ),
    ] = None,
) -> JSONResponse:
    """Walk every page of the source and upsert it; answers with the run's counts."""
    if resume is not None and resource is not None:
        return error_response(400, "resume: a resumed run keeps its own resources; drop 'resource'")
    runner = Ingest(request.app.state.engine, request.app.state.settings)
    try:
        result = runner.run([resource] if resource else None, trigger="api", resume_run_id=resume)
    except IngestBusy as exc:
        return error_response(409, str(exc), running_run_id=exc.running_run_id)
    except RunNotResumable as exc:
        return error_response(404 if "does not exist" in str(exc) else 409, str(exc))
    except IngestFailed as exc:
        partial = runner.result(exc.run_id).as_dict() | {"status": "failed"}
        if isinstance(exc.cause, SourceError):
            return error_response(
                502,
                f"{exc.cause}; resume with POST /api/ingest?resume={exc.run_id}",
                source_url=exc.cause.url,
                **partial,
            )
        if isinstance(exc.cause, DBAPIError):
            raise exc.cause from None
        raise
    return JSONResponse(result.as_dict())


def run_summary(run: IngestRun, resources: list) -> dict:
    counts = {r.resource: Counts.of(r) for r in resources}
    return {
        "run_id": run.id,
        "trigger": run.trigger,
        "status": run.status,
        "started_at": run.started_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "error": run.error,
        "records_processed": sum(c.processed for c in counts.values()),
        "rejected": sum(c.rejected for c in counts.values()),
        "resources": {
            r.resource: asdict(counts[r.resource]) | {"next_page": r.next_page, "done": r.done}
            for r in resources
        },
    }


def _resources_of(session: SessionDep, run_ids: list[int]) -> dict[int, list]:
    rows = session.scalars(
        select(IngestRunResource)
        .where(IngestRunResource.run_id.in_(run_ids))
        .order_by(IngestRunResource.run_id, IngestRunResource.position)
    )
    grouped: dict[int, list] = {run_id: [] for run_id in run_ids}
    for row in rows:
        grouped[row.run_id].append(row)
    return grouped


@router.get("/runs")
def list_runs(session: SessionDep, page: PageParam = 1, limit: LimitParam = 10) -> dict:
    """Ingest runs, newest first."""
    total = session.execute(select(func.count()).select_from(IngestRun)).scalar_one()
    runs = session.scalars(
        select(IngestRun).order_by(IngestRun.id.desc()).offset((page - 1) * limit).limit(limit)
    ).all()
    resources = _resources_of(session, [r.id for r in runs])
    return {
        "data": [run_summary(r, resources[r.id]) for r in runs],
        "total": total,
        "page": page,
        "limit": limit,
    }


@router.get("/runs/{run_id}", responses={404: {"model": ErrorBody}})
def get_run(run_id: Annotated[int, Path(ge=1, le=2**63 - 1)], session: SessionDep) -> dict:
    run = session.get(IngestRun, run_id)
    if run is None:
        raise HTTPException(404, f"no ingest run {run_id}")
    return run_summary(run, _resources_of(session, [run_id])[run_id])
