"""``pipeline-service watch``: a machine's moving averages, one JSON line per interval,
read from a running pipeline's HTTP API (so it needs no database credentials)."""

import json
import os
import sys
import time
from typing import TextIO

import requests

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT = (3.0, 10.0)  # seconds to connect, seconds to wait for an answer


class WatchError(Exception):
    """A problem worth one line on stderr and a non-zero exit."""


def default_url() -> str:
    return os.environ.get("PIPELINE_URL") or DEFAULT_URL


def fetch_moving_average(session: requests.Session, url: str, machine_id: str, window: int) -> dict:
    """The pipeline's moving-average answer; raises :class:`WatchError` saying what is wrong."""
    endpoint = f"{url.rstrip('/')}/api/machines/{requests.utils.quote(machine_id, safe='')}"
    try:
        response = session.get(
            f"{endpoint}/moving-average", params={"window": window}, timeout=TIMEOUT
        )
    except requests.RequestException as exc:
        raise WatchError(f"cannot reach the pipeline at {url} ({type(exc).__name__})") from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 200 and isinstance(body, dict):
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if response.status_code == 404:
        raise WatchError(f"no machine {machine_id!r} at {url}")
    raise WatchError(f"the pipeline at {url} answered {response.status_code}: {error or '?'}")


def watch(
    machine_id: str,
    url: str,
    interval: float,
    window: int,
    count: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the moving-average answer as one JSON line every ``interval`` seconds (on a
    fixed schedule, so lines do not drift), ``count`` times or until interrupted.

    Returns the exit status: 0 when done, 1 when the first request fails (pipeline
    unreachable, unknown machine). A later failure is reported on ``err`` and retried at
    the next interval, so a watch outlives a pipeline restart.
    """
    out, err = out or sys.stdout, err or sys.stderr
    printed = 0
    started = time.monotonic()
    with requests.Session() as session:
        while count is None or printed < count:
            try:
                answer = fetch_moving_average(session, url, machine_id, window)
            except WatchError as exc:
                print(f"pipeline-service watch: {exc}", file=err, flush=True)
                if printed == 0:
                    return 1
            else:
                print(json.dumps(answer), file=out, flush=True)
                printed += 1
            if count is not None and printed >= count:
                break
            ticks = int((time.monotonic() - started) / interval) + 1
            time.sleep(max(0.0, started + ticks * interval - time.monotonic()))
    return 0
