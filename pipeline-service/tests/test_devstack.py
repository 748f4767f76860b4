"""`make run`'s stack: comes up, ingests, answers, and leaves nothing behind on Ctrl-C."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from pipeline_service.devstack import free_port

ROOT = Path(__file__).resolve().parents[2]


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_run_brings_up_the_stack_and_ctrl_c_stops_all_of_it(database_url, tmp_path):
    mock_port, pipeline_port = free_port(), free_port()
    log = (tmp_path / "run.log").open("w+")
    stack = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline_service.devstack",
            "run",
            "--mock-port",
            str(mock_port),
            "--pipeline-port",
            str(pipeline_port),
        ],
        cwd=ROOT,
        env=os.environ | {"DATABASE_URL": database_url, "PIPELINE_API_KEY": ""},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        output = ""
        while "Press Ctrl-C" not in output and stack.poll() is None:
            assert time.monotonic() < deadline, "the stack did not come up within 60s"
            time.sleep(0.2)
            log.seek(0)
            output = log.read()
        assert "Press Ctrl-C" in output, output
        assert "Ingest run 1: 113 records" in output
        assert f"curl 'http://127.0.0.1:{pipeline_port}/api/customers?page=1&limit=5'" in output
        assert "make psql" in output

        body = requests.get(
            f"http://127.0.0.1:{pipeline_port}/api/customers?page=1&limit=5", timeout=5
        ).json()
        assert [c["customer_id"] for c in body["data"]] == [f"CUST00{n}" for n in range(1, 6)]
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(timeout=30)
        log.seek(0)
        output = log.read()
        log.close()
    assert "Stopping" in output
    assert not listening(mock_port) and not listening(pipeline_port)


def test_run_refuses_a_busy_port_with_a_clear_message():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "pipeline_service.devstack", "run", "--mock-port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stderr
