"""Shared fixtures: a real redis-server per session, local runtimes, and two session rules:

* every process the suite starts carries DAGKUBE_TEST_SESSION in its environment; at the end,
  any redis-server or worker process still alive with that marker fails the session;
* with CI=true a skipped test fails the session (only the kind e2e tier may skip there).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest
import redis

from dagkube.runtime.embedded import _free_port, find_redis_server

ROOT = Path(__file__).resolve().parent.parent
SESSION_MARK = os.environ.setdefault("DAGKUBE_TEST_SESSION", uuid.uuid4().hex)
# Keep the suite off the user's ~/.dagkube even where a test forgets to pass a home.
os.environ.setdefault(
    "DAGKUBE_HOME",
    str(Path(os.environ.get("TMPDIR", "/tmp")) / f"dagkube-test-home-{SESSION_MARK[:8]}"),
)
os.environ.pop("DAGKUBE_REDIS_URL", None)

_skipped: list[str] = []


def wait_until(
    condition: Callable[[], object], timeout_s: float = 20.0, message: str = "condition"
) -> object:
    """Poll a condition with a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(0.02)


class RedisServer:
    """A real redis-server on a free loopback port, with a password; ``args``: more
    configuration after the defaults (e.g. the chart's), ``password``: the default user's."""

    def __init__(
        self, directory: Path, *, password: str | None = None, args: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.password = password or secrets.token_hex(8)
        self.args = list(args)
        self.port = _free_port()
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        """Start (again, after :meth:`stop`) on the same port with the same password."""
        self.process = subprocess.Popen(
            [
                find_redis_server(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--requirepass",
                self.password,
                "--save",
                "",
                "--appendonly",
                "no",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 15, "redis-server to answer")

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM, and SIGKILL past ``timeout_s``: a test's server process, reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def runtime(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory):
    """A LocalRuntime shared by a module's tests (warm workers, as users would keep it)."""
    from dagkube import LocalRuntime

    with LocalRuntime(
        redis_server.url, home=tmp_path_factory.mktemp("home"), max_workers=2, idle_timeout_s=20
    ) as rt:
        yield rt


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


_CALL_FAILED = pytest.StashKey[bool]()
LOG_TAIL_LINES = 40


def _print_worker_logs(rt) -> None:
    """The tail of each worker's log, alive workers first with their stacks (a worker dumps
    its threads' on SIGUSR1, its asyncio tasks' on SIGUSR2): a failed runtime test's only
    trace of what its workers did (printed in the test's teardown output)."""
    alive = rt.worker_pids()
    for pid in alive.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)  # threads
            os.kill(pid, signal.SIGUSR2)  # asyncio tasks
    if alive:
        time.sleep(0.5)  # for the dumps to be written
    logs = sorted((rt.home / "logs").glob("*.log"), key=lambda p: (p.stem not in alive, p.name))
    print(f"workers still alive: {sorted(alive) or 'none'}")
    for path in logs:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        state = "alive" if path.stem in alive else "exited"
        print(f"---- {path.name} ({state}, last {len(lines)} lines)")
        print("\n".join(lines))


@pytest.fixture
def make_runtime(request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path):
    """Build a dedicated LocalRuntime for a test (closed at the test's end; when the test
    failed, the workers' logs are printed first)."""
    from dagkube import LocalRuntime

    opened: list[LocalRuntime] = []

    def make(**options) -> LocalRuntime:
        options.setdefault("home", tmp_path / "home")
        rt = LocalRuntime(redis_server.url, **options)
        rt.start()
        opened.append(rt)
        return rt

    yield make
    for rt in opened:
        if request.node.stash.get(_CALL_FAILED, False):
            _print_worker_logs(rt)
        rt.close()


def run_cli(*args: str, env: dict | None = None, timeout: float = 120, cwd: Path | None = None):
    """Run the ``dagkube`` CLI in a subprocess (the installed console script's module)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dagkube.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


def marked_processes() -> list[psutil.Process]:
    """redis-server and worker processes started by this test session, still alive."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "redis-server" not in cmdline and "dagkube.worker" not in cmdline:
                continue
            if proc.environ().get("DAGKUBE_TEST_SESSION") == SESSION_MARK:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "kind_e2e" not in report.keywords:
        _skipped.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    write = reporter.write_line if reporter else print
    leftovers = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leftovers = marked_processes()
        if not leftovers:
            break
        time.sleep(0.1)
    if leftovers:
        write("LEFTOVER PROCESSES after the test session (each is a defect):")
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                write(f"  pid {proc.pid}: {' '.join(proc.cmdline())}")
                proc.kill()
        session.exitstatus = 1
    else:
        write("process check: no redis-server or worker process left running")
    if os.environ.get("CI") == "true" and _skipped:
        write("CI=true: these tests were skipped, which CI does not allow outside kind e2e:")
        for line in _skipped:
            write(f"  {line}")
        session.exitstatus = 1
