"""Key names of a namespace's runs, pools, workers and history lie under one prefix that an ACL
key pattern can name; local runs keep theirs; the worker user's rules are computed from the
scripts it calls."""

from __future__ import annotations

import fnmatch
import re

import pytest
import redis.asyncio.connection
import redis.connection

from dagkube.kubernetes.pods import (
    REDIS_CA_FILE,
    WORKER_REDIS_SECRET,
    WORKER_REDIS_SECRET_KEY,
    build_worker_pod,
    build_worker_redis_secret,
    pool_selector,
    worker_labels,
)
from dagkube.store import acl
from dagkube.store.connection import with_ca_file
from dagkube.store.keys import (
    HIST_ALL_RUNS,
    KeySpace,
    PoolKeys,
    RunKeys,
    hist_all_runs,
    hist_run,
    hist_structure_runs,
    hist_structures,
    hist_used,
    hist_workflow_runs,
    key_root,
    local_part,
    namespace_of,
    namespace_pattern,
    namespaced,
    worker_heartbeat,
    worker_proc,
    worker_task,
)
from dagkube.store.scripts import LUA_FOLDER


def namespace_keys(namespace: str) -> list[str]:
    run = RunKeys(namespaced(namespace, "etl-1a2b3c4d"))
    pool = PoolKeys(namespaced(namespace, "wf-1234"))
    return [
        run.meta,
        run.inbox("w1"),
        run.duplicate("t#0"),
        run.output("t#0"),
        pool.queue(512),
        pool.prewarm,
        worker_proc("dk-1234-512-0", pool.pool),
        worker_task("dk-1234-512-0", pool.pool),
        worker_heartbeat("dk-1234-512-0", pool.pool),
        hist_run(run.run_id, "meta"),
        hist_structure_runs("abc", namespace),
        hist_workflow_runs("etl", namespace),
        hist_all_runs(namespace),
        hist_structures(namespace),
        hist_used(namespace),
    ]


def test_every_key_of_a_namespace_matches_its_pattern_and_no_other():
    # Redis' ACL key patterns are glob-style, as fnmatchcase for these characters.
    for key in namespace_keys("team-a"):
        assert fnmatch.fnmatchcase(key, namespace_pattern("team-a")), key
        for other in ("team-b", "team", "team-a-b", "a"):
            assert not fnmatch.fnmatchcase(key, namespace_pattern(other)), (key, other)


def test_local_keys_are_unchanged():
    assert RunKeys("etl-20260101-000000-abc123").meta == "dk:run:etl-20260101-000000-abc123:meta"
    assert PoolKeys("local-1-ab").queue(512) == "dk:pool:local-1-ab:q:512"
    assert worker_proc("w1") == worker_proc("w1", "local-1-ab") == "dk:w:w1:proc"
    assert hist_run("r1", "meta") == "dk:hist:r:r1:meta"
    assert HIST_ALL_RUNS == hist_all_runs() == "dk:hist:all"
    for key in namespace_keys("team-a"):
        assert not fnmatch.fnmatchcase(key, "dk:run:*") and not key.startswith("dk:hist:")


def test_namespace_of_ids():
    assert namespace_of("team-a.my.workflow-1a2b") == "team-a"
    assert local_part("team-a.my.workflow-1a2b") == "my.workflow-1a2b"
    assert namespace_of("etl-20260101-000000-abc123") is None
    assert local_part("etl-1") == "etl-1"


@pytest.mark.parametrize("bad", ["", "Team", "a.b", "a:b", "a*", "a?", "a[b]", "-a", "x" * 64])
def test_names_that_would_widen_a_pattern_are_refused(bad):
    with pytest.raises(ValueError, match="namespace"):
        namespaced(bad, "run")
    with pytest.raises(ValueError, match="namespace"):
        acl.worker_user(bad)


# What would spell a key name in Lua: a root, a kind of key, a worker key's part.
KEY_NAME_LITERALS = re.compile(r"'[^']*(dk:|run:|hist:|pool:|w:|:hb|:proc|:task)[^']*'")


def test_the_lua_spells_no_key_name():
    """The scripts get their namespace's prefixes as arguments (keys.KeySpace), so key names
    are spelled in keys.py alone."""
    files = sorted(LUA_FOLDER.iterdir())
    assert {f.name for f in files} >= {"prelude.lua", "complete.lua", "finish.lua"}
    for lua in files:
        for number, line in enumerate(lua.read_text().splitlines(), 1):
            code = line.split("--", 1)[0]
            assert not KEY_NAME_LITERALS.search(code), f"{lua.name}:{number}: {line.strip()}"


@pytest.mark.parametrize("namespace", [None, "team-a"])
def test_the_key_space_the_scripts_get_builds_keys_py_names(namespace):
    """The Lua builds a run's key as runs .. id .. ':' .. part, a run's history record as
    history_runs .. id .. ':' .. part, a pool's as pools .. name: the same names as keys.py."""
    run = namespaced(namespace, "etl-1") if namespace else "etl-1"
    pool = namespaced(namespace, "wf-1") if namespace else "local-1"
    runs, history, history_runs, pools = KeySpace(namespace).script_args()
    assert KeySpace.of(run) == KeySpace.of(pool) == KeySpace(namespace)
    assert f"{runs}{run}:meta" == RunKeys(run).meta
    assert f"{history_runs}{run}:tasks" == hist_run(run, "tasks")
    assert f"{history}all" == hist_all_runs(namespace)
    assert f"{history}structures" == hist_structures(namespace)
    assert f"{history}used" == hist_used(namespace)
    assert f"{history}s:abc:runs" == hist_structure_runs("abc", namespace)
    assert f"{history}wf:etl:runs" == hist_workflow_runs("etl", namespace)
    assert f"{pools}{pool}" == PoolKeys(pool).prefix
    assert all(arg.startswith(key_root(namespace)) for arg in (runs, history, pools))


def test_worker_user_rules():
    user = acl.worker_user("team-a")
    rules = user.rules()
    assert rules[:2] == ["resetchannels", "-@all"]
    assert rules[-1] == "~dk:ns:team-a:*"
    assert [r for r in rules if r.startswith("~")] == ["~dk:ns:team-a:*"]
    for forbidden in ("config", "flushall", "flushdb", "keys", "scan", "debug", "eval", "acl"):
        assert forbidden not in user.commands
        assert not any(c.startswith(forbidden + "|") for c in user.commands)
    assert not any(c.startswith("@") for c in user.commands)
    # every command inside the scripts a worker calls, e.g. FINISH's history keeping
    for command in ("lmove", "hincrbyfloat", "zadd", "zrange", "lrem", "time", "pexpire"):
        assert command in user.commands
    assert {"evalsha", "script|load"} <= set(user.commands)


def test_operator_user_rules():
    user = acl.operator_user()
    assert user.key_patterns == ("dk:*",)
    assert {"acl|setuser", "acl|deluser"} <= set(user.commands)
    assert not {"config", "flushall", "keys", "debug", "acl", "eval"} & set(user.commands)


def test_user_url_replaces_the_credentials():
    url = acl.user_url("redis://:admin@redis.dagkube:6379/0", "dagkube-worker-a", "p/w@x")
    assert url == "redis://dagkube-worker-a:p%2Fw%40x@redis.dagkube:6379/0"
    assert acl.user_url("rediss://u:p@[::1]:6380", "w", "s") == "rediss://w:s@[::1]:6380"


def test_a_tls_url_keeps_its_scheme_and_ca_for_the_worker_user():
    """The worker Secret's URL is the operator's with another user: rediss:// and the CA the
    worker Pods mount (``ssl_ca_certs``, which redis-py hands to its TLS connection)."""
    operator_url = "rediss://dagkube-operator:pw@redis.dk.svc:6379/0?ssl_ca_certs=/op/ca.crt"
    worker_url = with_ca_file(acl.user_url(operator_url, "dagkube-worker-a", "p/w"), REDIS_CA_FILE)
    assert worker_url == (
        f"rediss://dagkube-worker-a:p%2Fw@redis.dk.svc:6379/0?ssl_ca_certs={REDIS_CA_FILE}"
    )
    assert acl.user_url(operator_url, "w", "s").endswith("/0?ssl_ca_certs=/op/ca.crt")
    for parse in (redis.connection.parse_url, redis.asyncio.connection.parse_url):
        kwargs = parse(worker_url)
        assert kwargs["ssl_ca_certs"] == REDIS_CA_FILE
        assert kwargs["connection_class"].__name__ == "SSLConnection"
        assert (kwargs["username"], kwargs["password"]) == ("dagkube-worker-a", "p/w")
    other = "rediss://h:1/0?health_check_interval=3&ssl_ca_certs=/old"
    assert with_ca_file(other, "/new") == "rediss://h:1/0?health_check_interval=3&ssl_ca_certs=/new"
    with pytest.raises(ValueError, match="does not use TLS: a CA file needs a rediss:// URL"):
        with_ca_file("redis://:secret@h:6379/0", REDIS_CA_FILE)


def test_pod_labels_carry_the_local_part_of_namespaced_ids():
    run_id = namespaced("a-namespace-with-a-rather-long-name-for-labels", "w" * 40 + "-1a2b3c4d")
    pool = namespaced("team-a", "wf-" + "0" * 36)
    labels = worker_labels(pool=pool, run_id=run_id, memory_mib=512)
    assert labels["dagkube.io/run"] == "w" * 40 + "-1a2b3c4d"
    assert labels["dagkube.io/pool"] == "wf-" + "0" * 36
    assert pool_selector(pool) == "dagkube.io/pool=wf-" + "0" * 36


def test_a_pod_cannot_serve_another_namespaces_pool():
    with pytest.raises(ValueError, match=re.escape("serve pool 'team-b.wf-1' of namespace")):
        build_worker_pod(
            name="dk-1-512-0",
            namespace="team-a",
            run_id=None,
            pool="team-b.wf-1",
            memory_mib=512,
            image="worker:1",
            redis_url_secret=("redis", "url"),
            idle_timeout_s=30,
            spawned_at=0.0,
        )


def test_the_worker_secret_holds_the_namespace_users_url():
    url = acl.user_url("redis://:admin@redis:6379/0", "dagkube-worker-team-a", "p/w@x")
    secret = build_worker_redis_secret("team-a", url)
    assert (secret["kind"], secret["metadata"]["namespace"]) == ("Secret", "team-a")
    assert secret["stringData"] == {WORKER_REDIS_SECRET_KEY: url}
    assert secret["metadata"]["name"] == WORKER_REDIS_SECRET
    assert acl.url_password(url) == "p/w@x"


def test_the_fixed_keys_of_a_run_are_its_keys_but_the_dynamic_ones():
    """What a run's end expires (keys.RUN_PARTS, handed to the scripts) and what a teardown
    deletes is every fixed key RunKeys names."""
    keys = RunKeys(namespaced("team-a", "etl-1"))
    named = {
        keys.meta,
        keys.dag,
        keys.plan,
        keys.outputs,
        keys.constants,
        keys.done,
        keys.dep_counts,
        keys.started,
        keys.keyset,
        keys.result,
    }
    assert set(keys.fixed) == named and len(keys.fixed) == len(named)
    # A large output's own key is a dynamic one, next to the output hash.
    assert keys.output("t#0") == f"{keys.outputs}:t#0"
    assert keys.output("t#0") not in keys.fixed
