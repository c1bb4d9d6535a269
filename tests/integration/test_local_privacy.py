"""What a local dagkube opens to others: its metrics endpoint answers this machine only unless
asked, and its home directory is private when dagkube creates it, left as it is otherwise."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from dagkube.runtime.embedded import _free_port
from tests.conftest import ROOT, run_cli, wait_until

DATA = ROOT / "tests" / "data"


def _listening_address(pid: int, port: int) -> str | None:
    """The IP address process ``pid`` listens on at TCP ``port``, None while it does not."""
    for connection in psutil.Process(pid).net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            return str(connection.laddr.ip)
    return None


def _listen_and_interrupt(command: list[str], port: int, env: dict[str, str]) -> tuple[str, str]:
    """Start a ``dagkube`` command, return the address it listens on at ``port`` once it does
    and its stderr after Ctrl-C."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dagkube.cli", *command],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        address = wait_until(
            lambda: process.poll() is not None or _listening_address(process.pid, port),
            60,
            f"`dagkube {command[0]}` to listen on port {port}",
        )
    finally:
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=30)
    assert isinstance(address, str), err
    return address, err


@pytest.mark.parametrize(
    ("extra", "expected"), [([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0")]
)
def test_metrics_serve_listens_on_loopback_unless_told(redis_server, extra, expected) -> None:
    port = _free_port()
    address, err = _listen_and_interrupt(
        ["metrics", "serve", "--port", str(port), "--redis", redis_server.url, *extra], port, {}
    )
    assert address == expected
    assert f"serving Prometheus metrics on http://{expected}:{port}/metrics" in err


@pytest.mark.parametrize(
    ("extra", "expected"), [([], "127.0.0.1"), (["--metrics-host", "0.0.0.0"], "0.0.0.0")]
)
def test_run_metrics_listen_on_loopback_unless_told(tmp_path: Path, extra, expected) -> None:
    port = _free_port()
    env = {"DAGKUBE_HOME": str(tmp_path / "home"), "DAGKUBE_TEST_MARKER": str(tmp_path / "m")}
    address, err = _listen_and_interrupt(
        ["run", str(DATA / "slow_workflow.py"), "--metrics-port", str(port), *extra], port, env
    )
    assert address == expected
    assert "interrupted" in err


def test_a_metrics_host_that_is_not_this_machines_is_bad_input(redis_server) -> None:
    result = run_cli(
        "metrics", "serve", "--port", str(_free_port()), "--redis", redis_server.url,
        "--host", "no-such-host.invalid",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--host 'no-such-host.invalid': cannot listen there" in result.stderr
    assert "127.0.0.1" in result.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run_in_home(tmp_path: Path, home: Path) -> None:
    """``dagkube run`` of a one-task workflow on the embedded Redis under ``home``."""
    source = tmp_path / "one_task.py"
    source.write_text(
        textwrap.dedent(
            """
            import dagkube

            @dagkube.task
            def add(a, b):
                return a + b

            workflow = dagkube.Workflow(add(1, 2), name="home-modes")
            """
        )
    )
    result = run_cli("run", str(source), "--json", env={"DAGKUBE_HOME": str(home)})
    assert result.returncode == 0, result.stderr


def test_a_new_home_is_created_private(tmp_path: Path) -> None:
    home = tmp_path / "not-yet" / "home"
    _run_in_home(tmp_path, home)
    for directory in (home, home / "redis", home / "logs"):
        assert _mode(directory) == 0o700, directory


def test_an_existing_home_keeps_its_mode(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    _run_in_home(tmp_path, home)
    assert _mode(home) == 0o755
    # What dagkube created in it is private all the same.
    for directory in (home / "redis", home / "logs"):
        assert _mode(directory) == 0o700, directory
