"""The `mock-server` console script: start-up errors, and the real gunicorn server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from mock_server.cli import main

SCRIPT = Path(sys.executable).parent / "mock-server"


def _clean_environ(**overrides: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MOCK_")}
    return {**environ, **overrides}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("MOCK_"):
            monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
def test_missing_data_file_exits_1_with_one_line(
    make_data_dir: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = make_data_dir(machines=None)
    assert main(["--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert err == f"mock-server: data file {data_dir / 'machines.json'} does not exist\n"


@pytest.mark.usefixtures("clean_env")
def test_bad_chaos_setting_exits_1_with_one_line(
    make_data_dir: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOCK_DATA_DIR", str(make_data_dir()))
    monkeypatch.setenv("MOCK_CHAOS_RESET_RATE", "often")
    assert main([]) == 1
    assert capsys.readouterr().err == (
        "mock-server: MOCK_CHAOS_RESET_RATE must be a number, got 'often'\n"
    )


@pytest.mark.usefixtures("clean_env")
def test_bad_worker_count_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCK_WORKERS", "0")
    assert main([]) == 1
    err = capsys.readouterr().err
    assert err == "mock-server: MOCK_WORKERS must be a positive integer, got '0'\n"


@pytest.mark.parametrize("args", [["--port", "70000"], ["--workers", "0"], ["--port", "x"]])
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _running(log: Path, environ: dict[str, str], *args: str) -> Iterator[str]:
    """Run the console script on a free loopback port until the block ends; yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(SCRIPT), "--host", "127.0.0.1", "--port", str(port), *args],
            env=environ,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/api/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0, log.read_text()


@pytest.mark.slow
def test_console_script_serves_pages(
    make_data_dir: Callable[..., Path], tmp_path: Path, customers: list[dict]
) -> None:
    log = tmp_path / "server.log"
    data_dir = make_data_dir()
    with _running(log, _clean_environ(MOCK_DATA_DIR=str(data_dir))) as url:
        response = requests.get(f"{url}/api/customers?page=3&limit=10", timeout=10)
        assert response.status_code == 200
        assert response.json() == {"data": customers[20:], "total": 25, "page": 3, "limit": 10}
        bad = requests.get(f"{url}/api/customers?limit=0", timeout=10)
        assert (bad.status_code, bad.headers["Content-Type"]) == (400, "application/json")
    output = log.read_text()
    counts = "customers=25, machines=3, readings=12"
    assert f"serving {data_dir.resolve()} at {url} ({counts})" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_console_script_chaos_under_gunicorn(
    make_data_dir: Callable[..., Path], tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    environ = _clean_environ(
        MOCK_DATA_DIR=str(make_data_dir()),
        MOCK_CHAOS_SEED="5",
        MOCK_CHAOS_TRUNCATE_RATE="0.3",
        MOCK_CHAOS_RESET_RATE="0.3",
        MOCK_CHAOS_RATE_LIMIT_RATE="0.2",
        MOCK_CHAOS_RETRY_AFTER="2",
    )
    seen: dict[str, int] = {}
    with _running(log, environ, "--workers", "2") as url:
        for _ in range(60):
            try:
                response = requests.get(f"{url}/api/readings?limit=1000", timeout=10)
                outcome = str(response.status_code)
                if response.status_code == 200:
                    assert len(response.json()["data"]) == 12
                else:
                    assert response.headers["Retry-After"] == "2"
            except requests.RequestException as e:
                outcome = type(e).__name__
            seen[outcome] = seen.get(outcome, 0) + 1
        assert requests.get(f"{url}/api/health", timeout=10).status_code == 200
    assert set(seen) == {"200", "429", "ChunkedEncodingError", "ConnectionError"}, seen
    output = log.read_text()
    assert "chaos: seed=5" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_console_script_start_up_error_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SCRIPT), "--port", str(_free_port())],
        env=_clean_environ(MOCK_DATA_DIR=str(tmp_path / "missing")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("mock-server: data file ")
    assert result.stderr.count("\n") == 1
    assert "customers.json does not exist" in result.stderr
