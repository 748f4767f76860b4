"""`mock-server` console script: the app under gunicorn's sync workers."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from mock_server.app import MockState, create_app
from mock_server.data import StartupError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_WORKERS = 2


class _Server(BaseApplication):
    """Gunicorn around an app that was built (and its data loaded) before forking."""

    def __init__(self, app: Flask, options: dict[str, Any]) -> None:
        self.application = app
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for name, value in self.options.items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)

    def load(self) -> Flask:
        return self.application


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _default_workers() -> int:
    raw = os.environ.get("MOCK_WORKERS", "").strip()
    if not raw:
        return DEFAULT_WORKERS
    if not raw.isdigit() or int(raw) < 1:
        raise StartupError(f"MOCK_WORKERS must be a positive integer, got {raw!r}")
    return int(raw)


def _parser(default_workers: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mock-server",
        description="Serve customers.json, machines.json and readings.json as a paginated "
        "JSON API (chaos settings: MOCK_CHAOS_* environment variables).",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (%(default)s)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port (%(default)s)")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=default_workers,
        help="gunicorn sync workers (MOCK_WORKERS, default %(default)s)",
    )
    parser.add_argument(
        "--data-dir", help="folder with the three JSON files (MOCK_DATA_DIR, else mock-server/data)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; exit 1 with one stderr line on a start-up error."""
    try:
        args = _parser(_default_workers()).parse_args(argv)
        app = create_app({"DATA_DIR": args.data_dir} if args.data_dir else None)
    except StartupError as e:
        print(f"mock-server: {e}", file=sys.stderr)
        return 1

    state: MockState = app.extensions["mock_server"]
    counts = ", ".join(f"{name}={n}" for name, n in state.dataset.counts().items())
    chaos = state.chaos.settings

    def when_ready(server: Any) -> None:
        urls = ", ".join(str(listener) for listener in server.LISTENERS)
        extra = f"; chaos: {chaos.describe()}" if chaos.enabled else ""
        data_dir = state.data_dir.resolve()
        server.log.info("mock-server: serving %s at %s (%s)%s", data_dir, urls, counts, extra)

    def post_fork(server: Any, worker: Any) -> None:
        state.chaos.reseed(worker.age)

    host = f"[{args.host}]" if ":" in args.host else args.host
    options: dict[str, Any] = {
        "bind": f"{host}:{args.port}",
        "workers": args.workers,
        "worker_class": "sync",
        "preload_app": True,
        "proc_name": "mock-server",
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        "timeout": 30 + int(chaos.latency_ms / 1000),
        "when_ready": when_ready,
        "post_fork": post_fork,
        # Two gunicorns on one machine must not fight over $HOME/.gunicorn/gunicorn.ctl.
        "control_socket_disable": True,
    }
    _Server(app, options).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
