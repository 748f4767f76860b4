"""Database engine and the request-scoped session dependency."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from pipeline_service.config import Settings


def create_db_engine(settings: Settings, **overrides) -> Engine:
    """An engine whose connections speak UTC and notice a restarted server by themselves.

    No ping before each checkout (it costs a round trip per request): when PostgreSQL
    restarts, the first statement on a dead connection fails, SQLAlchemy then discards every
    pooled connection, and the next request connects afresh.
    """
    options = {
        "pool_pre_ping": False,
        "pool_recycle": 1800,
        "pool_size": 10,
        "max_overflow": 10,
        "pool_timeout": 10,
        "connect_args": {
            "connect_timeout": 5,
            "options": "-c timezone=UTC",
            "application_name": "pipeline-service",
        },
    } | overrides
    return create_engine(settings.database_url, **options)


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
