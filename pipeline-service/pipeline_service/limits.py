"""Request size limits, enforced before a route sees the request."""

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_URL_BYTES = 8 * 1024
MAX_BODY_BYTES = 1024 * 1024


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` so that routes reading the body answer 413, not 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body too large: at most {limit} bytes")


class RequestLimits:
    """Answers 414 for a URL longer than ``max_url_bytes``, 400 for a URL holding a NUL
    character, and 413 for a body larger than ``max_body_bytes`` (declared or streamed),
    all as JSON errors."""

    def __init__(
        self, app: ASGIApp, max_url_bytes: int = MAX_URL_BYTES, max_body_bytes: int = MAX_BODY_BYTES
    ) -> None:
        self.app = app
        self.max_url_bytes = max_url_bytes
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if url_bytes > self.max_url_bytes:
            await _reject(send, 414, f"URL too long: at most {self.max_url_bytes} bytes")
            return
        if b"%00" in (scope.get("raw_path") or b"") + (scope.get("query_string") or b""):
            # PostgreSQL text cannot hold U+0000: no id or parameter can contain it.
            await _reject(send, 400, "the URL contains a NUL character (%00)")
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reject(send, 413, f"request body too large: at most {self.max_body_bytes} bytes")
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            if not started:
                await _reject(send, 413, exc.detail)


async def _reject(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
