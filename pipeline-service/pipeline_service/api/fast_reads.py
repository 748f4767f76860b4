"""A fast lane for the hottest reads: a plain GET of a stored page or of one stored record.

FastAPI's per-request machinery (routing through each layer, solving dependencies,
validating parameters) costs the server as much CPU as such a read itself. This middleware
answers the plainest form of those requests, ``GET /api/customers?page=P&limit=L`` and
``GET /api/customers/<id>`` (likewise for machines), with the functions the routes in
``records.py`` call. It only ever answers with a page, a record, or the 503 of a pool with
no connection free (asking the route would wait as long again): every other request,
anything malformed or unusual, a missing record and an unreachable database included, goes
on to FastAPI as it came, so the routes stay the one definition of the API's parameters,
errors and documentation.
"""

import re

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline_service.api.deps import DEFAULT_LIMIT, MAX_LIMIT, MAX_PAGE
from pipeline_service.api.routes.records import json_page, json_record
from pipeline_service.db import DatabaseBusy, DatabaseUnavailable, ReadPools
from pipeline_service.errors import BUSY, error_response
from pipeline_service.resources import RESOURCES

_PLAIN_NUMBER = re.compile(rb"[1-9][0-9]{0,7}")


def plain_paging(query: bytes) -> tuple[int, int] | None:
    """``(page, limit)`` from a query string that holds nothing but ``page`` and ``limit``,
    each at most once and written as a plain number within bounds; None for any other."""
    given: dict[bytes, int] = {}
    if query:
        for part in query.split(b"&"):
            name, _, value = part.partition(b"=")
            if name not in (b"page", b"limit") or name in given:
                return None
            if not _PLAIN_NUMBER.fullmatch(value):
                return None
            given[name] = int(value)
    page, limit = given.get(b"page", 1), given.get(b"limit", DEFAULT_LIMIT)
    if page > MAX_PAGE or limit > MAX_LIMIT:
        return None
    return page, limit


class FastReads:
    """Answers plain reads of the top-level collections under ``prefix`` from ``reads``;
    passes every other request on to ``app``."""

    def __init__(self, app: ASGIApp, reads: ReadPools, prefix: str) -> None:
        self.app = app
        self.reads = reads
        self.collections = {f"{prefix}/{r.name}": r for r in RESOURCES.values() if r.positioned}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            try:
                response = await self._answer(scope)
            except DatabaseBusy:
                response = error_response(503, BUSY)
            except (HTTPException, DatabaseUnavailable):
                # The routes answer these as they always do (a 404, a 503), or succeed on a
                # fresh connection after a restart of PostgreSQL.
                response = None
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope) -> Response | None:
        path = scope["path"]
        resource = self.collections.get(path)
        if resource is not None:
            paging = plain_paging(scope["query_string"])
            if paging is None:
                return None
            page, limit = paging
            (order,) = resource.key
            async with self.reads.connection() as conn:
                return await json_page(conn, Request(scope), resource, page, limit, None, {}, order)
        collection, _, record_id = path.rpartition("/")
        resource = self.collections.get(collection)
        if resource is None or not record_id or scope["query_string"]:
            return None
        async with self.reads.connection() as conn:
            return await json_record(conn, resource, record_id)
