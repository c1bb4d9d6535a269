"""Building DAGs: ids, structure hash, argument shapes, serialization and their errors."""

from __future__ import annotations

import gc
import pickle
import threading
import time
from collections import namedtuple

import pytest

import dagkube
from dagkube.dag import ConstRef, Ref, build_dag, resolve
from dagkube.errors import InvalidWorkflow
from tests.tasks import add, total


@dagkube.task
def pick(mapping, key="x"):
    return mapping[key]


def tree(n: int):
    return dagkube.reduce_tree([add(i, 1) for i in range(n)], add)


def test_reduce_tree_takes_n_minus_one_combines_in_log_levels():
    assert dagkube.reduce_tree([1, 2, 3, 4, 5], lambda a, b: a + b) == 15
    assert dagkube.reduce_tree(["x"], lambda a, b: a + b) == "x"
    wf = dagkube.Workflow(dagkube.reduce_tree(list(range(7)), add), name="odd")
    assert len(wf.dag.tasks) == 6
    with pytest.raises(InvalidWorkflow, match="at least one item"):
        dagkube.reduce_tree([], add)


def test_ids_are_stable_and_topological():
    wf = dagkube.Workflow(tree(4), name="t")
    assert wf.task_ids == ["add#0", "add#1", "add#2", "add#3", "add#4", "add#5", "add#6"]
    seen: set[str] = set()
    for spec in wf.dag.tasks.values():
        assert all(dep in seen for dep in spec.deps), spec.id
        seen.add(spec.id)
    assert wf.dag.sources == ["add#0", "add#1", "add#3", "add#4"]
    assert wf.dag.tasks["add#6"].deps == ("add#2", "add#5")
    assert wf.dag.tasks["add#2"].downstream == ["add#6"]


def test_structure_hash_groups_runs_of_the_same_shape():
    first = dagkube.Workflow(tree(8), name="a")
    again = dagkube.Workflow(tree(8), name="b")  # other names, same structure
    other = dagkube.Workflow(tree(16), name="a")
    assert first.structure_hash == again.structure_hash
    assert first.structure_hash != other.structure_hash


def test_constants_do_not_change_the_structure_hash():
    assert dagkube.Workflow(add(1, 2)).structure_hash == dagkube.Workflow(add(5, 7)).structure_hash


def test_nested_arguments_in_lists_tuples_dicts_and_namedtuples():
    Pair = namedtuple("Pair", "left right")
    a, b = add(1, 2), add(3, 4)
    node = pick({"x": [a, (b, Pair(a, 5))], "y": 1})
    wf = dagkube.Workflow(node, name="nested")
    spec = wf.dag.tasks["pick#0"]
    assert spec.deps == ("add#0", "add#1")  # each upstream once, in argument order
    args, kwargs = pickle.loads(spec.args_blob)
    resolved = resolve((args, kwargs), {"add#0": 3, "add#1": 7}, {})
    assert resolved == (({"x": [3, (7, Pair(3, 5))], "y": 1},), {})
    assert type(resolved[0][0]["x"][1][1]) is Pair


def test_shared_upstream_is_one_task():
    shared = add(1, 1)
    wf = dagkube.Workflow([add(shared, 1), add(shared, 2)], name="diamond")
    assert len(wf.dag.tasks) == 3
    assert wf.dag.tasks["add#0"].downstream == ["add#1", "add#2"]


def test_every_sink_is_an_output():
    wf = dagkube.Workflow({"a": tree(4), "b": add(1, 2)}, name="sinks")
    sinks = {t.id for t in wf.dag.tasks.values() if not t.downstream}
    assert sinks == set(wf.dag.output_ids)


def test_output_shapes():
    a, b = add(1, 2), add(3, 4)
    assert dagkube.Workflow(a).dag.output_template == Ref("add#0")
    assert dagkube.Workflow([a, b]).dag.output_template == [Ref("add#0"), Ref("add#1")]
    assert dagkube.Workflow({"k": b}).dag.output_template == {"k": Ref("add#0")}
    assert dagkube.Workflow((a, b)).dag.output_template == (Ref("add#0"), Ref("add#1"))


def test_function_code_is_stored_once_per_function():
    wf = dagkube.Workflow(total([add(i, i) for i in range(50)]), name="many")
    assert len(wf.dag.tasks) == 51
    assert len(wf.dag.functions) == 2


def test_large_constants_are_stored_once_and_referenced():
    big = list(range(50_000))
    wf = dagkube.Workflow(
        [total(big), total(big), add(1, 2)], name="consts", inline_budget_bytes=1024
    )
    assert len(wf.dag.constants) == 1
    key = next(iter(wf.dag.constants))
    for task_id in ("total#0", "total#1"):
        spec = wf.dag.tasks[task_id]
        assert spec.const_keys == (key,)
        assert len(spec.args_blob) < 1024
        args, _ = pickle.loads(spec.args_blob)
        assert args == (ConstRef(key),)
    assert wf.dag.tasks["add#0"].const_keys == ()
    assert len(wf.dag.to_bytes()) < 20_000  # constants are not inside the DAG blob


def test_deep_chain_builds_without_recursion_errors():
    node = add(0, 1)
    for _ in range(5000):
        node = add(node, 1)
    wf = dagkube.Workflow(node, name="deep")
    assert len(wf.dag.tasks) == 5001


def test_unserializable_argument_names_task_and_argument():
    with pytest.raises(InvalidWorkflow) as info:
        dagkube.Workflow(add(1, threading.Lock()))
    message = str(info.value)
    assert "Task 'add#0'" in message
    assert "argument 'b'" in message
    assert "cannot be serialized" in message
    assert "lock" in message


def test_unserializable_keyword_argument_is_named_right_whatever_the_order():
    with pytest.raises(InvalidWorkflow, match="argument 'b' cannot be serialized"):
        dagkube.Workflow(add(b=threading.Lock(), a=1))


def test_a_cycle_is_refused_naming_its_tasks():
    # A list passed to a task is kept as it is: appending a later node to it closes a cycle.
    values = [1]
    summed = total(values)
    values.append(add(summed, 1))
    with pytest.raises(InvalidWorkflow) as info:
        dagkube.Workflow(summed, name="cycle")
    message = str(info.value)
    assert "Tasks 'total' -> 'add' -> 'total' form a cycle" in message
    assert "Argument 'values' of 'total' holds a node of 'add' made after it" in message
    # Changing a node's arguments after the call does it too, and so does a node taking itself.
    first = add(1, 2)
    second = add(first, 3)
    first.args = (second, 1)
    with pytest.raises(InvalidWorkflow, match=r"Tasks 'add' -> 'add' -> 'add' form a cycle"):
        dagkube.Workflow(second, name="cycle")
    alone = total([])
    alone.args[0].append(alone)
    with pytest.raises(InvalidWorkflow, match=r"Tasks 'total' -> 'total' form a cycle"):
        dagkube.Workflow([add(1, 2), alone], name="cycle")


def test_a_wide_fan_in_builds_in_linear_time():
    """A task's upstream ids were deduplicated with a list scan, so one task taking n nodes
    cost O(n^2): at 20,000 nodes the fan-in took 3 to 4 times as long to build as the same
    nodes as outputs. Now both cost about the same. CPU time of this process, so other
    processes on the machine do not count; a ratio, so the machine's speed does not either."""
    nodes = [add(i, 1) for i in range(20_000)]

    def build_cpu_s(outputs) -> float:
        # Without the collector: in the whole suite its full passes over a large heap landed
        # in one build and not the other (1.19 s against 0.55 s in a clean-clone run).
        gc.collect()
        gc.disable()
        try:
            started = time.process_time()
            dagkube.Workflow(outputs, name="fan-in")
            return time.process_time() - started
        finally:
            gc.enable()

    as_outputs = build_cpu_s(nodes)
    as_fan_in = build_cpu_s(total(nodes))
    assert as_fan_in < 2 * as_outputs, (as_fan_in, as_outputs)


def test_node_hidden_in_an_unsupported_container_is_rejected():
    class Box:
        def __init__(self, item):
            self.item = item

    with pytest.raises(InvalidWorkflow, match=r"unsupported container.*lists, tuples and dicts"):
        dagkube.Workflow(total(Box(add(1, 2))))
    with pytest.raises(InvalidWorkflow, match="inside a set"):
        dagkube.Workflow(total({add(1, 2)}))


def test_wrong_call_signature_is_reported_at_build_time():
    with pytest.raises(InvalidWorkflow, match=r"Task 'add#0': arguments do not match add\(a, b\)"):
        dagkube.Workflow(add(1))


def test_bad_outputs_and_node_misuse():
    with pytest.raises(InvalidWorkflow, match="at least one output"):
        dagkube.Workflow([])
    with pytest.raises(InvalidWorkflow, match="is not a task node"):
        dagkube.Workflow([add(1, 2), 3])
    with pytest.raises(InvalidWorkflow, match="keys must be strings"):
        dagkube.Workflow({1: add(1, 2)})
    with pytest.raises(InvalidWorkflow, match="cannot be iterated"):
        _a, _b = add(1, 2)
    with pytest.raises(InvalidWorkflow, match="truth value"):
        if add(1, 2):
            pass


def test_task_options_are_validated():
    with pytest.raises(InvalidWorkflow, match="retries=-1"):
        dagkube.task(retries=-1)(lambda: 1)
    with pytest.raises(dagkube.InvalidOption, match="512MB"):
        dagkube.task(min_memory="512MB")(lambda: 1)

    @dagkube.task(name="named", retries=2, min_memory="1Gi")
    def f():
        return 1

    spec = build_dag(f(), "opts").tasks["named#0"]
    assert (spec.retries, spec.min_memory_mib) == (2, 1024)
