"""Database access: the SQLAlchemy engine and session for everything the service writes
and computes, and asyncpg pools for the hot reads (stored pages and records)."""

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated

import asyncpg
from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import Session

from pipeline_service.config import Settings

log = logging.getLogger(__name__)


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


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached or dropped the connection."""


class DatabaseBusy(Exception):
    """No pooled connection came free in time."""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Returns a read connection to its pool as it is.

    The reads set no session state, take no locks and listen to nothing, so asyncpg's
    default reset (RESET ALL, UNLISTEN, CLOSE, advisory unlock) would be a wasted round
    trip per request. asyncpg still rolls back a transaction left open.
    """


class ReadPools:
    """asyncpg connection pools for the read endpoints that serve stored pages and records.

    Those endpoints run on the event loop itself: no thread hand-off per request, and asyncpg
    keeps each statement prepared per connection. A pool belongs to the event loop that
    opened it, so there is one per loop: :meth:`open` and :meth:`close` bracket an app's
    lifespan in that loop (several test clients may each run one). Connections are opened on
    demand; one that PostgreSQL dropped (a restart) fails its statement once and is replaced.
    """

    def __init__(self, settings: Settings, max_size: int = 10, acquire_timeout: float = 10) -> None:
        url = make_url(settings.database_url).set(drivername="postgresql")
        self.dsn = url.render_as_string(hide_password=False)
        self.max_size = max_size
        self.acquire_timeout = acquire_timeout
        self._pools: dict[asyncio.AbstractEventLoop, asyncpg.Pool] = {}

    async def open(self) -> None:
        self._pools[asyncio.get_running_loop()] = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=self.max_size,
            timeout=5,
            server_settings={
                "timezone": "UTC",
                "application_name": "pipeline-service",
                # Plan each prepared statement once. Left to choose, PostgreSQL plans a page
                # query afresh on every call (its generic plan's estimate for a range of
                # positions looks worse than a custom plan's), which costs as much as
                # running it; the generic plans are the same index seeks.
                "plan_cache_mode": "force_generic_plan",
            },
            reset=_keep_session,
        )

    async def close(self) -> None:
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection in autocommit mode: each statement sees its own snapshot.

        Raises :class:`DatabaseUnavailable` or :class:`DatabaseBusy` instead of driver errors.
        """
        pool = self._pools[asyncio.get_running_loop()]
        try:
            async with pool.acquire(timeout=self.acquire_timeout) as conn:
                yield conn
        except TimeoutError as exc:  # before OSError, of which it is a subclass
            raise DatabaseBusy() from exc
        except (
            OSError,
            asyncpg.PostgresConnectionError,
            asyncpg.exceptions.OperatorInterventionError,
            asyncpg.InterfaceError,
        ) as exc:
            log.warning("database unavailable: %s", exc)
            raise DatabaseUnavailable(str(exc)) from exc
