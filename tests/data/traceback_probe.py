"""Run a failing task defined in each way users define tasks; print the remote tracebacks.

    python tests/data/traceback_probe.py REDIS_URL HOME CASE...   ->  one JSON line on stdout

Cases: ``file`` (a workflow file, deleted before the run: the worker cannot read it), ``module``
(a function of an importable module), ``inline`` (a Workflow's ``spec.source.inline``, built by
a build Pod's command in a folder that is gone before the run), ``exec`` (source run by
``exec`` with no file behind it), ``cell`` (a notebook cell: ``exec`` of source that IPython has
put into linecache). A separate process, so the suite can run it under another cloudpickle.
"""

from __future__ import annotations

import json
import linecache
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cloudpickle
import redis

import dagkube
from dagkube import description
from dagkube.dag import DagSpec
from dagkube.runtime.launcher import task_failed_from

ROOT = Path(__file__).resolve().parents[2]

FAILING_SOURCE = """import dagkube


def check(rows):
    if len(rows) < 10:
        raise ValueError(f"only {len(rows)} rows arrived")
    return rows


@dagkube.task
def clean(n):
    rows = list(range(n))
    return check(rows)


workflow = dagkube.Workflow(clean(3), name="probe-{case}")
"""


def build(case: str, scratch: Path, redis_url: str) -> DagSpec:
    source = FAILING_SOURCE.replace("{case}", case)
    if case == "file":
        from dagkube.loader import load_workflow_file

        path = scratch / "probe_pipeline.py"
        path.write_text(source)
        dag = load_workflow_file(str(path)).workflow.dag
        path.unlink()
        return dag
    if case == "module":
        sys.path.insert(0, str(ROOT))
        from tests.integration.test_runtime import add, boom

        return dagkube.Workflow(boom(add(1, 2)), name="probe-module").dag
    if case == "inline":  # as a build Pod builds it, and as the operator reads it back
        key = f"dk:probe:build:{scratch.name}"
        request = json.dumps({"inline": source, "name": "probe-inline"})
        env = {**os.environ, "DAGKUBE_REDIS_URL": redis_url, "DAGKUBE_BUILD_REQUEST": request}
        command = [sys.executable, "-m", "dagkube.kubernetes.build", "--key", key, "--ttl", "600"]
        subprocess.run(command, check=True, env=env)
        client = redis.Redis.from_url(redis_url)
        try:
            found = [
                {name.decode(): blob for name, blob in client.hgetall(hash_key).items()}
                for hash_key in (description.blobs_key(key), description.constants_key(key))
            ]
            return description.parse(client.get(key) or b"", *found, where=key)
        finally:
            client.close()
    if case in ("exec", "cell"):
        filename = "<notebook-cell>" if case == "exec" else "<ipython-input-7-0123456789ab>"
        if case == "cell":  # what IPython does with every cell it runs
            lines = source.splitlines(keepends=True)
            linecache.cache[filename] = (len(source), None, lines, filename)
        namespace: dict = {"__name__": "__main__"}
        exec(compile(source, filename, "exec"), namespace)
        return namespace["workflow"].dag
    raise SystemExit(f"unknown case {case!r}")


def main() -> None:
    redis_url, home, *cases = sys.argv[1:]
    report: dict = {"cloudpickle": cloudpickle.__version__, "cases": {}}
    with dagkube.LocalRuntime(redis_url, home=home, max_workers=1, idle_timeout_s=5) as runtime:
        for case in cases:
            scratch = Path(tempfile.mkdtemp(prefix="dagkube-probe-"))
            try:
                dag = build(case, scratch, redis_url)
            finally:
                shutil.rmtree(scratch)
            result = runtime.run(dag, runtime.plan(dag))
            failure = task_failed_from(result.record)
            report["cases"][case] = {
                "status": result.status,
                "traceback": failure.remote_traceback if failure else "",
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
