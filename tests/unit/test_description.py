"""The data-only DAG description the operator reads: faithful round trips, and every broken
rule or bound refused by name without unpickling anything."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import pytest

import dagkube
from dagkube import description
from dagkube.description import InvalidDescription, describe, parse
from tests.tasks import add, total


@dagkube.task(retries=2, min_memory=300, timeout=4.5)
def weigh(values, scale=1.0):
    return sum(values) * scale


def roundtrip(dag: dagkube.dag.DagSpec) -> dagkube.dag.DagSpec:
    data, blobs = describe(dag)
    return parse(data, blobs, dag.constants, where="test")


@pytest.mark.parametrize(
    "outputs",
    [
        lambda: add(1, 2),
        lambda: [add(1, 2), add(3, 4)],
        lambda: (add(1, 2), total([add(i, i) for i in range(5)])),
        lambda: {"a": add(1, 2), "b": weigh([add(2, 3)], scale=2.0), "c": add(0, 0)},
    ],
    ids=["one", "list", "tuple", "dict"],
)
def test_a_dag_survives_its_description_whole(outputs):
    dag = dagkube.Workflow(outputs(), name="shapes").dag
    assert roundtrip(dag) == dag


def test_options_constants_and_source_lines_survive():
    big = list(range(40_000))  # over the inline budget: stored once as a constant
    dag = dagkube.Workflow([weigh(big), weigh(big, scale=3.0)], name="consts").dag
    assert dag.constants and dag.source_lines
    again = roundtrip(dag)
    assert again == dag
    # what workers get reads back the same (constants travel apart)
    assert dagkube.dag.DagSpec.from_bytes(again.to_bytes()) == dataclasses.replace(
        dag, constants={}
    )
    [task, _] = again.tasks.values()
    assert (task.retries, task.min_memory_mib, task.timeout_s) == (2, 300, 4.5)


def test_the_structure_hash_and_downstream_lists_are_recomputed_not_read():
    dag = dagkube.Workflow(total([add(1, 2), add(3, 4)]), name="h").dag
    data, blobs = describe(dag)
    found = json.loads(data)
    found["tasks"][0]["function"] = "renamed"
    changed = parse(json.dumps(found).encode(), blobs, {}, where="test")
    assert changed.structure_hash != dag.structure_hash
    assert changed.tasks["add#0"].downstream == ["total#0"]
    assert "structure_hash" not in found and "downstream" not in found["tasks"][0]


def _broken(change) -> tuple[bytes, dict[str, bytes]]:
    dag = dagkube.Workflow(total([add(1, 2), add(3, 4)]), name="b").dag
    data, blobs = describe(dag)
    found = json.loads(data)
    change(found, blobs)
    return json.dumps(found).encode(), blobs


def _set(path, value):
    def change(found, _blobs):
        target = found
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_set(["format"], 2), "format"),
        (_set(["extra"], 1), "extra"),
        (_set(["tasks"], []), "tasks"),
        (_set(["tasks", 0, "retries"], 10**400), "retries"),
        (_set(["tasks", 0, "retries"], "1"), "retries"),
        (_set(["tasks", 0, "min_memory_mib"], 0), "min_memory_mib"),
        (_set(["tasks", 0, "timeout_s"], -1), "timeout_s"),
        (_set(["tasks", 0, "id"], "x" * 600), "tasks.0.id"),
        (_set(["tasks", 0, "const_keys"], ["../../etc"]), "const_keys"),
        (_set(["tasks", 2, "deps"], ["add#0", "nowhere"]), "depends on 'nowhere'"),
        (_set(["tasks", 0, "deps"], ["total#0"]), "depends on 'total#0'"),
        (_set(["tasks", 2, "deps"], ["add#0", "add#0"]), "upstream task twice"),
        (_set(["tasks", 1, "id"], "add#0"), "appears twice"),
        (_set(["tasks", 2, "const_keys"], ["ab"]), "constant ab is missing"),
        (_set(["output", "ref"], "nowhere"), "output 'nowhere'"),
        (_set(["output"], {"kind": "list", "refs": []}), "no output task"),
        (
            _set(["output"], {"kind": "dict", "keys": ["a", "a"], "refs": ["add#0", "add#1"]}),
            "repeats a key",
        ),
        (_set(["sources"], {"f.py": {"x": "line"}}), "line number"),
        (lambda _f, blobs: blobs.pop("a:add#1"), "arguments blob is missing"),
        (lambda _f, blobs: blobs.clear(), "blob is missing"),
    ],
)
def test_a_broken_description_is_refused_naming_the_rule(change, expected):
    data, blobs = _broken(change)
    with pytest.raises(InvalidDescription, match=r"^test: ") as caught:
        parse(data, blobs, {}, where="test")
    assert expected in str(caught.value)


class Payload:
    """Runs ``os.system`` when unpickled: the description must never be."""

    def __reduce__(self):
        return (os.system, ("echo pwned >&2",))


def test_a_pickle_where_the_description_belongs_is_refused_and_never_loaded(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    blob = pickle.dumps(Payload())
    with pytest.raises(InvalidDescription, match="not a dagkube DAG description"):
        parse(blob, {}, {}, where="test")
    dag = dagkube.Workflow(add(1, 2), name="p").dag
    data, blobs = describe(dag)
    blobs["a:add#0"] = blob  # opaque bytes for the workers: passed on, not loaded
    assert parse(data, blobs, {}, where="test").tasks["add#0"].args_blob == blob


def test_bounds_on_size_and_task_count(monkeypatch):
    monkeypatch.setattr(description, "MAX_DESCRIPTION_BYTES", 100)
    dag = dagkube.Workflow(total([add(i, i) for i in range(20)]), name="big").dag
    data, blobs = describe(dag)
    with pytest.raises(InvalidDescription, match="over the limit of 100"):
        parse(data, blobs, {}, where="test")
    found = json.loads(data)
    found["tasks"] = found["tasks"] * (description.MAX_TASKS // len(found["tasks"]) + 1)
    monkeypatch.setattr(description, "MAX_DESCRIPTION_BYTES", 1 << 30)
    with pytest.raises(InvalidDescription, match="tasks"):
        parse(json.dumps(found).encode(), blobs, {}, where="test")
