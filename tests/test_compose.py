"""Static checks of docker-compose.yml, the Dockerfiles, .dockerignore and .env.example.

No Docker engine is needed: the files are parsed and cross-checked against each other, the
packages' pyproject.toml files, the pipeline's Settings and the mock server's sources.
"""

from __future__ import annotations

import configparser
import json
import os
import posixpath
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from pipeline_service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
MOCK_PACKAGE = ROOT / "mock-server" / "mock_server"

SERVICES = ("postgres", "migrate", "mock-server", "pipeline-service")
# service -> (directory holding its pyproject.toml, console script it must run, port)
APP_SERVICES = {
    "mock-server": ("mock-server", "mock-server", 5000),
    "pipeline-service": ("pipeline-service", "pipeline-service", 8000),
}
SOURCE_FILES = ("customers.json", "machines.json", "readings.json")
DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:us|ms|s|m|h))+")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(?:^|_)KEY$")
_WHOLE_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\}")


# --- Compose interpolation (the subset of the Compose Specification this file may use) ---

_TOKEN = re.compile(r"\$\$|\$\{(?P<braced>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


@dataclass(frozen=True)
class Interpolation:
    name: str
    op: str | None  # None, "-", ":-", "?", ":?", "+", ":+"
    arg: str

    @property
    def has_default(self) -> bool:
        return self.op in ("-", ":-")


def _parse_token(match: re.Match[str]) -> Interpolation | None:
    if match.group(0) == "$$":
        return None
    if match.group("bare") is not None:
        return Interpolation(match.group("bare"), None, "")
    braced = _BRACED.fullmatch(match.group("braced"))
    assert braced, f"malformed interpolation {match.group(0)!r}"
    return Interpolation(braced.group("name"), braced.group("op"), braced.group("arg") or "")


def interpolations(text: str) -> list[Interpolation]:
    """Every variable reference in one Compose value, escaped `$$` excluded."""
    return [i for m in _TOKEN.finditer(text) if (i := _parse_token(m)) is not None]


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Resolve a Compose value the way `docker compose` does, given the project environment."""

    def resolve(match: re.Match[str]) -> str:
        ref = _parse_token(match)
        if ref is None:
            return "$"
        value = env.get(ref.name)
        if ref.op is None:
            return value or ""
        if ref.op == ":-":
            return value if value else ref.arg
        if ref.op == "-":
            return value if value is not None else ref.arg
        if ref.op == ":+":
            return ref.arg if value else ""
        if ref.op == "+":
            return ref.arg if value is not None else ""
        if value is None or (ref.op == ":?" and not value):
            raise LookupError(f"{ref.name} is required: {ref.arg}")
        return value

    return _TOKEN.sub(resolve, text)


def strings_in(node: Any) -> Iterator[str]:
    """Every string value (not key) of a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


# --- .env.example ---------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^(?P<comment>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def env_example_values(*, commented: bool = True) -> dict[str, str]:
    """Example values by name, commented-out (optional) ones included unless told not to."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _ASSIGNMENT.match(line.strip())
        if match and (commented or not match.group("comment")):
            values[match.group("name")] = match.group("value").strip()
    return values


def env_example() -> tuple[dict[str, str], set[str]]:
    """(active assignments, every documented name including commented-out ones)."""
    return env_example_values(commented=False), set(env_example_values())


# --- Compose file helpers -------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict), "docker-compose.yml must be a mapping"
    return document


def service(compose: Mapping[str, Any], name: str) -> dict[str, Any]:
    services = compose.get("services") or {}
    assert name in services, f"service {name!r} missing from docker-compose.yml"
    return services[name]


def environment(svc: Mapping[str, Any]) -> dict[str, str | None]:
    """A service's `environment`, list or mapping form, values as raw (uninterpolated) strings."""
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in raw)
        return {key: value for key, value in pairs}
    return {key: None if value is None else str(value) for key, value in raw.items()}


def resolved_environment(svc: Mapping[str, Any], project_env: Mapping[str, str]) -> dict[str, str]:
    """What the container would see: interpolated, and key-only entries taken from project_env."""
    resolved = {}
    for key, value in environment(svc).items():
        if value is None:
            if key in project_env:
                resolved[key] = project_env[key]
        else:
            resolved[key] = interpolate(value, project_env)
    return resolved


def command(svc: Mapping[str, Any]) -> list[str]:
    raw = svc.get("command")
    assert raw, "service has no command"
    return raw.split() if isinstance(raw, str) else [str(part) for part in raw]


def depends_on(svc: Mapping[str, Any]) -> dict[str, str]:
    raw = svc.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def published_ports(svc: Mapping[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) pairs, short or long syntax."""
    pairs = set()
    for entry in svc.get("ports") or []:
        if isinstance(entry, Mapping):
            pairs.add((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {entry!r} is not published on the host"
        pairs.add((int(parts[-2]), int(parts[-1])))
    return pairs


def volume_mounts(svc: Mapping[str, Any]) -> dict[str, str]:
    """target path -> source, short or long syntax."""
    mounts = {}
    for entry in svc.get("volumes") or []:
        if isinstance(entry, Mapping):
            mounts[entry["target"]] = entry.get("source", "")
        else:
            source, target = str(entry).split(":")[:2]
            mounts[target] = source
    return mounts


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def pyproject(directory: str) -> dict[str, Any]:
    path = ROOT / directory / "pyproject.toml"
    assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
    return tomllib.loads(path.read_text())


# --- Dockerfile and .dockerignore helpers ---------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def exec_form(args: str) -> list[str] | None:
    return json.loads(args) if args.startswith("[") else None


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    destination: str  # absolute, resolved against the WORKDIR in force


def dockerfile_copies(path: Path) -> list[Copy]:
    """COPY/ADD instructions from the build context (multi-stage --from copies excluded)."""
    copies = []
    workdir = "/"
    for instruction in dockerfile_instructions(path):
        if instruction.keyword == "WORKDIR":
            workdir = posixpath.join(workdir, instruction.args)
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = instruction.args.split()
        flags = [w for w in words if w.startswith("--")]
        if any(flag.startswith("--from") for flag in flags):
            continue
        rest = instruction.args
        for flag in flags:
            rest = rest.replace(flag, "", 1)
        parts = exec_form(rest.strip()) or rest.split()
        assert len(parts) >= 2, f"{path}: {instruction.keyword} needs a source and a destination"
        *sources, destination = parts
        absolute = posixpath.join(workdir, destination)
        if destination.endswith("/") and not absolute.endswith("/"):
            absolute += "/"
        copies.append(Copy(sources, absolute))
    return copies


def dockerfile_env(path: Path) -> dict[str, str]:
    env = {}
    for instruction in dockerfile_instructions(path):
        if instruction.keyword == "ENV":
            for pair in instruction.args.split():
                key, _, value = pair.partition("=")
                env[key] = value.strip("\"'")
    return env


def last(path: Path, keyword: str) -> Instruction | None:
    found = [i for i in dockerfile_instructions(path) if i.keyword == keyword]
    return found[-1] if found else None


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < len(pattern):
            out, i = out + re.escape(pattern[i + 1]), i + 2
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves this path out (it or a parent matches; last rule wins)."""
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def build_of(compose: Mapping[str, Any], name: str) -> tuple[Path, Path]:
    """(context directory, Dockerfile) of a built service."""
    build = service(compose, name).get("build")
    assert build, f"service {name!r} is not built from a Dockerfile"
    if isinstance(build, str):
        build = {"context": build}
    context = (ROOT / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


# --- Services, images, commands ---------------------------------------------------------


def test_the_four_services_are_defined(compose):
    assert set(SERVICES) <= set(compose.get("services") or {})


def test_no_obsolete_version_key(compose):
    assert "version" not in compose


def test_postgres_uses_a_pinned_official_image_with_its_data_on_a_named_volume(compose):
    postgres = service(compose, "postgres")
    match = re.fullmatch(
        r"(?:docker\.io/)?(?:library/)?postgres:(\d+)(?:[.\-][\w.\-]*)?", postgres["image"]
    )
    assert match, f"not the official postgres image with a major version: {postgres['image']}"
    major = int(match.group(1))
    # PostgreSQL 18 images moved PGDATA under /var/lib/postgresql/<major>/docker.
    data_dir = "/var/lib/postgresql" if major >= 18 else "/var/lib/postgresql/data"
    mounts = volume_mounts(postgres)
    assert data_dir in mounts, f"no volume on {data_dir}: {mounts}"
    assert mounts[data_dir] in (compose.get("volumes") or {}), "data volume is not a named volume"


def test_postgres_healthcheck_uses_pg_isready_over_tcp(compose):
    check = service(compose, "postgres").get("healthcheck")
    assert check, "postgres has no healthcheck"
    probe = " ".join(check["test"]) if isinstance(check["test"], list) else check["test"]
    assert "pg_isready" in probe
    # Over the Unix socket the temporary init-time server would already look ready.
    assert re.search(r"(?:-h|--host)[ =]?(?:127\.0\.0\.1|localhost)\b", probe), probe
    for key in ("interval", "timeout", "start_period"):
        assert DURATION.fullmatch(str(check.get(key, ""))), f"healthcheck {key}: {check.get(key)}"
    assert int(check["retries"]) >= 1


def test_postgres_credentials_come_from_interpolation(compose):
    env = environment(service(compose, "postgres"))
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        refs = interpolations(env.get(key) or "")
        assert refs and refs[0].name == key, f"{key} is not taken from ${{{key}...}}"


def test_migrate_is_a_one_shot_alembic_upgrade_after_postgres_is_healthy(compose):
    migrate = service(compose, "migrate")
    assert command(migrate) == ["alembic", "upgrade", "head"]
    assert depends_on(migrate).get("postgres") == "service_healthy"
    # PyYAML reads an unquoted `no` as False; Compose wants the string.
    assert migrate.get("restart", "no") == "no"


def test_migrate_runs_the_pipeline_image(compose):
    assert build_of(compose, "migrate") == build_of(compose, "pipeline-service")


def test_pipeline_waits_for_migrations_database_and_source(compose):
    deps = depends_on(service(compose, "pipeline-service"))
    assert deps.get("postgres") == "service_healthy"
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("mock-server") in ("service_healthy", "service_started")


def test_every_dependency_condition_can_be_met(compose):
    for name, svc in compose["services"].items():
        for target, condition in depends_on(svc).items():
            other = service(compose, target)
            if condition == "service_healthy":
                assert other.get("healthcheck"), f"{name} waits for {target}, which has no check"
            if condition == "service_completed_successfully":
                assert other.get("restart", "no") == "no", f"{target} restarts: never completes"


@pytest.mark.parametrize(
    ("name", "port"), [("postgres", 5432), ("mock-server", 5000), ("pipeline-service", 8000)]
)
def test_ports_are_published(compose, name, port):
    assert (port, port) in published_ports(service(compose, name))


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_runs_its_console_script_on_all_interfaces(compose, name):
    directory, script, port = APP_SERVICES[name]
    args = command(service(compose, name))
    assert args[0] == script
    assert option(args, "--host") == "0.0.0.0"
    assert int(option(args, "--port")) == port
    assert script in pyproject(directory).get("project", {}).get("scripts", {}), (
        f"{directory}/pyproject.toml does not declare the {script} console script"
    )


def test_pipeline_image_has_alembic_and_a_driver_that_needs_no_compiler():
    deps = pyproject("pipeline-service")["project"]["dependencies"]
    names = {Requirement(dep).name.lower() for dep in deps}
    assert "alembic" in names, "migrate runs `alembic` from the pipeline image"
    # python:*-slim has neither a C compiler nor libpq headers to build plain psycopg2.
    assert "psycopg2" not in names
    assert "psycopg2-binary" in names or "psycopg" in names


# --- Environment ------------------------------------------------------------------------


@pytest.fixture(params=["defaults", "env-example"], ids=["no .env", ".env from .env.example"])
def project_env(request) -> dict[str, str]:
    """What Compose interpolates from: nothing, or a .env copied from .env.example."""
    return {} if request.param == "defaults" else env_example()[0]


def _env_name(name: str) -> str:
    alias = Settings.model_fields[name].validation_alias
    prefix = Settings.model_config.get("env_prefix", "")
    return (alias if isinstance(alias, str) else prefix + name).upper()


@pytest.mark.parametrize("name", ["migrate", "pipeline-service"])
def test_required_settings_are_provided(compose, name):
    provided = environment(service(compose, name))
    required = [_env_name(f) for f, info in Settings.model_fields.items() if info.is_required()]
    assert "DATABASE_URL" in required
    missing = [var for var in required if provided.get(var) is None]
    assert not missing, f"{name} lacks required settings {missing}"


@pytest.mark.parametrize("name", ["migrate", "pipeline-service"])
def test_pipeline_settings_load_from_the_container_environment(
    compose, project_env, monkeypatch, name
):
    env = resolved_environment(service(compose, name), project_env)
    for field in Settings.model_fields:
        monkeypatch.delenv(_env_name(field), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert urlsplit(settings.database_url).hostname == "postgres"
    # Neither project environment sets a key: no value, not an empty one, reaches the service.
    assert settings.pipeline_api_key is None


@pytest.mark.parametrize("name", ["migrate", "pipeline-service"])
def test_database_url_targets_the_postgres_service_with_its_credentials(compose, project_env, name):
    postgres = resolved_environment(service(compose, "postgres"), project_env)
    url = urlsplit(resolved_environment(service(compose, name), project_env)["DATABASE_URL"])
    assert url.scheme in ("postgresql", "postgresql+psycopg2")
    assert url.hostname == "postgres"
    assert (url.port or 5432) == 5432
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == postgres["POSTGRES_DB"]


def test_mock_server_url_targets_the_mock_service(compose):
    url = urlsplit(
        resolved_environment(service(compose, "pipeline-service"), {})["MOCK_SERVER_URL"]
    )
    assert url.scheme == "http"
    assert url.hostname == "mock-server"
    assert url.port == int(option(command(service(compose, "mock-server")), "--port")) == 5000


def test_no_literal_secrets_in_service_environments(compose):
    for name, svc in compose["services"].items():
        for key, value in environment(svc).items():
            if value is None:
                continue
            refs = interpolations(value)
            if SECRET_NAME.search(key):
                assert _WHOLE_REFERENCE.fullmatch(value), f"{name}.{key} is a literal: {value!r}"
            # A password inside a URL must come from a variable too.
            probe = interpolate(value, {ref.name: f"var-{ref.name}" for ref in refs})
            password = urlsplit(probe).password if "://" in probe else None
            if password is not None:
                assert password in {f"var-{ref.name}" for ref in refs}, (
                    f"{name}.{key} carries a literal password"
                )


def test_every_interpolated_variable_is_documented(compose):
    # Stricter than "has a default or is documented": a default still deserves a line there.
    _, documented = env_example()
    names = {ref.name for text in strings_in(compose) for ref in interpolations(text)}
    assert names, "docker-compose.yml interpolates nothing: credentials would be literals"
    assert not names - documented, f"not in .env.example: {sorted(names - documented)}"


def test_key_only_passthroughs_are_documented(compose):
    _, documented = env_example()
    for name, svc in compose["services"].items():
        for key, value in environment(svc).items():
            if value is None:
                assert key in documented, f"{name} passes {key} through; .env.example lacks it"


# --- Healthchecks of the Python services ---------------------------------------------


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        code = self.status if self.path == "/api/health" else 404
        body = b'{"status": "ok"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _probe(check: Mapping[str, Any], port: int, status: int) -> int:
    """Run a healthcheck's python probe against a local server answering `status`."""
    test = check["test"]
    assert isinstance(test, list) and test[0] == "CMD", "the probe must be an exec-form CMD"
    argv = list(test[1:])
    assert argv[0] in ("python", "python3"), "the slim images have no curl or wget"
    handler = type("Handler", (_Health,), {"status": status})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            code = [a.replace(f":{port}/", f":{server.server_port}/") for a in argv[1:]]
            done = subprocess.run([sys.executable, *code], capture_output=True, timeout=30)
        finally:
            server.shutdown()
            thread.join()
    return done.returncode


@pytest.mark.parametrize("name", APP_SERVICES)
def test_healthcheck_probes_api_health_and_fails_on_an_error_status(compose, name):
    port = APP_SERVICES[name][2]
    check = service(compose, name).get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert f"localhost:{port}/api/health" in " ".join(check["test"])
    for key in ("interval", "timeout"):
        assert DURATION.fullmatch(str(check.get(key, ""))), f"healthcheck {key}: {check.get(key)}"
    assert _probe(check, port, 200) == 0
    assert _probe(check, port, 503) != 0


# --- Dockerfiles ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["migrate", "mock-server", "pipeline-service"])
def test_dockerfile_exists_and_context_is_the_repository_root(compose, name):
    context, dockerfile = build_of(compose, name)
    assert context == ROOT
    assert dockerfile.is_file(), f"{dockerfile} does not exist"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_dockerfile_copy_sources_exist_and_reach_the_build_context(compose, name):
    context, dockerfile = build_of(compose, name)
    rules = dockerignore_rules()
    copies = dockerfile_copies(dockerfile)
    assert copies, f"{dockerfile.name} copies nothing"
    for copy in copies:
        for source in copy.sources:
            matches = list(context.glob(source.rstrip("/"))) if source.strip("/") else [context]
            assert matches, f"COPY source {source} does not exist in the repository"
            for path in matches:
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                files = [f for f in files if "__pycache__" not in f.parts]
                for file in files:
                    relative = file.relative_to(context).as_posix()
                    assert not ignored(relative, rules), f".dockerignore drops {relative}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_dockerfile_installs_its_package_and_runs_the_compose_command(compose, name):
    directory, _, port = APP_SERVICES[name]
    _, dockerfile = build_of(compose, name)
    base = dockerfile_instructions(dockerfile)[0]
    assert base.keyword == "FROM"
    match = re.fullmatch(r"python:(3\.\d+)-slim(?:-\w+)?", base.args.split()[0])
    assert match, f"base image {base.args}"
    requires = pyproject(directory)["project"].get("requires-python", "")
    assert SpecifierSet(requires).contains(match.group(1)), f"{match.group(1)} vs {requires}"

    env = dockerfile_env(dockerfile)
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"

    copied = {
        source.rstrip("/") for copy in dockerfile_copies(dockerfile) for source in copy.sources
    }
    assert f"{directory}/pyproject.toml" in copied
    installs = [
        i.args
        for i in dockerfile_instructions(dockerfile)
        if i.keyword == "RUN" and "pip install" in i.args
    ]
    assert installs and all("--no-cache-dir" in args for args in installs)

    cmd = last(dockerfile, "CMD")
    assert cmd and exec_form(cmd.args) == command(service(compose, name))
    exposed = last(dockerfile, "EXPOSE")
    assert exposed and str(port) in exposed.args.split()


@pytest.mark.parametrize("name", APP_SERVICES)
def test_dockerfile_drops_root(compose, name):
    _, dockerfile = build_of(compose, name)
    instructions = dockerfile_instructions(dockerfile)
    user = last(dockerfile, "USER")
    assert user, "no USER instruction: the service would run as root"
    assert user.args.split(":")[0] not in ("root", "0")
    stage_start = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    assert instructions.index(user) > stage_start, "USER is set in an earlier build stage only"


def test_mock_image_ships_the_data_where_mock_data_dir_points(compose):
    _, dockerfile = build_of(compose, "mock-server")
    data = [c for c in dockerfile_copies(dockerfile) if c.sources == ["mock-server/data/"]]
    assert data, "mock-server/Dockerfile does not copy mock-server/data/"
    target = data[0].destination.rstrip("/")
    assert dockerfile_env(dockerfile).get("MOCK_DATA_DIR") == target
    assert environment(service(compose, "mock-server")).get("MOCK_DATA_DIR") == target
    for name in SOURCE_FILES:
        assert (ROOT / "mock-server" / "data" / name).is_file(), f"mock-server/data/{name}"


def test_pipeline_image_runs_alembic_from_its_workdir(compose):
    _, dockerfile = build_of(compose, "pipeline-service")
    workdir = last(dockerfile, "WORKDIR")
    assert workdir, "no WORKDIR: `alembic upgrade head` would run from /"
    destinations = {}
    for copy in dockerfile_copies(dockerfile):
        for source in copy.sources:
            source = source.rstrip("/")
            if (ROOT / source).is_dir():
                # A directory's contents land in the destination, not the directory itself.
                destinations[source] = copy.destination.rstrip("/")
            elif copy.destination.endswith("/"):
                destinations[source] = copy.destination + posixpath.basename(source)
            else:
                destinations[source] = copy.destination
    assert destinations.get("alembic.ini") == posixpath.join(workdir.args, "alembic.ini")
    assert destinations.get("migrations") == posixpath.join(workdir.args, "migrations")

    ini = configparser.ConfigParser(interpolation=None)
    assert ini.read(ROOT / "alembic.ini"), "alembic.ini missing at the repository root"
    location = ini["alembic"]["script_location"].replace("%(here)s", workdir.args)
    assert posixpath.normpath(posixpath.join(workdir.args, location)) == posixpath.join(
        workdir.args, "migrations"
    )


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_context():
    rules = dockerignore_rules()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".data/pg/PG_VERSION",
        ".env",
        "bench/results/x.json",
    ):
        assert ignored(path, rules), f"{path} would be sent to the Docker daemon"
    for path in ("mock-server/data/customers.json", "migrations/env.py", "alembic.ini"):
        assert not ignored(path, rules), f"{path} is needed by an image"


def test_compose_file_satisfies_the_compose_specification():
    """Only runs where the `compose-spec` package (a strict Compose Specification parser) is."""
    compose_spec = pytest.importorskip(
        "compose_spec", reason="compose-spec (strict Compose Specification parser) not installed"
    )
    document = compose_spec.PyCompose.from_yaml(COMPOSE_FILE.read_text())
    document.validate()
    assert set(SERVICES) <= set(document.service_names())


# --- .env.example -----------------------------------------------------------------------

_MOCK_NAME = re.compile(r"""["'](MOCK_[A-Z0-9_]+)["']""")


class _RecordingEnviron(dict):
    """A stand-in for os.environ that remembers every name asked for."""

    def __init__(self, base: Mapping[str, str]) -> None:
        super().__init__(base)
        self.asked: set[str] = set()

    def get(self, key, default=None):
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.asked.add(key)
        return super().__contains__(key)


@dataclass(frozen=True)
class MockVariables:
    names: set[str]
    complete: bool  # False when names built at run time could not be observed


@pytest.fixture(scope="module")
def mock_variables() -> MockVariables:
    """MOCK_* names the mock server reads: literals in its sources, plus the names its app
    factory looks up at run time (chaos settings are named after their fields)."""
    sources = sorted(MOCK_PACKAGE.glob("*.py")) if MOCK_PACKAGE.is_dir() else []
    if not sources:
        pytest.skip("mock-server/mock_server has no Python sources yet")
    names = {name for path in sources for name in _MOCK_NAME.findall(path.read_text())}
    try:
        from mock_server import create_app
    except ImportError:
        return MockVariables(names, complete=False)
    recording = _RecordingEnviron(
        {k: v for k, v in os.environ.items() if not k.startswith("MOCK_")}
        | {"MOCK_DATA_DIR": str(ROOT / "mock-server" / "data")}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "environ", recording)
        create_app()
    names |= {name for name in recording.asked if name.startswith("MOCK_")}
    return MockVariables(names, complete=True)


def test_env_example_documents_every_pipeline_setting():
    _, documented = env_example()
    fields = {_env_name(name) for name in Settings.model_fields}
    assert not fields - documented, f"missing from .env.example: {sorted(fields - documented)}"


def test_env_example_documents_every_variable_the_mock_server_reads(mock_variables):
    _, documented = env_example()
    missing = mock_variables.names - documented
    assert not missing, f"missing from .env.example: {sorted(missing)}"


def test_env_example_documents_no_mock_variable_the_mock_server_ignores(mock_variables):
    if not mock_variables.complete:
        pytest.skip("mock_server is not importable: names it builds at run time are unseen")
    _, documented = env_example()
    pipeline = {_env_name(name) for name in Settings.model_fields}
    stale = {n for n in documented - pipeline if n.startswith("MOCK_")} - mock_variables.names
    assert not stale, f".env.example documents variables nothing reads: {sorted(stale)}"


_ENV_READ = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""")


def project_sources() -> Iterator[Path]:
    """The project's own Python files (virtualenvs and hidden folders left out)."""
    for directory, subdirectories, files in os.walk(ROOT):
        subdirectories[:] = [
            d for d in subdirectories if not d.startswith(".") and d not in ("build", "dist")
        ]
        yield from (Path(directory, name) for name in files if name.endswith(".py"))


def test_env_example_documents_only_variables_something_reads(compose):
    _, documented = env_example()
    known = {_env_name(name) for name in Settings.model_fields}
    known |= {ref.name for text in strings_in(compose) for ref in interpolations(text)}
    known |= {name for path in project_sources() for name in _ENV_READ.findall(path.read_text())}
    unknown = {n for n in documented - known if not n.startswith("MOCK_")}
    assert not unknown, f".env.example documents variables nothing reads: {sorted(unknown)}"


def test_env_example_local_database_url_matches_the_compose_credentials():
    values = env_example_values()
    url = urlsplit(values["DATABASE_URL"])
    assert url.hostname in ("localhost", "127.0.0.1")
    assert url.username == values["POSTGRES_USER"]
    assert url.password == values["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == values["POSTGRES_DB"]


def test_copying_env_example_enables_no_chaos_and_no_api_key():
    active, _ = env_example()
    enabled = sorted(n for n in active if n.startswith("MOCK_CHAOS_") or n == "PIPELINE_API_KEY")
    assert not enabled, f"opt-in settings active in .env.example: {enabled}"
