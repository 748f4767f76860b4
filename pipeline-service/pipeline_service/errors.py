"""Every failure becomes a JSON answer ``{"error": ...}``: never HTML, never a traceback."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException

from pipeline_service.db import DatabaseBusy, DatabaseUnavailable

log = logging.getLogger(__name__)


def error_response(status_code: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status_code)


def describe_request_errors(exc: RequestValidationError) -> str:
    """'limit: Input should be less than or equal to 1000; ...', naming each parameter."""
    parts = []
    for item in exc.errors():
        location = [str(p) for p in item.get("loc", ())]
        if location and location[0] in ("query", "path", "header", "body"):
            location = location[1:]
        name = ".".join(location) or "request body"
        message = item.get("msg", "is invalid").removeprefix("Value error, ")
        if item.get("type") == "missing":
            message = "is required"
        elif item.get("type") == "json_invalid":
            name, message = "request body", "is not valid JSON"
        parts.append(f"{name}: {message}")
    return "; ".join(parts) or "invalid request"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    in_body = any(item.get("loc", ("",))[0] == "body" for item in exc.errors())
    return error_response(422 if in_body else 400, describe_request_errors(exc))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    response = error_response(exc.status_code, message)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


UNAVAILABLE = "database unavailable; check that PostgreSQL is running and DATABASE_URL"


async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        log.warning("database unavailable: %s", exc.orig)
        return error_response(503, UNAVAILABLE)
    log.exception("database error")
    return error_response(500, "internal database error; see the pipeline log")


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, UNAVAILABLE)


BUSY = "database busy: no connection free; try again shortly"


async def _pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, BUSY)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; see the pipeline log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _pool_timeout)
    app.add_exception_handler(DatabaseUnavailable, _database_unavailable)
    app.add_exception_handler(DatabaseBusy, _pool_timeout)
    app.add_exception_handler(Exception, _unexpected)


_GENERIC_ERRORS = {
    "400": "A query or path parameter is invalid",
    "413": "The request body is too large",
    "414": "The URL is too long",
    "503": "The database is unavailable",
}


def document_error_responses(app: FastAPI) -> None:
    """Make the OpenAPI document tell the truth about errors: every operation may answer
    the generic ``{"error": ...}`` statuses, and body validation answers 422 in that same
    shape instead of FastAPI's default ``{"detail": [...]}``."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schema["components"]["schemas"]["ErrorBody"] = {
            "title": "ErrorBody",
            "type": "object",
            "properties": {"error": {"type": "string", "title": "Error"}},
            "required": ["error"],
        }
        for component in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(component, None)
        error = {
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        }
        for operations in schema["paths"].values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if "requestBody" in operation:
                    responses["422"] = {"description": "The request body is invalid", **error}
                for status, description in _GENERIC_ERRORS.items():
                    responses.setdefault(status, {"description": description, **error})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
