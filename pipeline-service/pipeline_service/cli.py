"""The ``pipeline-service`` command: with no subcommand it serves the API."""

import argparse
import logging
import sys

from pydantic import ValidationError


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


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from pipeline_service.main import create_app

    settings = _settings_or_exit()
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        workers=1,
        log_level=settings.log_level.lower(),
        access_log=args.access_log,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline-service", description="Serve the pipeline API (default) or run a tool."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.set_defaults(handler=serve)
    parser.add_subparsers(title="subcommands", dest="command")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args.handler(args)


if __name__ == "__main__":
    main()
