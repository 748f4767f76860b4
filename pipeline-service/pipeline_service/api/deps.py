"""Dependencies shared by the routes: settings, paging parameters and the write guard."""

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Query, Request

from pipeline_service.config import Settings
from pipeline_service.db import SessionDep

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "MAX_PAGE",
    "LimitParam",
    "PageParam",
    "SessionDep",
    "SettingsDep",
    "require_api_key",
]


def get_settings_from_app(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_from_app)]

MAX_PAGE = 10_000_000
MAX_LIMIT = 1000
DEFAULT_LIMIT = 10
PageParam = Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number")]
LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Records per page")]


def require_api_key(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """When PIPELINE_API_KEY is set, the request must carry ``Authorization: Bearer <key>``."""
    expected = settings.pipeline_api_key
    if not expected:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise HTTPException(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <PIPELINE_API_KEY>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
