"""From lazy task nodes to a plain-data DAG: stable ids, structure hash, serialized arguments.

The :class:`DagSpec` built here is what planners read and what workers execute. Function code
is serialized once per function; constants larger than the inline budget are stored once,
by content hash, and referenced from the arguments.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import cloudpickle

from dagkube.errors import InvalidWorkflow
from dagkube.sdk import TaskFunction, TaskNode
from dagkube.sources import SourceLines, dumps_function, merge_sources

DEFAULT_INLINE_BUDGET_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Ref:
    """Placeholder for the output of another task inside an argument template."""

    task_id: str

    def __reduce__(self) -> tuple[type[Ref], tuple[str]]:
        # A plain constructor call: a fan-in pickles one Ref per upstream task, and the
        # dataclass's default (__getstate__ listing the fields) made that the slowest part.
        return (Ref, (self.task_id,))


@dataclass(frozen=True, slots=True)
class ConstRef:
    """Placeholder for a large constant stored once, by content hash."""

    key: str


@dataclass(slots=True)
class TaskSpec:
    """One task of a DAG, as planners and workers see it."""

    id: str
    function: str
    fn_key: str
    args_blob: bytes
    deps: tuple[str, ...]
    downstream: list[str] = field(default_factory=list)
    retries: int = 0
    min_memory_mib: int | None = None
    const_keys: tuple[str, ...] = ()
    timeout_s: float | None = None  # one execution's bound; the worker is stopped past it


@dataclass(slots=True)
class DagSpec:
    """A whole workflow as plain data: tasks in topological order, code, output shape."""

    name: str
    structure_hash: str
    tasks: dict[str, TaskSpec]
    functions: dict[str, bytes]
    output_template: Any
    output_ids: list[str]
    constants: dict[str, bytes] = field(default_factory=dict)
    # Source lines of the functions pickled by value, for readable remote tracebacks.
    source_lines: SourceLines = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Serialize without the constants (those are stored separately, once each)."""
        body = DagSpec(
            self.name,
            self.structure_hash,
            self.tasks,
            self.functions,
            self.output_template,
            self.output_ids,
            source_lines=self.source_lines,
        )
        return pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(blob: bytes) -> DagSpec:
        spec = pickle.loads(blob)
        if not isinstance(spec, DagSpec):
            raise InvalidWorkflow("Stored DAG is not a dagkube DagSpec")
        return spec

    @property
    def sources(self) -> list[str]:
        """Tasks without upstream tasks (the first invocations of a run)."""
        return [t.id for t in self.tasks.values() if not t.deps]


def _rebuild(value: Any, item: Callable[[Any], Any]) -> Any:
    """A list, tuple (named ones too) or dict of the same kind with ``item`` applied inside;
    any other value goes to ``item`` itself."""
    kind = type(value)
    if kind is list:
        return [item(v) for v in value]
    if kind is dict:
        return {k: item(v) for k, v in value.items()}
    if kind is tuple:
        return tuple(item(v) for v in value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return kind(*(item(v) for v in value))
    return item(value)


def _is_container(value: Any) -> bool:
    kind = type(value)
    return (
        kind is list
        or kind is dict
        or kind is tuple
        or (isinstance(value, tuple) and hasattr(value, "_fields"))
    )


def map_structure(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """Rebuild lists, tuples (named ones too) and dicts, applying ``leaf`` to everything else."""
    if _is_container(value):
        return _rebuild(value, lambda v: map_structure(v, leaf))
    return leaf(value)


def iter_leaves(value: Any) -> Iterator[Any]:
    """Every non-container value inside lists, tuples and dicts, in order."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        else:
            yield item


def _nodes_in(value: Any, where: str) -> list[TaskNode]:
    nodes: list[TaskNode] = []
    for leaf in iter_leaves(value):
        if isinstance(leaf, TaskNode):
            nodes.append(leaf)
        elif isinstance(leaf, (set, frozenset)) and any(isinstance(x, TaskNode) for x in leaf):
            raise InvalidWorkflow(
                f"{where}: task nodes inside a set are not supported (sets have no order): "
                "use a list or a tuple"
            )
    return nodes


def _collect_outputs(outputs: Any) -> list[TaskNode]:
    if isinstance(outputs, TaskNode):
        return [outputs]
    if isinstance(outputs, (list, tuple)):
        items = list(outputs)
    elif isinstance(outputs, dict):
        bad = [k for k in outputs if not isinstance(k, str)]
        if bad:
            raise InvalidWorkflow(f"Workflow output keys must be strings, got {bad[0]!r}")
        items = list(outputs.values())
    else:
        raise InvalidWorkflow(
            f"Workflow outputs must be a task node, a list or a dict of task nodes, "
            f"got {type(outputs).__name__}"
        )
    if not items:
        raise InvalidWorkflow("A workflow needs at least one output task node")
    for item in items:
        if not isinstance(item, TaskNode):
            raise InvalidWorkflow(
                f"Workflow output {item!r} is not a task node: call a @task function to get one"
            )
    return items


def _topological(outputs: list[TaskNode]) -> list[TaskNode]:
    """Iterative post-order DFS from the outputs: upstream nodes come first, order is stable.

    A node met again while its own arguments are being walked closes a cycle: refused, naming
    the tasks on it (only reachable by changing a node's arguments after the call)."""
    order: list[TaskNode] = []
    state: dict[int, int] = {}  # id(node) -> 1 visiting, 2 done
    for root in outputs:
        if state.get(id(root)) == 2:
            continue
        stack: list[tuple[TaskNode, Iterator[TaskNode] | None]] = [(root, None)]
        while stack:
            node, children = stack[-1]
            if children is None:
                state[id(node)] = 1
                where = f"Task '{node.function.options.name}'"
                children = iter(_nodes_in((node.args, node.kwargs), where))
                stack[-1] = (node, children)
            child = next(children, None)
            if child is None:
                stack.pop()
                state[id(node)] = 2
                order.append(node)
            elif state.get(id(child)) is None:
                stack.append((child, None))
            elif state[id(child)] == 1:
                _raise_cycle([entry[0] for entry in stack], child)
    return order


def _raise_cycle(path: list[TaskNode], repeated: TaskNode) -> NoReturn:
    """Refuse a cycle: ``path`` is the walk from an output (each node takes the next as an
    argument) and its last node takes ``repeated``, which is already on it."""
    start = next(i for i, node in enumerate(path) if node is repeated)
    # Data flows against the walk: from the repeated node, back up the path to itself.
    cycle = [repeated, *reversed(path[start + 1 :]), repeated]
    chain = " -> ".join(repr(node.function.options.name) for node in cycle)
    # Arguments are fixed when a node is made, so an argument made later than its consumer
    # was put there afterwards: that edge is where the user changed something.
    consumer, late = next((b, a) for a, b in itertools.pairwise(cycle) if a.order >= b.order)
    name = consumer.function.options.name
    raise InvalidWorkflow(
        f"Tasks {chain} form a cycle (each one's output is an argument of the next): a workflow "
        "must be acyclic, a task may only take task nodes made before it. Argument "
        f"{_argument_holding(consumer, late)!r} of {name!r} holds a node of "
        f"{late.function.options.name!r} made after it: was a list or dict passed to {name!r} "
        "changed after the call?"
    )


def _argument_holding(node: TaskNode, inner: TaskNode) -> str:
    """The name of ``node``'s argument that holds ``inner`` (its position if the call does not
    match the function's signature)."""
    fn, args, kwargs = node.function.fn, node.args, node.kwargs
    try:
        named = _arguments(fn, _signature(fn), args, kwargs, node.function.options.name)
    except InvalidWorkflow:
        named = _arguments(fn, None, args, kwargs, node.function.options.name)
    return next(name for name, value in named if any(leaf is inner for leaf in iter_leaves(value)))


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    """The function's call signature, or None for callables inspect cannot read (builtins)."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _arguments(
    fn: Callable[..., Any],
    signature: inspect.Signature | None,
    args: tuple,
    kwargs: dict,
    task_id: str,
) -> list[tuple[str, Any]]:
    """The call's arguments as (name, value), checking the call matches the signature; without
    one, positional arguments are named by position (``#0``)."""
    if signature is None:
        return [(f"#{i}", value) for i, value in enumerate(args)] + list(kwargs.items())
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidWorkflow(
            f"Task '{task_id}': arguments do not match {fn.__name__}{signature}: {exc}"
        ) from None
    named: list[tuple[str, Any]] = []
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named.extend((f"{name}[{i}]", item) for i, item in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.extend(value.items())
        else:
            named.append((name, value))
    return named


def _dumps(value: Any) -> bytes:
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _serialize_arguments(
    task_id: str,
    fn: Callable[..., Any],
    template: tuple[tuple, dict],
    budget: int,
    constants: dict[str, bytes],
) -> tuple[bytes, tuple[str, ...]]:
    """Pickle a task's argument template; leaves over the budget become :class:`ConstRef`."""
    try:
        blob = _dumps(template)
    except Exception:
        _raise_unserializable(task_id, fn, template)
        raise  # unreachable: _raise_unserializable always raises
    if len(blob) <= budget:
        return blob, ()
    keys: list[str] = []

    def externalize(value: Any) -> Any:
        # The unit stored apart is the largest sub-structure holding no task reference.
        if isinstance(value, Ref):
            return value
        if _is_container(value) and any(isinstance(leaf, Ref) for leaf in iter_leaves(value)):
            return _rebuild(value, externalize)
        data = _dumps(value)
        if len(data) <= budget:
            return value
        key = hashlib.sha256(data).hexdigest()[:32]
        constants[key] = data
        keys.append(key)
        return ConstRef(key)

    args, kwargs = template
    split = (tuple(externalize(a) for a in args), {k: externalize(v) for k, v in kwargs.items()})
    if not keys:  # over the budget only through its references: the first pickle stands
        return blob, ()
    return _dumps(split), tuple(dict.fromkeys(keys))


def _raise_unserializable(task_id: str, fn: Callable[..., Any], template: tuple) -> None:
    args, kwargs = template
    for name, value in _arguments(fn, _signature(fn), args, kwargs, task_id):
        try:
            _dumps(value)
        except InvalidWorkflow as exc:
            raise InvalidWorkflow(f"Task '{task_id}': argument '{name}': {exc}") from None
        except Exception as exc:
            raise InvalidWorkflow(
                f"Task '{task_id}': argument '{name}' cannot be serialized "
                f"({type(exc).__name__}: {exc})"
            ) from None
    raise InvalidWorkflow(f"Task '{task_id}': its arguments cannot be serialized")


def structure_hash(tasks: Iterable[TaskSpec], output_ids: list[str]) -> str:
    """The shape of a DAG (task ids, function names, edges, outputs) as 20 hex digits: runs of
    the same shape share a history."""
    hasher = hashlib.sha256()
    for task in tasks:
        hasher.update(f"{task.id}|{task.function}|{','.join(task.deps)}\n".encode())
    hasher.update(("outputs:" + ",".join(output_ids)).encode())
    return hasher.hexdigest()[:20]


def build_dag(
    outputs: Any, name: str, inline_budget_bytes: int = DEFAULT_INLINE_BUDGET_BYTES
) -> DagSpec:
    """Collect every task reachable from ``outputs`` and turn the graph into a :class:`DagSpec`."""
    if not name or not isinstance(name, str):
        raise InvalidWorkflow(f"Workflow name {name!r} is invalid: use a non-empty string")
    if inline_budget_bytes < 0:
        raise InvalidWorkflow(f"inline_budget_bytes={inline_budget_bytes} must be >= 0")
    output_nodes = _collect_outputs(outputs)
    nodes = _topological(output_nodes)
    ids = _task_ids(nodes)
    code = _FunctionCode()
    constants: dict[str, bytes] = {}
    tasks: dict[str, TaskSpec] = {}
    for node in nodes:
        spec = _task_spec(node, ids, code, inline_budget_bytes, constants)
        tasks[spec.id] = spec
        for dep in spec.deps:
            tasks[dep].downstream.append(spec.id)
    output_ids = list(dict.fromkeys(ids[id(n)] for n in output_nodes))
    return DagSpec(
        name=name,
        structure_hash=structure_hash(tasks.values(), output_ids),
        tasks=tasks,
        functions=code.functions,
        output_template=_output_template(outputs, ids),
        output_ids=output_ids,
        constants=constants,
        source_lines=code.source_lines,
    )


def _task_ids(nodes: list[TaskNode]) -> dict[int, str]:
    """Per node (by ``id()``): ``<name>#<n>``, numbered per task name in topological order."""
    ids: dict[int, str] = {}
    per_name: dict[str, int] = {}
    for node in nodes:
        display = node.function.options.name
        index = per_name.get(display, 0)
        per_name[display] = index + 1
        ids[id(node)] = f"{display}#{index}"
    return ids


@dataclass
class _FunctionCode:
    """The task functions of a DAG, each serialized (and its signature read) once, however
    many tasks call it."""

    functions: dict[str, bytes] = field(default_factory=dict)  # fn_key -> pickled code
    source_lines: SourceLines = field(default_factory=dict)
    keys: dict[int, str] = field(default_factory=dict)  # id(task function) -> fn_key
    signatures: dict[int, inspect.Signature | None] = field(default_factory=dict)

    def key_of(self, task_fn: TaskFunction[Any, Any]) -> str:
        """The function's key in :attr:`functions`, serializing it on first sight."""
        fn_key = self.keys.get(id(task_fn))
        if fn_key is not None:
            return fn_key
        try:
            code, lines = dumps_function(task_fn.fn)
        except Exception as exc:
            raise InvalidWorkflow(
                f"Task function '{task_fn.options.name}' cannot be serialized "
                f"({type(exc).__name__}: {exc})"
            ) from None
        fn_key = f"{task_fn.options.name}-{hashlib.sha256(code).hexdigest()[:12]}"
        self.functions[fn_key] = code
        merge_sources(self.source_lines, lines)
        self.keys[id(task_fn)] = fn_key
        self.signatures[id(task_fn)] = _signature(task_fn.fn)
        return fn_key


def _task_spec(
    node: TaskNode,
    ids: dict[int, str],
    code: _FunctionCode,
    inline_budget_bytes: int,
    constants: dict[str, bytes],
) -> TaskSpec:
    """One node as a :class:`TaskSpec`: its call checked against the function's signature,
    task nodes among its arguments replaced by :class:`Ref`, the arguments serialized."""
    task_fn: TaskFunction[Any, Any] = node.function
    task_id = ids[id(node)]
    fn_key = code.key_of(task_fn)
    _arguments(task_fn.fn, code.signatures[id(task_fn)], node.args, node.kwargs, task_id)
    # An insertion-ordered dict as the set of upstream ids: a fan-in of n nodes stays O(n).
    deps: dict[str, None] = {}

    def to_ref(leaf: Any) -> Any:
        if isinstance(leaf, TaskNode):
            dep_id = ids[id(leaf)]
            deps[dep_id] = None
            return Ref(dep_id)
        return leaf

    template = map_structure((node.args, node.kwargs), to_ref)
    args_blob, const_keys = _serialize_arguments(
        task_id, task_fn.fn, template, inline_budget_bytes, constants
    )
    return TaskSpec(
        id=task_id,
        function=task_fn.options.name,
        fn_key=fn_key,
        args_blob=args_blob,
        deps=tuple(deps),
        retries=task_fn.options.retries,
        min_memory_mib=task_fn.options.min_memory_mib,
        const_keys=const_keys,
        timeout_s=task_fn.options.timeout_s,
    )


def _output_template(outputs: Any, ids: dict[int, str]) -> Any:
    """The run's result shape (a node, a dict, tuple or list of them) with :class:`Ref`s."""

    def output_ref(leaf: Any) -> Any:
        return Ref(ids[id(leaf)])

    if isinstance(outputs, TaskNode):
        return Ref(ids[id(outputs)])
    if isinstance(outputs, dict):
        return {k: output_ref(v) for k, v in outputs.items()}
    if isinstance(outputs, tuple):
        return tuple(output_ref(v) for v in outputs)
    return [output_ref(v) for v in outputs]


def resolve(template: Any, values: dict[str, Any], constants: dict[str, Any]) -> Any:
    """Replace :class:`Ref`/:class:`ConstRef` placeholders by the values they stand for."""

    def leaf(item: Any) -> Any:
        if type(item) is Ref:
            return values[item.task_id]
        if type(item) is ConstRef:
            return constants[item.key]
        return item

    return map_structure(template, leaf)
