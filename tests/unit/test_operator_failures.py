"""How the operator fails a Workflow: the fixed set of reasons, bounded messages, which errors
are retried and after how long, and the settings of builds."""

from __future__ import annotations

from typing import Any

import pytest
import redis.exceptions
from kubernetes_asyncio import client

from dagkube.kubernetes.backend import STUCK_WAITING
from dagkube_operator.config import ConfigError, OperatorConfig
from dagkube_operator.reasons import (
    BUILD_REASONS,
    MESSAGE_LIMIT_BYTES,
    Reason,
    bounded,
    bounded_status,
    internal_error,
    reason_of,
)
from dagkube_operator.spec import SpecError, parse_spec
from dagkube_operator.transient import StatusNotWritten, backoff_delay_s, is_transient


def test_a_short_message_is_kept_as_it_is():
    assert bounded("task t#0 raised ValueError: no") == "task t#0 raised ValueError: no"


def test_a_long_message_keeps_its_head_and_tail_and_says_where_the_rest_is():
    text = "head " + "é" * 3_000_000 + " tail"
    cut = bounded(text, full_text_in="Redis key dk:run:r:message")
    assert len(cut.encode()) <= MESSAGE_LIMIT_BYTES
    assert cut.startswith("head éé") and cut.endswith("éé tail")
    size = len(text.encode())
    assert f"(truncated, {size} bytes; full text in Redis key dk:run:r:message)" in cut
    assert len(bounded(text, limit_bytes=1000).encode()) <= 1000


def test_a_status_has_its_message_and_conditions_bounded():
    status = {
        "phase": "Failed",
        "message": "x" * 10_000,
        "conditions": [{"type": "Succeeded", "message": "y" * 10_000}, {"type": "Other"}],
    }
    out = bounded_status(status, "Redis key k")
    assert len(out["message"].encode()) <= MESSAGE_LIMIT_BYTES
    assert len(out["conditions"][0]["message"].encode()) <= MESSAGE_LIMIT_BYTES
    assert out["conditions"][1] == {"type": "Other"}
    assert status["message"] == "x" * 10_000  # a copy


def test_reasons_come_from_the_fixed_set():
    assert reason_of("BuildTimeout", Reason.BUILD_FAILED) is Reason.BUILD_TIMEOUT
    # Text from outside (a build's report, a Pod's status) cannot make up a reason.
    assert reason_of("Succeeded\nforged", Reason.BUILD_FAILED) is Reason.BUILD_FAILED
    assert reason_of(None, Reason.WORKERS_PENDING) is Reason.WORKERS_PENDING
    # The kubelet's reasons the operator reports are in the set.
    assert {reason_of(r, Reason.WORKERS_PENDING).value for r in STUCK_WAITING} == STUCK_WAITING
    assert Reason.INTERNAL_ERROR not in BUILD_REASONS and Reason.BUILD_FAILED in BUILD_REASONS


def test_a_spec_error_carries_a_reason_of_the_set():
    with pytest.raises(SpecError) as caught:
        parse_spec({"source": {"inline": "x"}, "resources": {"classes": ["9" * 400 + "Mi"]}})
    assert caught.value.reason is Reason.CLASS_NOT_ALLOWED
    assert "spec.resources.classes" in str(caught.value)
    with pytest.raises(ValueError):
        SpecError("no", reason="MadeUp")  # type: ignore[arg-type]


def test_an_unforeseen_error_names_its_step():
    try:
        try:
            raise KeyError("plan")
        except KeyError as exc:
            exc.add_note("planning")
            raise
    except KeyError as exc:
        failure = internal_error(exc)
    assert failure.reason is Reason.INTERNAL_ERROR
    assert str(failure).startswith("the operator failed while planning: KeyError: 'plan'")


def test_backoff_doubles_up_to_its_cap():
    assert [backoff_delay_s(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay_s(10_000) == 30
    assert backoff_delay_s(2, first_s=0.5, cap_s=60) == 2


def api_error(status: int) -> client.ApiException:
    return client.ApiException(status=status, reason="x")


@pytest.mark.parametrize("status", [429, 500, 503, 504, 403, 409])
def test_api_errors_that_pass_are_transient(status: int):
    assert is_transient(api_error(status))
    try:
        raise StatusNotWritten("cannot patch") from api_error(status)
    except StatusNotWritten as exc:
        assert is_transient(exc)


@pytest.mark.parametrize("status", [400, 413, 422])
def test_api_errors_that_come_back_the_same_are_not(status: int):
    try:
        raise StatusNotWritten("cannot patch") from api_error(status)
    except StatusNotWritten as exc:
        assert not is_transient(exc)


def test_connection_errors_are_transient_and_others_not():
    assert is_transient(redis.exceptions.ConnectionError("refused"))
    assert is_transient(redis.exceptions.BusyLoadingError("LOADING"))
    assert is_transient(redis.exceptions.ResponseError("OOM command not allowed"))
    assert is_transient(ConnectionResetError())
    assert not is_transient(redis.exceptions.ResponseError("WRONGTYPE Operation against a key"))
    assert not is_transient(FileNotFoundError("dag.pickle"))
    assert not is_transient(KeyError("x"))


def test_max_concurrent_builds_setting():
    env = {"DAGKUBE_REDIS_URL": "redis://r:6379/0"}
    assert OperatorConfig.from_env(env).max_concurrent_builds == 2
    assert (
        OperatorConfig.from_env({**env, "DAGKUBE_MAX_CONCURRENT_BUILDS": "4"}).max_concurrent_builds
        == 4
    )
    with pytest.raises(ConfigError, match="DAGKUBE_MAX_CONCURRENT_BUILDS='0' must be >= 1"):
        OperatorConfig.from_env({**env, "DAGKUBE_MAX_CONCURRENT_BUILDS": "0"})
    default = OperatorConfig.from_env(env)
    assert (default.build_memory_mib, default.build_cpu) == (512, 0.5)
    sized = OperatorConfig.from_env(
        {**env, "DAGKUBE_BUILD_MEMORY": "1Gi", "DAGKUBE_BUILD_CPU": "0.5"}
    )
    assert (sized.build_memory_mib, sized.build_cpu) == (1024, 0.5)
    with pytest.raises(ConfigError, match="DAGKUBE_BUILD_MEMORY='lots'"):
        OperatorConfig.from_env({**env, "DAGKUBE_BUILD_MEMORY": "lots"})
    with pytest.raises(ConfigError, match="DAGKUBE_BUILD_CPU='nan' is not a number"):
        OperatorConfig.from_env({**env, "DAGKUBE_BUILD_CPU": "nan"})


def inline(**spec: Any) -> dict[str, Any]:
    return {"source": {"inline": "x"}, **spec}


def test_max_workers_above_the_operators_limit_fails_naming_both():
    assert parse_spec(inline(resources={"maxWorkers": 200}), max_workers_limit=200).max_workers
    with pytest.raises(SpecError) as caught:
        parse_spec(inline(resources={"maxWorkers": 201}), max_workers_limit=200)
    assert caught.value.reason is Reason.MAX_WORKERS_ABOVE_LIMIT
    assert str(caught.value) == (
        "spec.resources.maxWorkers=201 is above this operator's limit of 200 worker Pods per "
        "run; ask for at most 200"
    )


ALLOWED = ["registry.example.org/team/*", "ghcr.io/acme/worker"]
DEFAULT_IMAGE = "ghcr.io/dagkube/worker:0.1.0"


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("registry.example.org/team/app:1.2", ALLOWED),
        ("registry.example.org/team/sub/app@sha256:" + "a" * 64, ALLOWED),
        ("ghcr.io/acme/worker", ALLOWED),
        ("ghcr.io/acme/worker:2.0", ALLOWED),
        ("ghcr.io/acme/worker/gpu:2.0", ALLOWED),
        (DEFAULT_IMAGE, ALLOWED),  # the operator's own worker image, always
        ("anything.example.com/x:1", None),  # no allowlist: any image, as before
    ],
)
def test_allowed_images(image: str, allowed: list[str] | None):
    spec = parse_spec(inline(image=image), allowed_images=allowed, default_image=DEFAULT_IMAGE)
    assert spec.image == image


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/library/python:3.12",
        "registry.example.org/teamx/app:1",  # a prefix ends at '/', ':' or '@'
        "ghcr.io/acme/worker-evil:1",
        "registry.example.org/other/app:1",
        "ghcr.io/dagkube/worker:0.0.1-evil",  # only the default image itself
    ],
)
def test_an_image_outside_the_allowlist_fails_naming_it_and_the_patterns(image: str):
    with pytest.raises(SpecError) as caught:
        parse_spec(inline(image=image), allowed_images=ALLOWED, default_image=DEFAULT_IMAGE)
    assert caught.value.reason is Reason.IMAGE_NOT_ALLOWED
    assert str(caught.value) == (
        f"spec.image={image!r} is not allowed by this operator; allowed images: "
        "registry.example.org/team/*, ghcr.io/acme/worker (or leave spec.image unset for the "
        "default worker image)"
    )
