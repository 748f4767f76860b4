"""Builds the FastAPI application; routes live in ``api/routes``."""

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pipeline_service.api.fast_reads import FastReads
from pipeline_service.api.routes import health, ingest, records, telemetry
from pipeline_service.config import Settings, get_settings
from pipeline_service.db import ReadPools, create_db_engine
from pipeline_service.errors import document_error_responses, install_error_handlers
from pipeline_service.ingest import start_worker_server
from pipeline_service.limits import RequestLimits

log = logging.getLogger(__name__)

API_PREFIX = "/api"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The pipeline API bound to ``settings`` (the environment's when not given)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.pipeline_api_key:
            log.warning("PIPELINE_API_KEY is not set: POST endpoints accept anyone")
        if settings.ingest_workers:
            threading.Thread(target=start_worker_server, name="worker-server", daemon=True).start()
        await app.state.reads.open()
        try:
            yield
        finally:
            await app.state.reads.close()
            app.state.engine.dispose()

    app = FastAPI(
        title="pipeline-service",
        summary="Paginated REST API -> PostgreSQL ingest, re-served with pagination",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = create_db_engine(settings)
    app.state.reads = ReadPools(settings)
    install_error_handlers(app)
    # The last added runs first: the request limits apply to the fast lane too.
    app.add_middleware(FastReads, reads=app.state.reads, prefix=API_PREFIX)
    app.add_middleware(RequestLimits)
    for module in (health, ingest, records, telemetry):
        # Each straight into the app: every level of included routers is matched again on
        # every request.
        app.include_router(module.router, prefix=API_PREFIX)
    document_error_responses(app)
    return app
