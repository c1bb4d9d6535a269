"""The operator's pure parts: spec parsing and defaults, status builders, settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dagkube.store.records import RunRecord
from dagkube_operator import spec as operator_spec
from dagkube_operator import status as st
from dagkube_operator.config import ConfigError, OperatorConfig, with_password
from dagkube_operator.runs import Deadline, PoolSettings, pool_for, run_deadline, run_id_for
from dagkube_operator.spec import SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]


def test_example_manifests_parse_with_defaults():
    module = yaml.safe_load((ROOT / "examples/manifests/workflow-module.yaml").read_text())
    spec = parse_spec(module["spec"])
    assert spec.source.kind == "module"
    assert spec.source.module == "examples.tree_reduction:build"
    assert (spec.planner, spec.sla, spec.optimizations) == ("non-uniform", "p95", ["prewarm"])
    assert spec.classes_mib == [512, 1024, 2048]
    inline = yaml.safe_load((ROOT / "examples/manifests/workflow-inline.yaml").read_text())
    spec = parse_spec(inline["spec"])
    assert spec.source.kind == "inline" and "dagkube" in (spec.source.inline or "")
    bare = parse_spec({"source": {"ref": {"dag": "0123456789abcdef"}}})
    assert (bare.planner, bare.sla, bare.optimizations) == ("auto", "avg", [])
    assert (bare.objective, bare.max_gb_s) == ("makespan", None)
    assert bare.classes_mib == [512, 1024, 2048] and bare.memory_per_cpu_mib == 1792
    assert bare.max_workers is None and bare.timeout_s is None


@pytest.mark.parametrize(
    ("spec", "reason", "words"),
    [
        ({"source": {}}, "InvalidSpec", "exactly one of module, inline or ref; got none"),
        (
            {"source": {"inline": "x", "module": {"name": "a:b"}}},
            "InvalidSpec",
            "got module, inline",
        ),
        (
            {"source": {"module": {"name": "nofunction"}}},
            "InvalidSpec",
            "'package.module:function'",
        ),
        (
            {"source": {"inline": "x"}, "planner": {"sla": "p100"}},
            "InvalidSLA",
            "'p100' is not valid",
        ),
        ({"source": {"inline": "x"}, "planner": {"name": "fast"}}, "InvalidSpec", "'fast'"),
        (
            {"source": {"inline": "x"}, "planner": {"objective": "cheapest"}},
            "InvalidSpec",
            "spec.planner.objective: Objective 'cheapest' is unknown: choose one of makespan, "
            "cost, balanced",
        ),
        (
            {"source": {"inline": "x"}, "planner": {"maxGbS": -2}},
            "InvalidSpec",
            "spec.planner.maxGbS: GB-s budget -2 is not valid: use a positive number",
        ),
        (
            {"source": {"inline": "x"}, "planner": {"maxGbS": "10"}},
            "InvalidSpec",
            "spec.planner.maxGbS='10' must be a positive number of GB-s",
        ),
        (
            {"source": {"inline": "x"}, "planner": {"optimizations": ["warp"]}},
            "InvalidSpec",
            "warp",
        ),
        (
            {"source": {"inline": "x"}, "resources": {"classes": ["64Gi"]}},
            "ClassNotAllowed",
            "65536Mi is not allowed",
        ),
        (
            {"source": {"inline": "x"}, "resources": {"classes": ["lots"]}},
            "ClassNotAllowed",
            "'lots'",
        ),
        ({"source": {"inline": "x"}, "retries": 11}, "InvalidSpec", "spec.retries=11"),
        ({"source": {"inline": "x"}, "timeoutSeconds": "1h"}, "InvalidSpec", "integer"),
        # The CRD's hard limits, for objects that reached the operator without its schema.
        (
            {"source": {"inline": "#" * (256 * 1024 + 1)}},
            "InvalidSpec",
            "262145 characters long: at most 262144",
        ),
        (
            {"source": {"inline": "x"}, "resources": {"classes": ["1Gi"] * 17}},
            "InvalidSpec",
            "lists 17 classes: at most 16",
        ),
        (
            {"source": {"inline": "x"}, "resources": {"maxWorkers": 10_001}},
            "InvalidSpec",
            "spec.resources.maxWorkers=10001 is out of range",
        ),
        (
            {"source": {"inline": "x"}, "timeoutSeconds": 604_801},
            "InvalidSpec",
            "spec.timeoutSeconds=604801 is out of range: it must be >= 1 and <= 604800",
        ),
        (
            {"source": {"inline": "x"}, "ttlSecondsAfterFinished": 2**64},
            "InvalidSpec",
            "<= 31536000",
        ),
    ],
)
def test_bad_specs_name_the_field_and_the_value(spec, reason, words):
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert caught.value.reason == reason
    assert words in str(caught.value)


def test_values_at_the_limits_parse():
    spec = parse_spec(
        {
            "source": {"inline": "#" * (256 * 1024 - 1) + "\n"},
            "resources": {"classes": [f"{512 + i}Mi" for i in range(16)], "maxWorkers": 10_000},
            "timeoutSeconds": 7 * 24 * 3600,
            "ttlSecondsAfterFinished": 365 * 24 * 3600,
        }
    )
    assert (len(spec.classes_mib), spec.max_workers, spec.timeout_s) == (16, 10_000, 604_800)


def test_the_parser_limits_are_the_crd_limits():
    [version] = yaml.safe_load((ROOT / "crds/workflow.yaml").read_text())["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    source, resources = schema["source"]["properties"], schema["resources"]["properties"]
    assert source["inline"]["maxLength"] == operator_spec.MAX_INLINE_SOURCE_CHARS
    assert resources["classes"]["maxItems"] == operator_spec.MAX_CLASSES
    assert resources["maxWorkers"]["maximum"] == operator_spec.MAX_WORKERS
    assert schema["timeoutSeconds"]["maximum"] == operator_spec.MAX_TIMEOUT_S
    assert schema["ttlSecondsAfterFinished"]["maximum"] == operator_spec.MAX_TTL_AFTER_FINISHED_S


def test_the_crd_lists_the_planners_and_objectives_the_parser_accepts():
    from dagkube.planning import DEFAULT_PLANNER, OBJECTIVES, PLANNERS

    [version] = yaml.safe_load((ROOT / "crds/workflow.yaml").read_text())["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    planner = schema["planner"]["properties"]
    assert set(planner["name"]["enum"]) == set(PLANNERS)
    assert planner["name"]["default"] == DEFAULT_PLANNER == "auto"
    assert planner["objective"]["enum"] == list(OBJECTIVES)
    assert planner["objective"]["default"] == "makespan"
    assert planner["maxGbS"]["type"] == "number"
    parsed = parse_spec(
        {"source": {"inline": "x"}, "planner": {"objective": "Cost", "maxGbS": 12.5}}
    )
    assert (parsed.planner, parsed.objective, parsed.max_gb_s) == ("auto", "cost", 12.5)


def test_allowed_classes_list():
    spec = {"source": {"inline": "x"}, "resources": {"classes": ["512Mi", "2Gi"]}}
    assert parse_spec(spec, allowed_classes=[512, 2048]).classes_mib == [512, 2048]
    with pytest.raises(SpecError, match=r"2048Mi is not allowed.*allowed classes: 512Mi, 1024Mi"):
        parse_spec(spec, allowed_classes=[512, 1024])


def test_run_id_and_pool_are_in_their_namespace_and_label_values():
    from dagkube.kubernetes.pods import pool_label
    from dagkube.store.keys import RunKeys, local_part, namespace_of

    uid = "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
    assert run_id_for("team-a", "tree-reduction", uid) == "team-a.tree-reduction-0f1e2d3c"
    assert run_id_for("ns", "a" * 60, uid) == "ns." + "a" * 40 + "-0f1e2d3c"
    # A '.' in a Workflow's name must not read as a namespace (nor leave its prefix).
    dotted = run_id_for("team-a", "etl.daily", uid)
    assert dotted == "team-a.etl-daily-0f1e2d3c"
    assert namespace_of(dotted) == "team-a"
    assert RunKeys(dotted).prefix.startswith("dk:ns:team-a:")
    settings = PoolSettings("registry.example.org/a/very/long/image:tag", 1792, 6.0, 30, 0, 1024)
    for scoped in (dotted, pool_for("team-a", settings)):
        label = pool_label(scoped) if scoped.startswith("team-a.wp") else local_part(scoped)
        assert len(label) <= 63 and "." not in label


def test_conditions_keep_their_transition_time_until_the_status_changes():
    first = st.with_condition(None, "Running", True, "Launched", "go", 1000.0)
    again = st.with_condition(first, "Running", True, "Launched", "still", 2000.0)
    assert again[0]["lastTransitionTime"] == st.timestamp(1000.0)
    assert again[0]["message"] == "still"
    flipped = st.with_condition(again, "Running", False, "Ended", "done", 3000.0)
    assert flipped[0]["lastTransitionTime"] == st.timestamp(3000.0)
    both = st.with_condition(flipped, "Planned", True, "Planned", "ok", 3000.0)
    assert [c["type"] for c in both] == ["Planned", "Running"]
    assert st.parse_timestamp(st.timestamp(1234.0)) == 1234.0


def _record(**fields) -> RunRecord:
    base = {
        "run_id": "r-1",
        "workflow": "w",
        "structure_hash": "s",
        "planner": "uniform",
        "sla": "p90",
        "submitted_at": 100.0,
        "finished_at": 112.0,
        "tasks_total": 5,
    }
    return RunRecord(**{**base, **fields})


def test_final_status_of_a_success_and_of_a_failure():
    done = st.final_status(
        _record(
            status="succeeded",
            tasks_done=5,
            makespan_s=10.0,
            predicted_makespan_s=11.0,
            gb_s=3.25,
            workers_cold=2,
            workers_warm=3,
        ),
        None,
        200.0,
    )
    assert done["phase"] == "Succeeded" and done["slaMet"] is True
    assert done["tasks"] == {"total": 5, "done": 5, "failed": 0}
    assert done["workers"] == {"cold": 2, "warm": 3, "prewarmed": 0}
    assert done["actualMakespanSeconds"] == 10.0 and done["resources"]["gbSeconds"] == 3.25
    assert done["completionTime"] == st.timestamp(112.0)
    assert {c["type"]: c["status"] for c in done["conditions"]} == {
        "Running": "False",
        "Succeeded": "True",
    }
    failed = st.final_status(
        _record(
            status="failed",
            tasks_done=2,
            tasks_failed=1,
            error={"task_id": "f#0", "function": "f", "exc_type": "ValueError", "message": "no"},
        ),
        None,
        200.0,
    )
    assert failed["phase"] == "Failed" and failed["failedTask"] == "f#0"
    assert "f#0 (f) raised ValueError: no" in failed["message"]
    assert "slaMet" not in failed


def test_config_from_env_reports_bad_values():
    config = OperatorConfig.from_env(
        {
            "DAGKUBE_REDIS_URL": "redis://r:6379/0",
            "DAGKUBE_REDIS_PASSWORD": "p@ss word",
            "DAGKUBE_ALLOWED_CLASSES": "512Mi, 1Gi",
            "DAGKUBE_WATCH_NAMESPACE": "jobs",
        }
    )
    assert config.redis_url == "redis://:p%40ss%20word@r:6379/0"
    assert config.allowed_classes == [512, 1024] and config.namespace == "jobs"
    assert with_password("redis://:x@r:1/0", "y") == "redis://:x@r:1/0"
    # the chart's operator user: the password goes to the URL's user, not the default one
    operator = OperatorConfig.from_env(
        {"DAGKUBE_REDIS_URL": "redis://dagkube-operator@r:6379/0", "DAGKUBE_REDIS_PASSWORD": "p w"}
    )
    assert operator.redis_url == "redis://dagkube-operator:p%20w@r:6379/0"
    assert with_password("redis://u:x@r:1/0", "y") == "redis://u:x@r:1/0"
    with pytest.raises(ConfigError, match="DAGKUBE_REDIS_URL is not set"):
        OperatorConfig.from_env({})
    with pytest.raises(ConfigError, match="DAGKUBE_IDLE_TIMEOUT='soon' is not a number"):
        OperatorConfig.from_env({"DAGKUBE_REDIS_URL": "redis://r", "DAGKUBE_IDLE_TIMEOUT": "soon"})


def test_default_timeout_setting():
    redis = {"DAGKUBE_REDIS_URL": "redis://r"}
    assert OperatorConfig.from_env(redis).default_timeout_s == 3600.0
    assert OperatorConfig.from_env({**redis, "DAGKUBE_DEFAULT_TIMEOUT": "0"}).default_timeout_s == 0
    assert (
        OperatorConfig.from_env({**redis, "DAGKUBE_DEFAULT_TIMEOUT": " 90.5 "}).default_timeout_s
        == 90.5
    )
    with pytest.raises(ConfigError) as caught:
        OperatorConfig.from_env({**redis, "DAGKUBE_DEFAULT_TIMEOUT": "-1"})
    assert str(caught.value) == "DAGKUBE_DEFAULT_TIMEOUT='-1' must be >= 0"
    for text in ("1h", "nan", "inf"):
        with pytest.raises(ConfigError) as caught:
            OperatorConfig.from_env({**redis, "DAGKUBE_DEFAULT_TIMEOUT": text})
        assert str(caught.value) == f"DAGKUBE_DEFAULT_TIMEOUT={text!r} is not a number"


def test_run_deadline_is_the_spec_timeout_else_the_operator_default():
    by_spec = run_deadline(1000.0, spec_timeout_s=5, default_timeout_s=3600.0)
    assert by_spec == Deadline(1005.0, "timed out after 5s (spec.timeoutSeconds)")
    by_default = run_deadline(1000.0, spec_timeout_s=None, default_timeout_s=3600.0)
    assert by_default == Deadline(
        4600.0,
        "timed out after 3600s (the operator's default timeout; "
        "set spec.timeoutSeconds to change it)",
    )
    longer = run_deadline(1000.0, spec_timeout_s=7200, default_timeout_s=3600.0)
    assert longer is not None and longer.at == 8200.0
    assert run_deadline(1000.0, spec_timeout_s=60, default_timeout_s=0.0) == Deadline(
        1060.0, "timed out after 60s (spec.timeoutSeconds)"
    )
    assert run_deadline(1000.0, spec_timeout_s=None, default_timeout_s=0.0) is None


def test_hard_limit_settings():
    redis = {"DAGKUBE_REDIS_URL": "redis://r"}
    config = OperatorConfig.from_env(redis)
    assert (config.max_workers_limit, config.allowed_images) == (200, None)
    assert config.worker_ephemeral_storage_mib == 1024
    config = OperatorConfig.from_env(
        {
            **redis,
            "DAGKUBE_MAX_WORKERS_LIMIT": "80",
            "DAGKUBE_ALLOWED_IMAGES": " registry.example.org/team/* ,, ghcr.io/x/worker ",
            "DAGKUBE_WORKER_EPHEMERAL_STORAGE": "2Gi",
        }
    )
    assert config.max_workers_limit == 80
    assert config.allowed_images == ["registry.example.org/team/*", "ghcr.io/x/worker"]
    assert config.worker_ephemeral_storage_mib == 2048
    bad = {
        "DAGKUBE_MAX_WORKERS_LIMIT=0": ({"DAGKUBE_MAX_WORKERS_LIMIT": "0"}, "must be >= 1"),
        "default above the limit": (
            {"DAGKUBE_MAX_WORKERS": "60", "DAGKUBE_MAX_WORKERS_LIMIT": "40"},
            "DAGKUBE_MAX_WORKERS=60 is above DAGKUBE_MAX_WORKERS_LIMIT=40",
        ),
        "a space in a pattern": (
            {"DAGKUBE_ALLOWED_IMAGES": "a b"},
            "DAGKUBE_ALLOWED_IMAGES='a b': 'a b' is not an image prefix or pattern",
        ),
        "not a quantity": (
            {"DAGKUBE_WORKER_EPHEMERAL_STORAGE": "lots"},
            "DAGKUBE_WORKER_EPHEMERAL_STORAGE='lots': .*not a memory size",
        ),
    }
    for case, (env, words) in bad.items():
        with pytest.raises(ConfigError, match=words):
            OperatorConfig.from_env({**redis, **env})
            pytest.fail(case)


def test_peering_settings():
    from dagkube_operator.__main__ import peering_priority, settings_for

    redis = {"DAGKUBE_REDIS_URL": "redis://r"}
    alone = OperatorConfig.from_env(redis)
    assert alone.peering is None
    assert settings_for(alone).peering.standalone is True
    config = OperatorConfig.from_env(
        {**redis, "DAGKUBE_PEERING": " ns-dagkube ", "DAGKUBE_PEERING_LIFETIME": "5"}
    )
    assert (config.peering, config.peering_lifetime_s) == ("ns-dagkube", 5)
    settings = settings_for(config, priority=-7)
    assert settings.peering.standalone is False
    assert settings.peering.mandatory is True  # starts paused until it knows its peers
    assert (settings.peering.name, settings.peering.priority) == ("ns-dagkube", -7)
    assert settings.peering.lifetime == 5
    # The older a replica, the higher its priority: a newcomer stands by.
    older = peering_priority()
    assert peering_priority() < older
    for env, named in [
        ({"DAGKUBE_PEERING": "Not_A_Name"}, "DAGKUBE_PEERING='Not_A_Name' is not an object name"),
        ({"DAGKUBE_PEERING": "p", "DAGKUBE_PEERING_LIFETIME": "1"}, "must be >= 2"),
    ]:
        with pytest.raises(ConfigError, match=named):
            OperatorConfig.from_env({**redis, **env})


def test_the_run_history_is_served_by_the_acting_replica_only():
    import logging

    from dagkube_operator.__main__ import PEERING_LOGGER, PeeringState, WhenActive

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # as in an operator run with DAGKUBE_LOG_LEVEL=WARNING

    class History:
        def collect(self):
            yield "history"

    state = PeeringState(peering=True)
    served = WhenActive(History(), lambda: state.active)
    kopf_peering = logging.getLogger(PEERING_LOGGER)
    state.attach()
    try:
        assert list(served.collect()) == []  # kopf starts paused until it knows its peers
        kopf_peering.info("Resuming operations after the pause. Conflicting operators ...")
        assert list(served.collect()) == ["history"]
        kopf_peering.info("Pausing operations in favour of [<Peer older-pod: ...>].")
        assert list(served.collect()) == []
    finally:
        state.detach()
        root.setLevel(level)
    assert PeeringState(peering=False).active


def test_source_kinds_and_modules_the_operator_allows():
    from dagkube_operator.spec import module_allowed

    inline = {"source": {"inline": "x = 1"}}
    module = {"source": {"module": {"name": "team.flows.etl:build"}}}
    only_modules = frozenset({"module", "ref"})
    assert parse_spec(module, allowed_sources=only_modules).source.kind == "module"
    with pytest.raises(SpecError, match=r"spec\.source\.inline is not allowed") as refused:
        parse_spec(inline, allowed_sources=only_modules)
    assert refused.value.reason == "SourceNotAllowed"
    assert "allowed sources: module, ref" in str(refused.value)
    assert (
        parse_spec(module, allowed_modules=["team.flows"]).source.module == "team.flows.etl:build"
    )
    for patterns in (["team"], ["team.flows.etl:build"], ["team.*:build"]):
        parse_spec(module, allowed_modules=patterns)
    for patterns in (["team.flow"], ["teamx"], ["team.flows.etl:other"], ["other.*"]):
        with pytest.raises(SpecError, match="is not allowed by this operator") as refused:
            parse_spec(module, allowed_modules=patterns)
        assert refused.value.reason == "ModuleNotAllowed"
    # A module allowlist says nothing about inline sources (allowed_sources does).
    assert parse_spec(inline, allowed_modules=["team"]).source.kind == "inline"
    assert module_allowed("subprocess:getoutput", "team") is False
    redis = {"DAGKUBE_REDIS_URL": "redis://r"}
    config = OperatorConfig.from_env(
        {**redis, "DAGKUBE_ALLOWED_SOURCES": "module, ref", "DAGKUBE_ALLOWED_MODULES": "a.b, c:d"}
    )
    assert config.allowed_sources == only_modules
    assert config.allowed_modules == ["a.b", "c:d"]
    assert OperatorConfig.from_env(redis).allowed_sources is None
    for env, named in [
        ({"DAGKUBE_ALLOWED_SOURCES": "inline,pickle"}, "'pickle' is not a source kind"),
        ({"DAGKUBE_ALLOWED_MODULES": "a b"}, "'a b' is not a module"),
    ]:
        with pytest.raises(ConfigError, match=named):
            OperatorConfig.from_env({**redis, **env})


def test_a_ref_reads_only_the_key_the_sdk_writes():
    dag = "0123456789abcdef"
    ref = parse_spec({"source": {"ref": {"dag": dag, "redisKey": f"dk:dag:{dag}"}}}).source
    assert ref.redis_key == f"dk:dag:{dag}"
    for key in ("dk:run:x:out", "dk:dag:fedcba9876543210", "dk:hist:all"):
        with pytest.raises(SpecError, match=r"is not where Workflow\.submit\(\) stores DAG"):
            parse_spec({"source": {"ref": {"dag": dag, "redisKey": key}}})


def test_a_tls_redis_ca_needs_worker_users():
    """The CA reaches worker Pods with their namespace's worker user (its Secret)."""
    env = {"DAGKUBE_REDIS_URL": "rediss://dagkube-operator@r:6379/0?ssl_ca_certs=/tls/ca.crt"}
    config = OperatorConfig.from_env({**env, "DAGKUBE_REDIS_CA_FILE": "/tls/ca.crt"})
    assert config.redis_ca_file == "/tls/ca.crt"
    assert OperatorConfig.from_env(env).redis_ca_file is None
    with pytest.raises(ConfigError, match=r"DAGKUBE_REDIS_CA_FILE='/tls/ca\.crt' needs DAGKUBE_"):
        OperatorConfig.from_env(
            {**env, "DAGKUBE_REDIS_CA_FILE": "/tls/ca.crt", "DAGKUBE_WORKER_USERS": "false"}
        )
