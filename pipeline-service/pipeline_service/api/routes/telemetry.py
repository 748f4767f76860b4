"""Machine analytics, status updates, pushed readings and the live stream (issue 5)."""

from fastapi import APIRouter

router = APIRouter(tags=["machines"])
