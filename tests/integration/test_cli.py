"""The ``dagkube`` command line, run as users run it (subprocesses, real Redis and workers)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis

from tests import history_records
from tests.conftest import ROOT, run_cli, wait_until

pytestmark = pytest.mark.integration

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DATA = Path(__file__).resolve().parent.parent / "data"


def test_there_are_five_examples():
    assert {p.stem for p in EXAMPLES} >= {
        "tree_reduction",
        "matmul",
        "text_analysis",
        "image_pipeline",
        "fanout_sleep",
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_runs_and_verifies_its_result(example, redis_server):
    result = run_cli("run", str(example), env={"DAGKUBE_REDIS_URL": redis_server.url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verified" in result.stdout
    assert "succeeded" in result.stdout


def test_json_summary(redis_server):
    result = run_cli(
        "run",
        str(ROOT / "examples" / "tree_reduction.py"),
        "--json",
        env={"DAGKUBE_REDIS_URL": redis_server.url},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "succeeded"
    assert summary["tasks"] == summary["tasks_done"] == 63
    assert summary["verified"] is True
    assert summary["workers_cold"] >= 1
    assert summary["gb_s"] > 0 and summary["makespan_s"] > 0


def test_failing_task_exits_non_zero_with_remote_traceback(redis_server):
    result = run_cli(
        "run", str(DATA / "failing_workflow.py"), env={"DAGKUBE_REDIS_URL": redis_server.url}
    )
    assert result.returncode == 1
    assert "task parse#0 (function parse) raised KeyError" in " ".join(result.stderr.split())
    assert "Remote traceback (from the worker):" in result.stderr
    assert "failing_workflow.py" in result.stderr  # the frame of the user's function
    assert "raise KeyError(f\"column 'price' missing" in result.stderr
    assert "dagkube/cli/" not in result.stderr  # no traceback of the CLI itself


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--classes", "512MB"], "Resource class '512MB' is not a memory size"),
        (["--classes", "-1Gi"], "Resource class '-1Gi' is not a memory size"),
        (["--planner", "fastest"], "Planner 'fastest' is unknown: choose one of wukong, uniform"),
        (["--sla", "p100"], "SLA 'p100' is not valid: use 'avg', or a percentile"),
        (["--frobnicate"], "No such option"),
        (["--classes", "9" * 400], "is too large: the largest class is 1Ti"),
        (["--idle-timeout", "nan"], "Idle timeout nan is not valid: use a number of seconds"),
        (["--idle-timeout", "inf"], "Idle timeout inf is not valid: use a number of seconds"),
    ],
)
def test_bad_options_list_what_is_accepted(args, expected):
    result = run_cli("run", str(ROOT / "examples" / "tree_reduction.py"), *args)
    assert result.returncode == 2
    assert expected in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr


def test_bad_workflow_files(tmp_path):
    missing = run_cli("run", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    result = run_cli("run", str(empty))
    assert result.returncode == 2
    assert "defines neither a module-level 'workflow' nor a 'build()' function" in " ".join(
        result.stderr.split()
    )
    broken = tmp_path / "broken.py"
    broken.write_text("import dagkube\nraise RuntimeError('oops')\n")
    result = run_cli("run", str(broken))
    assert result.returncode == 2 and "RuntimeError: oops" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_workflow_file_that_raises_in_build_is_bad_input_with_its_own_frames(tmp_path):
    (tmp_path / "sizes.py").write_text("def size_of(config):\n    return config['size']\n")
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(
        textwrap.dedent(
            """\
            import dagkube
            from sizes import size_of


            @dagkube.task
            def inc(x):
                return x + 1


            def build():
                return dagkube.Workflow([inc(i) for i in range(size_of({"sizes": 3}))])
            """
        )
    )
    # Every command that loads a workflow file stops at it, before any server or cluster.
    for command in ("run", "plan", "experiment", "manifest", "submit"):
        result = run_cli(command, str(pipeline))
        assert result.returncode == 2, (command, result.stderr)
        assert f"Workflow file '{pipeline}': build() raised KeyError: 'size'" in result.stderr
        # The user's frames, from build() down to the line that raised; none of dagkube's.
        frames = result.stderr.split("In your code (most recent call last):\n")[1]
        assert re.findall(r'File "(.*)", line (\d+), in (\S+)', frames) == [
            (str(pipeline), "11", "build"),
            (str(tmp_path / "sizes.py"), "2", "size_of"),
        ]
        assert "return config['size']" in frames
        assert "Traceback" not in result.stderr


def test_a_workflow_file_that_exits_is_bad_input(tmp_path):
    in_build = tmp_path / "exits_in_build.py"
    in_build.write_text("import sys\n\n\ndef build():\n    sys.exit(3)\n")
    result = run_cli("run", str(in_build))
    assert result.returncode == 2, result.stderr
    assert (
        f"Workflow file '{in_build}': build() called sys.exit(3): a workflow file must define "
        "its workflow, not exit; raise an exception to report a problem"
    ) in " ".join(result.stderr.split())
    assert f'File "{in_build}", line 5, in build' in result.stderr
    on_import = tmp_path / "exits_on_import.py"
    on_import.write_text("import sys\n\nsys.exit('no [/config] found')\n")
    result = run_cli("plan", str(on_import))
    assert result.returncode == 2, result.stderr
    # The message is the user's own text, brackets included (not read as rich markup).
    assert (
        f"Workflow file '{on_import}': importing it called sys.exit('no [/config] found')"
    ) in result.stderr
    assert f'File "{on_import}", line 3, in <module>' in result.stderr


def test_unreachable_redis_and_wrong_password_give_one_clear_line(redis_server):
    example = str(ROOT / "examples" / "tree_reduction.py")
    down = run_cli("run", example, "--redis", "redis://127.0.0.1:1/0")
    assert down.returncode == 3
    assert "Cannot reach Redis at redis://127.0.0.1:1/0" in down.stderr
    assert "Traceback" not in down.stderr
    wrong = redis_server.url.replace(redis_server.password, "not-the-password")
    refused = run_cli("run", example, "--redis", wrong)
    assert refused.returncode == 3
    assert "refused the credentials" in refused.stderr or "password" in refused.stderr
    assert "not-the-password" not in refused.stderr  # never echo secrets
    assert len(refused.stderr.strip().splitlines()) <= 2


def test_history_lists_runs(redis_server):
    env = {"DAGKUBE_REDIS_URL": redis_server.url}
    run_cli("run", str(ROOT / "examples" / "tree_reduction.py"), env=env)
    table = run_cli("history", "--workflow", "tree-reduction", env=env)
    assert table.returncode == 0
    assert "tree-reduction" in table.stdout and "succeeded" in table.stdout
    assert re.search(r"│ +\d+ MiB +│", table.stdout), "the run's peak memory was measured"
    as_json = json.loads(run_cli("history", "--json", "--limit", "3", env=env).stdout)
    assert 1 <= len(as_json) <= 3
    assert {"run_id", "status", "makespan_s", "gb_s"} <= set(as_json[0])
    none = run_cli("history", "--workflow", "never-ran", env=env)
    assert "No runs of workflow 'never-ran'" in none.stdout


def test_history_shows_peak_memory_and_oom_kills(redis_server):
    """Known records: the highest task peak of each run in MiB, its OOM kills, "-" for a run
    without measurements; --json carries the peak in bytes."""
    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        history_records.store(client, history_records.plain_run())
        history_records.store(client, history_records.oom_run())
        table = run_cli("history", "--redis", url)
        as_json = json.loads(run_cli("history", "--redis", url, "--json").stdout)
    finally:
        client.flushdb()
        client.close()
    assert table.returncode == 0, table.stderr
    rows = [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in table.stdout.splitlines()
        if line.startswith("│")
    ]

    def submitted(offset_s: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(history_records.T0 + offset_s))

    assert rows == [
        [
            "oom-run",
            "mem-demo",
            "wukong",
            "avg",
            "succeeded",
            "3/3",
            "4.000s",
            "2/0",
            "3.250",
            "700 MiB, 1 OOM kill(s)",
            submitted(0),
        ],
        [
            "plain-run",
            "mem-demo",
            "uniform",
            "p90",
            "succeeded",
            "1/1",
            "1.500s",
            "1/0",
            "0.500",
            "-",
            submitted(-60),
        ],
    ]
    assert [
        (r["run_id"], r["peak_memory_bytes"], r["oom_kills"], r["escalations"], r["enforced"])
        for r in as_json
    ] == [("oom-run", 700 * 1024 * 1024, 1, 1, True), ("plain-run", None, 0, 0, False)]


def test_help_explains_the_file_convention():
    result = run_cli("run", "--help")
    assert result.returncode == 0
    assert "def build()" in result.stdout and "verify(result)" in result.stdout
    assert "DAGKUBE_REDIS_URL" in result.stdout


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ctrl_c_cancels_and_leaves_no_server_or_worker(tmp_path):
    home = tmp_path / "home"
    marker = tmp_path / "started"
    env = dict(os.environ, DAGKUBE_HOME=str(home), DAGKUBE_TEST_MARKER=str(marker))
    env.pop("DAGKUBE_REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagkube.cli", "run", str(DATA / "slow_workflow.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    wait_until(marker.exists, 60, "the slow task to start")
    worker_pid = int(marker.read_text())
    server_pid = json.loads((home / "server.json").read_text())["pid"]
    assert not _gone(server_pid)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    wait_until(lambda: _gone(worker_pid), 10, "the worker to exit")
    wait_until(lambda: _gone(server_pid), 10, "the embedded server to stop")
    assert not (home / "server.json").exists()


def test_plan_prints_workers_and_totals_without_running(redis_server):
    env = {"DAGKUBE_REDIS_URL": redis_server.url}
    example = str(ROOT / "examples" / "fanout_sleep.py")
    table = run_cli("plan", example, "--planner", "non-uniform", "--sla", "p95", env=env)
    assert table.returncode == 0, table.stderr
    assert "Plan of 'fanout-sleep': non-uniform, SLA p95" in table.stdout
    assert "predicted makespan" in table.stdout and "critical path" in table.stdout
    plan = json.loads(run_cli("plan", example, "--planner", "uniform", "--json", env=env).stdout)
    assert plan["planner"] == "uniform" and len(plan["tasks"]) == 10
    assert plan["workers"] and plan["predicted_makespan_s"] > 0
    svg = ROOT / "build" / "plan-test.svg"
    svg.parent.mkdir(exist_ok=True)
    drawn = run_cli("plan", example, "--planner", "non-uniform", "-o", str(svg), env=env)
    assert drawn.returncode == 0, drawn.stderr
    assert "<svg" in svg.read_text() and "work#0" in svg.read_text()
    wrong = run_cli("plan", example, "-o", str(svg.with_suffix(".gif")), env=env)
    assert wrong.returncode == 2 and ".svg, .png, .pdf or .dot" in wrong.stderr
    bad = run_cli("plan", example, "--sla", "p100", env=env)
    assert bad.returncode == 2 and "SLA 'p100' is not valid" in bad.stderr


def test_plan_with_an_objective_shows_the_candidates_it_chose_from(redis_server):
    import yaml

    from tests.k8s.test_chart import crd_validator, errors_of

    env = {"DAGKUBE_REDIS_URL": redis_server.url}
    example = str(ROOT / "examples" / "large_fanin.py")
    table = run_cli("plan", example, "--objective", "cost", env=env)
    assert table.returncode == 0, table.stderr
    assert "Plan of 'large-fanin': auto, SLA avg" in table.stdout
    assert "Candidates (objective cost)" in table.stdout
    rows = [line for line in table.stdout.splitlines() if line.startswith("│")]
    assert any(row.split("│")[1].strip() == "wukong" for row in rows)
    assert any(row.split("│")[1].strip() == "uniform" for row in rows)
    assert sum("chosen" in row.split("│")[-2] for row in rows if "GB-s" not in row) >= 1
    plan = json.loads(run_cli("plan", example, "--objective", "cost", "--json", env=env).stdout)
    assert plan["objective"] == "cost" and plan["max_gb_s"] is None
    [chosen] = [a for a in plan["alternatives"] if a["chosen"]]
    # the cheapest, but for optimizations auto tried unasked and found within its 3% band
    within = [a for a in plan["alternatives"] if "auto asks" in (a["rejected"] or "")]
    others = [a for a in plan["alternatives"] if a not in within]
    assert chosen["predicted_gb_s"] <= 1.005 * min(a["predicted_gb_s"] for a in others)
    assert all(chosen["predicted_gb_s"] <= 1.005 * 1.03 * a["predicted_gb_s"] for a in within)
    assert plan["predicted_gb_s"] == pytest.approx(chosen["predicted_gb_s"], abs=1e-6)
    assert all(a["rejected"] for a in plan["alternatives"] if not a["chosen"])
    tight = json.loads(run_cli("plan", example, "--max-gb-s", "0.001", "--json", env=env).stdout)
    assert tight["max_gb_s"] == 0.001
    assert any(n.startswith("no candidate fits the GB-s budget 0.001") for n in tight["notes"])
    bad = run_cli("plan", example, "--objective", "fastest", env=env)
    assert bad.returncode == 2
    assert "Objective 'fastest' is unknown: choose one of makespan, cost, balanced" in bad.stderr
    negative = run_cli("plan", example, "--max-gb-s", "-3", env=env)
    assert negative.returncode == 2 and "GB-s budget -3.0 is not valid" in negative.stderr
    ran = run_cli("run", example, "--objective", "cost", "--max-gb-s", "100", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)
    assert summary["status"] == "succeeded" and summary["planner"] == "auto"
    written = run_cli("manifest", example, "--objective", "balanced", "--max-gb-s", "20")
    assert written.returncode == 0, written.stderr
    body = yaml.safe_load(written.stdout)
    assert errors_of(crd_validator(), body) == []  # the CRD's own schema accepts them
    assert body["spec"]["planner"] == {
        "name": "auto",
        "sla": "avg",
        "objective": "balanced",
        "maxGbS": 20.0,
    }


def test_experiment_compares_planners(redis_server):
    env = {"DAGKUBE_REDIS_URL": redis_server.url}
    example = str(ROOT / "examples" / "tree_reduction.py")
    result = run_cli(
        "experiment",
        example,
        "--planners",
        "wukong,uniform",
        "--slas",
        "avg,p90",
        "--repeat",
        "2",
        "--json",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["samples"]) == 8
    cells = {(s["planner"], s["sla"]) for s in data["summaries"]}
    assert cells == {("wukong", "avg"), ("wukong", "p90"), ("uniform", "avg"), ("uniform", "p90")}
    for summary in data["summaries"]:
        assert summary["runs"] == 2 and summary["failed"] == 0
        assert summary["median_makespan_s"] > 0 and summary["median_gb_s"] > 0
    table = run_cli(
        "experiment",
        example,
        "--planners",
        "wukong",
        "--slas",
        "avg",
        "--repeat",
        "1",
        env=env,
    )
    assert table.returncode == 0 and "within prediction" in table.stdout
    # Without --planners: every planner, auto (the default planner) among them.
    default = run_cli("experiment", example, "--slas", "avg", "--repeat", "1", "--json", env=env)
    assert default.returncode == 0, default.stderr
    planners = {s["planner"] for s in json.loads(default.stdout)["summaries"]}
    assert planners == {"wukong", "uniform", "non-uniform", "auto"}
    cold = run_cli(
        "experiment",
        example,
        "--planners",
        "wukong",
        "--slas",
        "avg",
        "--repeat",
        "2",
        "--cold",
        "--json",
        env=env,
    )
    assert all(s["workers_cold"] >= 1 for s in json.loads(cold.stdout)["samples"])
    opt = run_cli(
        "experiment", example, "--planners", "uniform-opt", "--slas", "avg", "--json", env=env
    )
    assert opt.returncode == 0, opt.stderr
    assert all(s["planner"] == "uniform-opt" for s in json.loads(opt.stdout)["samples"])
    assert "exited (code" not in opt.stderr  # no worker crashed
    bad = run_cli("experiment", example, "--planners", "uniform-fast", env=env)
    assert bad.returncode == 2 and "'uniform-fast' is unknown" in bad.stderr


def test_experiment_builds_each_run_afresh_and_verifies_its_outputs(redis_server, tmp_path):
    """build() is called once per run (here each build numbers its input), verify() sees
    every run's outputs, and a rejected output fails the experiment with the run named."""
    (tmp_path / "numbered.py").write_text(
        textwrap.dedent(
            """
            import itertools
            import dagkube

            builds = itertools.count()

            @dagkube.task
            def double(x):
                return 2 * x

            def build():
                return dagkube.Workflow(double(next(builds)), name="numbered")

            def verify(result):
                assert result != 4, "the third build's output is rejected"
            """
        )
    )
    env = {"DAGKUBE_REDIS_URL": redis_server.url}
    args = ("experiment", str(tmp_path / "numbered.py"), "--planners", "wukong", "--slas", "avg")
    good = run_cli(*args, "--repeat", "2", "--json", env=env)
    assert good.returncode == 0, good.stderr
    assert all(s["verify_error"] == "" for s in json.loads(good.stdout)["samples"])
    bad = run_cli(*args, "--repeat", "3", env=env)
    assert bad.returncode == 1, bad.stderr
    message = " ".join(bad.stderr.split())
    assert "verify() rejected the outputs of 1 of 3 runs" in message
    assert "AssertionError: the third build's output is rejected" in message


def test_manifest_prints_a_workflow_the_crd_accepts() -> None:
    import yaml

    from tests.k8s.test_chart import crd_validator, errors_of

    result = run_cli(
        "manifest",
        "examples/tree_reduction.py",
        "-n",
        "jobs",
        "--planner",
        "uniform-opt",
        "--sla",
        "p95",
        "--classes",
        "512Mi,2Gi",
        "--ttl",
        "600",
    )
    assert result.returncode == 0, result.stderr
    body = yaml.safe_load(result.stdout)
    assert errors_of(crd_validator(), body) == []  # the CRD's own schema
    assert set(body["metadata"]) == {"name", "namespace"}  # kubectl apply refuses generateName
    assert body["metadata"]["namespace"] == "jobs"
    assert re.fullmatch(r"tree-reduction-[a-z0-9]{5}", body["metadata"]["name"])
    spec = body["spec"]
    assert spec["source"]["inline"] == (ROOT / "examples/tree_reduction.py").read_text()
    assert spec["planner"] == {
        "name": "uniform",
        "sla": "p95",
        "optimizations": ["preload", "taskdup", "prewarm"],
    }
    assert spec["resources"] == {"classes": ["512Mi", "2Gi"]}
    assert spec["ttlSecondsAfterFinished"] == 600


def test_manifest_rejects_a_file_without_a_workflow(tmp_path: Path) -> None:
    source = tmp_path / "nothing.py"
    source.write_text("x = 1\n")
    result = run_cli("manifest", str(source))
    assert result.returncode == 2
    assert "defines neither a module-level 'workflow' nor a 'build()' function" in result.stderr
    assert result.stdout == ""
