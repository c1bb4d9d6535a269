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
from dagkube.runtime import acl, scripts
from dagkube.runtime.connection import with_ca_file
from dagkube.runtime.keys import (
    HIST_ALL_RUNS,
    PoolKeys,
    RunKeys,
    hist_all_runs,
    hist_run,
    hist_structure_runs,
    hist_structures,
    hist_used,
    hist_workflow_runs,
    local_part,
    namespace_of,
    namespace_pattern,
    namespaced,
    worker_heartbeat,
    worker_proc,
    worker_task,
)


def namespace_keys(namespace: str) -> list[str]:
    run = RunKeys(namespaced(namespace, "etl-1a2b3c4d"))
    pool = PoolKeys(namespaced(namespace, "wf-1234"))
    return [
        run.meta,
        run.inbox("w1"),
        run.duplicate("t#0"),
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


def test_the_lua_root_mirrors_keys_py():
    # the scripts build keys from the run id with this rule; keys.py with namespace_of
    assert "string.match(id, '^([^.]+)%.')" in scripts.COMPLETE
    assert "'dk:ns:' .. namespace .. ':'" in scripts.COMPLETE


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
