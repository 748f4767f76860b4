"""The ``pipeline-service`` command: with no subcommand it serves the API."""

import argparse
import logging
import os
import sys

import uvicorn
from pydantic import ValidationError
from uvicorn.supervisors import Multiprocess


def _settings_or_exit():
    from pipeline_service.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        for item in exc.errors():
            name = "_".join(str(p) for p in item["loc"]).upper()
            problem = "is not set" if item["type"] == "missing" else item["msg"]
            print(f"pipeline-service: {name} {problem} (see .env.example)", file=sys.stderr)
        sys.exit(2)


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        # uvicorn waits for open responses before it stops, and an event stream never
        # ends by itself: end the streams so Ctrl-C stops the server promptly.
        from pipeline_service.events import stop_all_listeners

        stop_all_listeners()
        super().handle_exit(sig, frame)


def serve(args: argparse.Namespace) -> None:
    settings = _settings_or_exit()
    workers = args.workers or settings.pipeline_workers
    config = uvicorn.Config(
        "pipeline_service.main:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=workers,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
        # Worker processes cannot use _Server: there open event streams are cut this late.
        timeout_graceful_shutdown=3,
    )
    if workers > 1:
        # Several processes share one listening socket; each runs the app on its own.
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = _Server(config)
    server.run()
    if not server.started:
        sys.exit(3)


def watch(args: argparse.Namespace) -> None:
    from pipeline_service.watch import watch as run_watch

    sys.exit(run_watch(args.machine_id, args.url, args.interval, args.window, args.count))


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _int_between(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline-service", description="Serve the pipeline API (default) or run a tool."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--workers",
        type=_int_between(1, 32),
        default=None,
        help="server processes (default: PIPELINE_WORKERS, else 1)",
    )
    parser.set_defaults(handler=serve)
    commands = parser.add_subparsers(title="subcommands", dest="command")

    from pipeline_service.watch import default_url

    watch_parser = commands.add_parser(
        "watch",
        help="print a machine's moving averages every interval",
        description="Print the moving averages of a machine's newest readings as one JSON "
        "object per interval, from a running pipeline, until Ctrl-C.",
    )
    watch_parser.add_argument("machine_id", help="the machine to watch, e.g. MCH001")
    watch_parser.add_argument(
        "--interval", type=_positive_float, default=10.0, help="seconds between lines (10)"
    )
    watch_parser.add_argument(
        "--window", type=_int_between(1, 1000), default=5, help="newest readings averaged (5)"
    )
    watch_parser.add_argument(
        "--url",
        default=default_url(),
        help="the pipeline's base URL (default: $PIPELINE_URL or http://127.0.0.1:8000)",
    )
    watch_parser.add_argument(
        "--count",
        type=_int_between(1, 2**31),
        default=None,
        help="stop after this many lines (default: until Ctrl-C)",
    )
    watch_parser.set_defaults(handler=watch)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        args.handler(args)
    except KeyboardInterrupt:
        sys.exit(0)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly; pointing stdout at devnull
        # spares a second BrokenPipeError when Python flushes it on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
