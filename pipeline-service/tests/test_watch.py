"""`pipeline-service watch`: moving averages from a running pipeline, one JSON line each."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pipeline_service.cli import main
from pipeline_service.watch import watch

from conftest import SAMPLE_DATA_DIR, ThreadedServer


@pytest.fixture
def pipeline_url(database_url, serve_source, make_client) -> Iterator[str]:
    """A pipeline serving the ingested sample data over real HTTP."""
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    assert client.post("/api/ingest").status_code == 200
    server = ThreadedServer(client.app)
    yield server.url
    server.stop()


def test_watch_prints_one_moving_average_per_interval(pipeline_url):
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    status = watch("MCH001", pipeline_url, interval=0.2, window=3, count=3, out=out, err=err)
    assert status == 0 and err.getvalue() == ""
    assert 0.35 < time.monotonic() - started < 5  # two waits between three lines
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (
        lines
        == [
            {
                "machine_id": "MCH001",
                "window": 3,
                "count": 3,
                "average_temperature": 98.33,  # 80, 105, 110
                "average_speed": 1180.0,
                "status": "STARTED",
                "as_of": "2024-06-01T08:25:00Z",
            }
        ]
        * 3
    )


def test_watch_of_an_unknown_machine_is_one_line_and_exit_1(pipeline_url):
    out, err = io.StringIO(), io.StringIO()
    assert watch("NOPE", pipeline_url, 0.2, 5, count=2, out=out, err=err) == 1
    assert out.getvalue() == ""
    assert err.getvalue() == f"pipeline-service watch: no machine 'NOPE' at {pipeline_url}\n"


def test_watch_without_a_pipeline_is_one_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["watch", "MCH001", "--url", "http://127.0.0.1:9", "--count", "1"])
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("pipeline-service watch: cannot reach the pipeline at ")
    assert len(captured.err.splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [["--interval", "0"], ["--interval", "-1"], ["--window", "0"], ["--window", "1001"]],
)
def test_watch_rejects_bad_options(capsys, args):
    with pytest.raises(SystemExit) as exited:
        main(["watch", "MCH001", *args])
    assert exited.value.code == 2
    assert args[0] in capsys.readouterr().err


def watch_process(url: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PIPELINE_URL=url)
    command = [sys.executable, "-m", "pipeline_service.cli", "watch", "MCH001", *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_watch_command_prints_json_lines_from_a_running_server(pipeline_url):
    process = watch_process(pipeline_url, "--count", "2", "--interval", "0.2")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2 and all(line["window"] == 5 for line in lines)


@pytest.mark.slow
def test_watch_command_stops_quietly_on_ctrl_c(pipeline_url):
    process = watch_process(pipeline_url, "--interval", "30")
    try:
        first = process.stdout.readline()  # blocks until the first line is printed
        assert json.loads(first)["machine_id"] == "MCH001"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=5)
    assert process.returncode == 0
    assert (out, err) == ("", "")
