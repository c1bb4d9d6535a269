"""A DAG as data: what the operator reads of a workflow without unpickling anything.

A :class:`~dagkube.dag.DagSpec` is stored in Redis as three keys:

- ``<key>``: its *description*, JSON: the name, the tasks in topological order (id, function
  name, code key, upstream ids, retries, memory floor, timeout, constant keys), the output
  shape and the source lines of by-value functions. Read with a strict schema and bounds.
- ``<key>:blobs``: a hash of opaque bytes: ``f:<code key>`` a function, ``a:<task id>`` an
  argument template. Only workers unpickle them; the operator passes them on as bytes.
- ``<key>:const``: a hash of the large constants, by content key (bytes, as above).

This is the one form a DAG crosses a trust boundary in: ``Workflow.submit`` stores it for
``spec.source.ref`` and a build Pod stores it for ``spec.source.inline``/``module``. The
operator (:func:`load`) rebuilds the DagSpec from the JSON and the bytes; the structure hash
and every task's downstream list are recomputed, never taken from the description. A
description that breaks a rule or a bound is refused with :class:`InvalidDescription`,
naming what was wrong.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dagkube.dag import DagSpec, Ref, TaskSpec, structure_hash
from dagkube.errors import InvalidWorkflow

FORMAT: Literal[1] = 1
MAX_DESCRIPTION_BYTES = 64 * 1024 * 1024
MAX_TASKS = 200_000
MAX_NAME = 253
MAX_ID = 512
MAX_RETRIES = 100
MAX_MEMORY_MIB = 1 << 30
MAX_SOURCE_FILES = 10_000
MAX_SOURCE_LINES = 1_000_000

FUNCTION_FIELD = "f:"
ARGS_FIELD = "a:"

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Ident = Annotated[str, Field(min_length=1, max_length=MAX_ID)]


class InvalidDescription(InvalidWorkflow):
    """A stored DAG description that cannot be read: not JSON, not this schema, a broken rule
    (an unknown upstream task, a missing blob) or a bound passed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TaskDescription(_Strict):
    id: Ident
    function: Name
    code: Ident  # the field f:<code> of the blobs hash
    deps: list[Ident] = Field(default_factory=list)
    retries: Annotated[int, Field(ge=0, le=MAX_RETRIES)] = 0
    min_memory_mib: Annotated[int, Field(ge=1, le=MAX_MEMORY_MIB)] | None = None
    timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    const_keys: list[Annotated[str, Field(pattern=r"^[0-9a-f]{1,64}$")]] = Field(
        default_factory=list
    )


class OutputDescription(_Strict):
    """The shape of the workflow's result: one task's output, or a list, tuple or dict of
    them (dict keys are strings, as the SDK requires)."""

    kind: Literal["ref", "list", "tuple", "dict"]
    ref: Ident | None = None
    refs: list[Ident] = Field(default_factory=list)
    keys: list[Annotated[str, Field(max_length=MAX_ID)]] = Field(default_factory=list)


class Description(_Strict):
    format: Literal[1]
    name: Name
    tasks: Annotated[list[TaskDescription], Field(min_length=1, max_length=MAX_TASKS)]
    output: OutputDescription
    sources: dict[Annotated[str, Field(max_length=4096)], dict[str, str]] = Field(
        default_factory=dict
    )


def describe(dag: DagSpec) -> tuple[bytes, dict[str, bytes]]:
    """The description (JSON bytes) and the blobs hash of ``dag`` (constants apart)."""
    template = dag.output_template
    output: dict[str, Any]
    if isinstance(template, Ref):
        output = {"kind": "ref", "ref": template.task_id}
    elif isinstance(template, dict):
        output = {
            "kind": "dict",
            "keys": list(template),
            "refs": [ref.task_id for ref in template.values()],
        }
    else:
        kind = "tuple" if isinstance(template, tuple) else "list"
        output = {"kind": kind, "refs": [ref.task_id for ref in template]}
    description = Description(
        format=FORMAT,
        name=dag.name,
        tasks=[
            TaskDescription(
                id=task.id,
                function=task.function,
                code=task.fn_key,
                deps=list(task.deps),
                retries=task.retries,
                min_memory_mib=task.min_memory_mib,
                timeout_s=task.timeout_s,
                const_keys=list(task.const_keys),
            )
            for task in dag.tasks.values()
        ],
        output=OutputDescription(**output),
        sources={
            path: {str(line): text for line, text in lines.items()}
            for path, lines in dag.source_lines.items()
        },
    )
    blobs = {FUNCTION_FIELD + key: code for key, code in dag.functions.items()}
    blobs.update({ARGS_FIELD + task.id: task.args_blob for task in dag.tasks.values()})
    return description.model_dump_json().encode(), blobs


def _refuse(where: str, message: str) -> InvalidDescription:
    return InvalidDescription(f"{where}: {message}")


def parse(
    data: bytes, blobs: dict[str, bytes], constants: dict[str, bytes], *, where: str
) -> DagSpec:
    """The DagSpec of a description and its bytes, or InvalidDescription naming ``where`` (the
    key or the build it came from) and the first broken rule."""
    found = _read(data, where)
    tasks, functions = _tasks(found.tasks, blobs, constants, where)
    template, output_ids = _output(found.output, tasks, where)
    return DagSpec(
        name=found.name,
        structure_hash=structure_hash(tasks.values(), output_ids),
        tasks=tasks,
        functions=functions,
        output_template=template,
        output_ids=output_ids,
        constants=dict(constants),
        source_lines=_source_lines(found.sources, where),
    )


def _read(data: bytes, where: str) -> Description:
    """The description's JSON against the schema and its bounds."""
    if len(data) > MAX_DESCRIPTION_BYTES:
        raise _refuse(
            where,
            f"the description is {len(data)} bytes, over the limit of {MAX_DESCRIPTION_BYTES}",
        )
    try:
        return Description.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or "(top)"
        raise _refuse(
            where,
            f"not a dagkube DAG description ({exc.error_count()} problem(s); first at "
            f"{location}: {first['msg']})",
        ) from None


def _tasks(
    described: list[TaskDescription],
    blobs: dict[str, bytes],
    constants: dict[str, bytes],
    where: str,
) -> tuple[dict[str, TaskSpec], dict[str, bytes]]:
    """The tasks (downstream lists rebuilt from the upstream ids) and the functions they call;
    every upstream listed before its consumer, every blob and constant present."""
    tasks: dict[str, TaskSpec] = {}
    functions: dict[str, bytes] = {}
    for task in described:
        if task.id in tasks:
            raise _refuse(where, f"task {task.id!r} appears twice")
        unknown = [dep for dep in task.deps if dep not in tasks]
        if unknown:
            raise _refuse(
                where,
                f"task {task.id!r} depends on {unknown[0]!r}, which is not a task listed "
                "before it (tasks come in topological order)",
            )
        if len(set(task.deps)) != len(task.deps):
            raise _refuse(where, f"task {task.id!r} lists an upstream task twice")
        code = blobs.get(FUNCTION_FIELD + task.code)
        args = blobs.get(ARGS_FIELD + task.id)
        if code is None or args is None:
            missing = "function " + task.code if code is None else "arguments"
            raise _refuse(where, f"task {task.id!r}: its {missing} blob is missing")
        lost = [key for key in task.const_keys if key not in constants]
        if lost:
            raise _refuse(where, f"task {task.id!r}: constant {lost[0]} is missing")
        functions[task.code] = code
        tasks[task.id] = TaskSpec(
            id=task.id,
            function=task.function,
            fn_key=task.code,
            args_blob=args,
            deps=tuple(task.deps),
            retries=task.retries,
            min_memory_mib=task.min_memory_mib,
            const_keys=tuple(task.const_keys),
            timeout_s=task.timeout_s,
        )
        for dep in task.deps:
            tasks[dep].downstream.append(task.id)
    return tasks, functions


def _output(
    output: OutputDescription, tasks: dict[str, TaskSpec], where: str
) -> tuple[Any, list[str]]:
    """The output template (:class:`Ref`s in the described shape) and the output task ids."""
    if output.kind == "ref" and (output.ref is None or output.refs or output.keys):
        raise _refuse(where, "output of kind 'ref' needs exactly 'ref'")
    ids = [output.ref] if output.ref is not None else list(output.refs)
    if output.kind != "ref" and output.ref is not None:
        raise _refuse(where, f"output of kind {output.kind!r} takes 'refs', not 'ref'")
    if output.kind == "dict" and len(output.keys) != len(output.refs):
        raise _refuse(where, "output of kind 'dict' needs as many keys as refs")
    if output.kind != "dict" and output.keys:
        raise _refuse(where, f"output of kind {output.kind!r} has no keys")
    if not ids:
        raise _refuse(where, "the workflow has no output task")
    for task_id in ids:
        if task_id not in tasks:
            raise _refuse(where, f"output {task_id!r} is not a task of the workflow")
    template: Any
    if output.kind == "ref":
        template = Ref(ids[0])
    elif output.kind == "dict":
        keys = output.keys
        template = {key: Ref(ref) for key, ref in zip(keys, output.refs, strict=True)}
        if len(template) != len(keys):
            raise _refuse(where, "output of kind 'dict' repeats a key")
    elif output.kind == "tuple":
        template = tuple(Ref(ref) for ref in ids)
    else:
        template = [Ref(ref) for ref in ids]
    return template, list(dict.fromkeys(ids))


def _source_lines(sources: dict[str, dict[str, str]], where: str) -> dict[str, dict[int, str]]:
    """Source lines by file and line number, within the bounds on files and lines."""
    source_lines: dict[str, dict[int, str]] = {}
    total_lines = 0
    if len(sources) > MAX_SOURCE_FILES:
        raise _refuse(where, f"source lines of more than {MAX_SOURCE_FILES} files")
    for path, lines in sources.items():
        total_lines += len(lines)
        if total_lines > MAX_SOURCE_LINES:
            raise _refuse(where, f"more than {MAX_SOURCE_LINES} source lines")
        try:
            source_lines[path] = {int(line): text for line, text in lines.items()}
        except ValueError:
            raise _refuse(where, f"source lines of {path!r}: a line number is not one") from None
    return source_lines


def blobs_key(key: str) -> str:
    """The hash of a stored description's functions and argument templates."""
    return f"{key}:blobs"


def constants_key(key: str) -> str:
    """The hash of a stored description's large constants."""
    return f"{key}:const"


def store(pipe: Any, key: str, dag: DagSpec, *, ttl_s: int) -> None:
    """Queue on ``pipe`` (a redis-py pipeline, sync or asyncio) what stores ``dag`` at ``key``
    for ``ttl_s`` seconds: the blobs and constants first, the description last (a reader that
    finds the description finds the rest, inside one MULTI)."""
    data, blobs = describe(dag)
    for hash_key, mapping in ((blobs_key(key), blobs), (constants_key(key), dag.constants)):
        pipe.delete(hash_key)
        if mapping:
            pipe.hset(hash_key, mapping=mapping)
            pipe.expire(hash_key, ttl_s)
    pipe.set(key, data, ex=ttl_s)


def content_id(dag: DagSpec) -> str:
    """Content id of a DAG (description, blobs and constants): 32 hex digits."""
    data, blobs = describe(dag)
    digest = hashlib.sha256(data)
    for mapping in (blobs, dag.constants):
        for name in sorted(mapping):
            digest.update(len(name).to_bytes(8, "big") + name.encode())
            digest.update(len(mapping[name]).to_bytes(8, "big") + mapping[name])
    return digest.hexdigest()[:32]


async def load(redis: Any, key: str, *, where: str | None = None) -> DagSpec | None:
    """The DAG stored at ``key`` (an asyncio Redis client), None when nothing is there;
    InvalidDescription when what is there is not a description or breaks a rule."""
    where = where or f"Redis key {key!r}"
    kind = (await redis.type(key)).decode()
    if kind == "none":
        return None
    if kind != "string":
        raise _refuse(where, f"holds a {kind}, not a DAG description (a string)")
    data = await redis.get(key)
    if data is None:
        return None
    hashes = []
    for hash_key in (blobs_key(key), constants_key(key)):
        kind = (await redis.type(hash_key)).decode()
        if kind not in ("hash", "none"):
            raise _refuse(where, f"{hash_key!r} holds a {kind}, not a hash of blobs")
        hashes.append(await redis.hgetall(hash_key))
    blobs, constants = hashes
    # Off the event loop: a description of 100,000 tasks takes about 2 s to check here.
    return await asyncio.to_thread(
        parse,
        data,
        {name.decode(errors="replace"): blob for name, blob in blobs.items()},
        {name.decode(errors="replace"): blob for name, blob in constants.items()},
        where=where,
    )
