"""What the embedded server's persistence costs a data-heavy run: the append-only file fsynced
every second (what dagkube uses, losing at most ~1 s of writes) against the snapshots once a
minute it replaced (losing up to a minute), and against the append-only file with Redis's
default rewrite threshold (64 MB, so rewrites during the runs).

examples/large_fanin.py (four 16 MB arrays into one fan-in; three of them pass through
Redis) runs on one private redis-server per arm, the arms interleaved, after a warm-up run
each. Reported: median and spread of the run time the caller sees (``wf.run``), the bytes
the append-only file took, and the rewrites (forks) the server made.

Usage: python benchmarks/persistence.py [--runs 8] [--markdown F]
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import benchlib
import redis

import dagkube
from dagkube.runtime.embedded import PERSISTENCE, RDB_FILE, find_redis_server, server_conf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import large_fanin  # noqa: E402

WARMUP_RUNS = 1
# name -> (appendonly, persistence lines)
ARMS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "snapshot every minute (before)": (False, ("save 60 1", f"dbfilename {RDB_FILE}")),
    "AOF everysec, rewrite past 256 MB (now)": (True, PERSISTENCE),
    "AOF everysec, rewrite past 64 MB": (
        True,
        tuple(
            "auto-aof-rewrite-min-size 64mb" if line.startswith("auto-aof-rewrite-min") else line
            for line in PERSISTENCE
        ),
    ),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(data_dir: Path, appendonly: bool, persistence: tuple[str, ...]) -> Iterator[str]:
    """A redis-server with these persistence settings; yields its URL."""
    port, password = _free_port(), secrets.token_hex(8)
    conf = data_dir / "redis.conf"
    conf.write_text(
        server_conf(port, password, data_dir, appendonly=appendonly, persistence=persistence)
    )
    process = subprocess.Popen([find_redis_server(), str(conf)], stdout=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {data_dir / 'redis.log'}")
            time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure(runs: int) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        runtimes = {}
        for index, (arm, (appendonly, persistence)) in enumerate(ARMS.items()):
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            data_dir = home / f"redis-{index}"
            data_dir.mkdir()
            url = stack.enter_context(server(data_dir, appendonly, persistence))
            runtime = dagkube.LocalRuntime(redis_url=url, home=home, max_workers=5)
            runtimes[arm] = (stack.enter_context(runtime), data_dir)
            rows[arm] = {"times_s": []}
        for index in range(WARMUP_RUNS + runs):
            for arm, (rt, _) in runtimes.items():
                wf = large_fanin.build()
                began = time.perf_counter()
                outputs = wf.run("uniform", "avg", runtime=rt)
                took = time.perf_counter() - began
                large_fanin.verify(outputs)
                if index >= WARMUP_RUNS:
                    rows[arm]["times_s"].append(took)
        for arm, (rt, data_dir) in runtimes.items():
            client = redis.Redis.from_url(rt.url)
            info = client.info()
            client.close()
            written = info.get("aof_current_size", 0) if info.get("aof_enabled") else 0
            rows[arm]["aof_mb"] = written / 2**20
            rows[arm]["forks"] = info.get("total_forks", 0)
            rows[arm]["rewrite_s"] = info.get("aof_last_rewrite_time_sec", -1)
            rows[arm]["disk_mb"] = sum(p.stat().st_size for p in data_dir.iterdir()) / 2**20
    for row in rows.values():
        times = sorted(row["times_s"])
        row["median_s"] = statistics.median(times)
        row["mean_s"] = statistics.fmean(times)
        row["min_s"], row["max_s"] = times[0], times[-1]
        row["stdev_s"] = statistics.stdev(times) if len(times) > 1 else 0.0
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="measured runs per arm")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    rows = measure(args.runs)
    lines = [
        "## Persistence of the embedded server",
        "",
        f"examples/large_fanin.py (4 x 16 MB arrays, 3 of them through Redis), uniform, up to "
        f"5 workers, one redis-server per arm; {WARMUP_RUNS} warm-up run per arm then "
        f"{args.runs} measured runs per arm, interleaved. Run time as `wf.run` sees it.",
        "",
        "| persistence | median run | mean | min - max | stdev | forks (rewrites, snapshots) "
        "| data dir after |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in rows.items():
        lines.append(
            f"| {arm} | {row['median_s']:.3f}s | {row['mean_s']:.3f}s | "
            f"{row['min_s']:.3f} - {row['max_s']:.3f}s | "
            f"{row['stdev_s']:.3f}s | {row['forks']} | {row['disk_mb']:.0f} MB |"
        )
    lines += ["", *benchlib.provenance(__file__, argv)]
    print("\n".join(lines))
    if args.markdown:
        benchlib.write_section(args.markdown, "persistence", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
