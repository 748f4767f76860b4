"""Opt-in fault injection for the data endpoints, deterministic given a seed.

Each data request draws one outcome: pass, an HTTP error, a 429 with Retry-After, a body
cut short, or a connection reset. Truncation and resets act on the client's socket, which
both gunicorn (``gunicorn.socket``) and werkzeug's server (``werkzeug.socket``) expose in
the WSGI environ.
"""

from __future__ import annotations

import contextlib
import enum
import math
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields

from mock_server.data import StartupError


class Kind(enum.Enum):
    """What chaos does to one request."""

    PASS = "pass"
    ERROR = "error"
    RATE_LIMIT = "rate_limit"
    TRUNCATE = "truncate"
    RESET = "reset"


@dataclass(frozen=True)
class Outcome:
    """One draw: its kind, and the status code when the kind is ERROR."""

    kind: Kind
    status: int | None = None


PASS = Outcome(Kind.PASS)


def _parse_int(name: str, raw: object, minimum: int | None = None) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise StartupError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise StartupError(f"{name} must be >= {minimum}, got {raw!r}")
    return value


def _parse_number(name: str, raw: object) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise StartupError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise StartupError(f"{name} must be a finite number, got {raw!r}")
    return value


def _parse_rate(name: str, raw: object) -> float:
    value = _parse_number(name, raw)
    if not 0.0 <= value <= 1.0:
        raise StartupError(f"{name} must be a fraction between 0 and 1, got {raw!r}")
    return value


def _parse_latency(name: str, raw: object) -> float:
    value = _parse_number(name, raw)
    if value < 0:
        raise StartupError(f"{name} must be >= 0 milliseconds, got {raw!r}")
    return value


def _parse_codes(name: str, raw: object) -> tuple[int, ...]:
    if isinstance(raw, list | tuple):
        parts = [str(part) for part in raw]
    else:
        parts = [part for part in str(raw).split(",") if part.strip()]
    codes = tuple(_parse_int(name, part) for part in parts)
    if not codes or any(not 400 <= code <= 599 for code in codes):
        raise StartupError(f"{name} must be a comma-separated list of 4xx/5xx codes, got {raw!r}")
    return codes


_PARSERS: dict[str, Callable[[str, object], object]] = {
    "seed": _parse_int,
    "error_rate": _parse_rate,
    "error_codes": _parse_codes,
    "latency_ms": _parse_latency,
    "rate_limit_rate": _parse_rate,
    "retry_after": lambda name, raw: _parse_int(name, raw, minimum=0),
    "truncate_rate": _parse_rate,
    "reset_rate": _parse_rate,
}


@dataclass(frozen=True)
class ChaosSettings:
    """Validated chaos knobs; all rates are fractions of data requests, off by default.

    Each field `f` is read from the app config key ``CHAOS_<F>``, else from the
    environment variable ``MOCK_CHAOS_<F>`` (an empty variable counts as unset).
    """

    seed: int = 0
    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (500, 502, 503, 504)
    latency_ms: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after: int = 1
    truncate_rate: float = 0.0
    reset_rate: float = 0.0

    @classmethod
    def from_sources(
        cls, config: Mapping[str, object], environ: Mapping[str, str]
    ) -> ChaosSettings:
        """Settings from `config` overriding `environ`; raises StartupError on a bad value."""
        values: dict[str, object] = {}
        for f in fields(cls):
            config_key = f"CHAOS_{f.name.upper()}"
            env_key = f"MOCK_{config_key}"
            if config.get(config_key) is not None:
                values[f.name] = _PARSERS[f.name](config_key, config[config_key])
            elif environ.get(env_key, "").strip():
                values[f.name] = _PARSERS[f.name](env_key, environ[env_key])
        settings = cls(**values)  # type: ignore[arg-type]
        if settings.failure_rate > 1.0 + 1e-9:
            raise StartupError(
                "MOCK_CHAOS_ERROR_RATE, _RATE_LIMIT_RATE, _TRUNCATE_RATE and _RESET_RATE "
                f"must add up to at most 1, got {settings.failure_rate:g}"
            )
        return settings

    @property
    def failure_rate(self) -> float:
        """Fraction of data requests that do not pass through untouched."""
        return self.error_rate + self.rate_limit_rate + self.truncate_rate + self.reset_rate

    def describe(self) -> str:
        """One line: the seed and every other setting that differs from its default."""
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name != "seed" and getattr(self, f.name) != f.default
        ]
        return ", ".join([f"seed={self.seed}", *changed])

    @property
    def enabled(self) -> bool:
        """Whether chaos changes anything at all."""
        return self.failure_rate > 0 or self.latency_ms > 0


class Chaos:
    """Draws outcomes from one seeded random stream; safe to share between threads."""

    def __init__(self, settings: ChaosSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._rng = random.Random(settings.seed)

    def reseed(self, salt: int) -> None:
        """Switch to the stream for (seed, salt), so forked workers do not mirror each other."""
        with self._lock:
            self._rng = random.Random(f"{self.settings.seed}:{salt}")

    def draw(self) -> Outcome:
        """The next outcome; the same seed always yields the same sequence of outcomes."""
        s = self.settings
        if s.failure_rate == 0:
            return PASS
        with self._lock:
            r = self._rng.random()
            # Always drawn, so the stream advances the same way whatever the outcome.
            status = self._rng.choice(s.error_codes)
        for kind, rate in (
            (Kind.RESET, s.reset_rate),
            (Kind.TRUNCATE, s.truncate_rate),
            (Kind.RATE_LIMIT, s.rate_limit_rate),
            (Kind.ERROR, s.error_rate),
        ):
            if r < rate:
                return Outcome(kind, status if kind is Kind.ERROR else None)
            r -= rate
        return PASS


def client_socket(environ: Mapping[str, object]) -> socket.socket | None:
    """The client connection's socket under gunicorn or werkzeug's server, else None."""
    for key in ("gunicorn.socket", "werkzeug.socket"):
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


def reset_connection(sock: socket.socket) -> None:
    """Drop the connection so the client gets no response at all.

    Only shuts the socket down (the server still owns and closes it); with SO_LINGER
    set to zero that final close sends a TCP RST. The server's own write then fails
    with EPIPE, which gunicorn and werkzeug both treat as a dropped client.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)


def cut_short(part: bytes, sock: socket.socket | None) -> Iterator[bytes]:
    """A WSGI body that sends `part` and then closes the connection (FIN, not RST,
    so the client reads the partial bytes before it sees the end of the stream)."""
    if part:
        yield part
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
