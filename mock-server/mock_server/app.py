"""The Flask app: paginated, read-only JSON over the three source files."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, abort, current_app, g, request
from flask.json.provider import JSONProvider
from werkzeug.exceptions import HTTPException

from mock_server.chaos import Chaos, ChaosSettings, Kind, client_socket, cut_short, reset_connection
from mock_server.data import RESOURCES, Dataset, Resource, load_dataset

DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
JSON = "application/json"
_DIGITS = re.compile(r"[0-9]+")

bp = Blueprint("api", __name__, url_prefix="/api")


@dataclass(frozen=True)
class MockState:
    """What one app serves: where the data came from, the records, and its chaos."""

    data_dir: Path
    dataset: Dataset
    chaos: Chaos


class _OrjsonProvider(JSONProvider):
    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)


def default_data_dir() -> Path:
    """$MOCK_DATA_DIR, else ./mock-server/data, else the data/ folder beside this package."""
    if env := os.environ.get("MOCK_DATA_DIR", "").strip():
        return Path(env)
    in_cwd = Path("mock-server", "data")
    if in_cwd.is_dir():
        return in_cwd
    beside_source = Path(__file__).resolve().parents[1] / "data"
    if (beside_source / "customers.json").is_file():
        return beside_source
    return in_cwd


def state() -> MockState:
    """The MockState of the app handling the current request."""
    return current_app.extensions["mock_server"]


def _json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status=status, mimetype=JSON)


def _error_response(message: str, status: int) -> Response:
    return _json_response(orjson.dumps({"error": message}), status)


def _query_int(name: str, default: int, maximum: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    value = int(raw) if _DIGITS.fullmatch(raw) and len(raw) <= 4000 else 0
    if value < 1 or (maximum is not None and value > maximum):
        bounds = f"between 1 and {maximum}" if maximum is not None else ">= 1"
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        abort(400, description=f"{name} must be an integer {bounds}, got {shown!r}")
    return value


def _page(items: list[bytes]) -> Response:
    """One page of `items` as {"data","total","page","limit"}, joined from stored bytes."""
    page = _query_int("page", 1)
    limit = _query_int("limit", DEFAULT_LIMIT, MAX_LIMIT)
    start = (page - 1) * limit
    body = b"".join(
        (
            b'{"data":[',
            b",".join(items[start : start + limit]),
            b'],"total":%d,"page":%d,"limit":%d}' % (len(items), page, limit),
        )
    )
    return _json_response(body)


def _register_routes(resource: Resource) -> None:
    collection_name = resource.name

    def list_records() -> Response:
        return _page(state().dataset.collections[collection_name].items)

    bp.add_url_rule(f"/{collection_name}", f"list_{collection_name}", list_records)

    if resource.key is not None:
        key_name = resource.key

        def get_record(record_id: str) -> Response:
            record = state().dataset.collections[collection_name].by_key.get(record_id)
            if record is None:
                abort(404, description=f"{key_name} {record_id!r} not found")
            return _json_response(record)

        bp.add_url_rule(f"/{collection_name}/<record_id>", f"get_{collection_name}", get_record)

    if resource.group_by is not None:
        parent = next(r for r in RESOURCES if r.key == resource.group_by)
        group_name = resource.group_by

        def list_group(record_id: str) -> Response:
            dataset = state().dataset
            group = dataset.collections[collection_name].groups.get(record_id)
            if group is None:
                if record_id not in dataset.collections[parent.name].by_key:
                    abort(404, description=f"{group_name} {record_id!r} not found")
                group = []
            return _page(group)

        bp.add_url_rule(
            f"/{parent.name}/<record_id>/{collection_name}",
            f"list_{parent.name}_{collection_name}",
            list_group,
        )


for _resource in RESOURCES:
    _register_routes(_resource)


@bp.get("/health")
def health() -> dict[str, Any]:
    """Always 200 while the process serves; never subject to chaos."""
    current = state()
    return {
        "status": "ok",
        "records": current.dataset.counts(),
        "chaos": current.chaos.settings.enabled,
    }


@bp.before_request
def _inject_chaos() -> Response | None:
    current = state()
    settings = current.chaos.settings
    if request.endpoint == "api.health" or not settings.enabled:
        return None
    if settings.latency_ms:
        time.sleep(settings.latency_ms / 1000)
    outcome = current.chaos.draw()
    if outcome.kind is Kind.ERROR:
        status = outcome.status or 500
        return _error_response(f"chaos: injected HTTP {status}", status)
    if outcome.kind is Kind.RATE_LIMIT:
        response = _error_response("chaos: rate limited", 429)
        response.headers["Retry-After"] = str(settings.retry_after)
        return response
    if outcome.kind is Kind.RESET:
        sock = client_socket(request.environ)
        if sock is not None:
            reset_connection(sock)
            return _json_response(b"{}")  # never reaches the client
        # Without a socket (e.g. the Flask test client) the nearest thing is no body at all.
        g.chaos_body_share = 0.0
    elif outcome.kind is Kind.TRUNCATE:
        g.chaos_body_share = 0.5
    return None


@bp.after_request
def _truncate_body(response: Response) -> Response:
    if "chaos_body_share" not in g:
        return response
    body = response.get_data()
    keep = int(len(body) * g.pop("chaos_body_share"))
    truncated = Response(
        cut_short(body[:keep], client_socket(request.environ)),
        status=response.status_code,
        headers=response.headers,
    )
    # The full length is announced so the client notices the missing bytes.
    truncated.headers["Content-Length"] = str(len(body))
    return truncated


@bp.app_errorhandler(HTTPException)
def _json_error(e: HTTPException) -> Response:
    response = e.get_response()
    response.set_data(orjson.dumps({"error": e.description}))
    response.mimetype = JSON
    return response


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app and load its data once.

    Config keys: DATA_DIR (default: see default_data_dir) and CHAOS_* (see ChaosSettings),
    which override the MOCK_* environment variables. Raises StartupError (one-line
    message naming the file or setting) when a data file is missing or unparsable or a
    chaos setting is invalid.
    """
    app = Flask(__name__)
    app.json = _OrjsonProvider(app)
    app.config.update(config or {})
    data_dir = Path(app.config.get("DATA_DIR") or default_data_dir())
    chaos = Chaos(ChaosSettings.from_sources(app.config, os.environ))
    app.extensions["mock_server"] = MockState(
        data_dir=data_dir, dataset=load_dataset(data_dir), chaos=chaos
    )
    app.register_blueprint(bp)
    return app
