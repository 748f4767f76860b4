from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from pipeline_service.api.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health(session: SessionDep) -> JSONResponse:
    """200 when PostgreSQL answers, 503 when it does not."""
    try:
        try:
            session.execute(text("SELECT 1"))
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            session.rollback()  # a connection from before a restart: try a fresh one
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return JSONResponse(
            {"status": "unavailable", "database": "unreachable", "error": reason}, 503
        )
    return JSONResponse({"status": "ok", "database": "ok"})
