"""A Kubernetes API emulator for tests: kmock's KubernetesEmulator, made to behave like a real
API server where an operator depends on it, served on a free loopback port.

``kubernetes_api()`` serves a fresh ``ApiServerEmulator`` (with kmock's bundled discovery of the
built-in kinds, and the Workflow CRD of ``crds/workflow.yaml``) and yields an
``EmulatedCluster``: its URL for the client under test, and plain-HTTP helpers that read and
change objects the way a kubelet or a user would, independently of the client library the code
under test uses.

What ``ApiServerEmulator`` adds to kmock 0.8 (which stores objects as it gets them):

* server-owned metadata: ``uid``, ``creationTimestamp``, ``resourceVersion`` (one counter for the
  whole server, bumped by every change), ``generation`` (bumped when ``spec`` changes), names
  from ``generateName``; a no-op update changes nothing and sends no watch event;
* optimistic concurrency: a ``metadata.resourceVersion`` in a PATCH or PUT body is a
  precondition (409 Conflict), JSON-patch ``test`` operations fail with 422 (what kopf relies on);
* status subresources: the main resource ignores ``status`` changes, ``/status`` changes only
  ``status``; a Pod starts with ``status.phase: Pending``, a custom resource without status;
* deletion: finalizers hold an object with a ``deletionTimestamp`` until they are removed, no
  finalizer can be added meanwhile; a real deletion deletes the object's dependents (by
  ``metadata.ownerReferences``), recursively, as the garbage collector does;
* LIST and WATCH honour ``labelSelector`` and ``fieldSelector``; WATCH honours
  ``resourceVersion`` (replays what happened since), ``timeoutSeconds`` and
  ``sendInitialEvents``; objects leaving or entering a selector are DELETED or ADDED events;
* PUT (replace) and DELETE of a collection; Secrets' ``stringData`` is folded into ``data``;
* custom resources of a declared CRD are defaulted, pruned and validated with the CRD's
  openAPIV3Schema, names and labels are validated: a bad object is a 422 Invalid;
* Namespaces: ``/api/v1/namespaces`` is served (kmock 0.8 fails to parse it, see
  ``_patch_kmock_namespace_paths``); a namespace springs into existence with its first object
  ("default" exists from the start); deleting a namespace deletes what is in it;
* a record of the API calls, in RBAC vocabulary, for RBAC tests (``api_calls()``).

Unlike kmock, a request intercepted by a test's own reaction (e.g. an injected 403) changes
nothing: the state changes only when the emulator itself serves the request.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import datetime
import inspect
import re
import secrets
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import aiohttp
import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import jsonschema
import kmock
import yaml
from kmock._internal import parsing

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW_CRD = ROOT / "crds" / "workflow.yaml"
WORKFLOWS = kmock.resource("dagkube.io", "v1alpha1", "workflows")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
PODS = kmock.resource("", "v1", "pods")
SECRETS = kmock.resource("", "v1", "secrets")
NAMESPACES = kmock.resource("", "v1", "namespaces")

# Requests carrying this header come from the test's own helpers (EmulatedCluster, TestKubelet),
# not from the code under test: ``api_calls()`` leaves them out by default.
TEST_CLIENT_HEADER = "X-Dagkube-Test-Client"

_TRUE = ("1", "t", "true")  # Go's strconv.ParseBool, lowercased
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
_SERVER_METADATA = ("uid", "creationTimestamp", "resourceVersion", "generation")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server draws suffixes from
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _patch_kmock_namespace_paths() -> None:
    """Work around kmock 0.8 parsing the Namespace resource's own URLs: ``/api/v1/namespaces``
    raises ValueError (a 500 for the client: kopf lists and watches namespaces), and
    ``/api/v1/namespaces/<name>[/status]`` is taken for a namespace without a resource. Other
    paths parse as before. Idempotent; affects kmock's parsing in this process only."""
    original = parsing.parse_path
    if getattr(original, "namespaces_fixed", False):
        return

    def parse_path(path: str) -> parsing.ParsedPath:
        parts = [part for part in path.strip("/").split("/") if part]
        if parts[:3] == ["api", "v1", "namespaces"] and (
            len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
        ):
            name = parts[3] if len(parts) > 3 else None
            subresource = parts[4] if len(parts) > 4 else None
            return parsing.ParsedPath("", "v1", "namespaces", None, name, subresource)
        return original(path)

    parse_path.namespaces_fixed = True  # type: ignore[attr-defined]
    parsing.parse_path = parse_path


_patch_kmock_namespace_paths()

T = TypeVar("T")
Labels = Mapping[str, str]
ObjectKey = tuple[kmock.resource, str | None, str]


def now_rfc3339() -> str:
    """The current time as the API server writes timestamps: RFC 3339, UTC, seconds, "Z"."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def server_fields_removed(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``obj`` without what the API server fills in on create (uid, timestamps,
    versions, the initial status): the object as its client submitted it, for comparisons."""
    result = copy.deepcopy(dict(obj))
    metadata = result.get("metadata") or {}
    for key in _SERVER_METADATA:
        metadata.pop(key, None)
    result.pop("status", None)
    return result


# --------------------------------------------------------------------------- label selectors


def _split_requirements(selector: str) -> list[str]:
    """Split a selector on the commas outside parentheses (``a in (x,y),b`` is two)."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


_KEY = r"(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)"
_SET_REQUIREMENT = re.compile(rf"^{_KEY}\s+(?P<op>in|notin)\s*\((?P<values>[-A-Za-z0-9_.,\s]*)\)$")
_VALUE_REQUIREMENT = re.compile(rf"^{_KEY}\s*(?P<op>==|=|!=|>|<)\s*(?P<value>[-A-Za-z0-9_.]*)$")
_EXISTS_REQUIREMENT = re.compile(rf"^(?P<neg>!?)\s*{_KEY}$")
_FIELD_REQUIREMENT = re.compile(r"^(?P<key>[^\s!=,]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s,]*)$")


def _label_requirement(requirement: str) -> Callable[[Labels], bool]:
    """The predicate of one requirement of a label selector (ValueError if malformed)."""
    if match := _SET_REQUIREMENT.match(requirement):
        key, negated = match["key"], match["op"] == "notin"
        values = {value.strip() for value in match["values"].split(",")}

        def in_set(labels: Labels) -> bool:
            return (labels.get(key) in values) != negated

        return in_set
    if match := _VALUE_REQUIREMENT.match(requirement):
        key, op, value = match["key"], match["op"], match["value"]
        if op in ("=", "==", "!="):

            def equals(labels: Labels) -> bool:
                return (key in labels and labels[key] == value) != (op == "!=")

            return equals
        try:
            bound = int(value)
        except ValueError:
            raise ValueError(f"{requirement!r}: {op} needs an integer") from None

        def compares(labels: Labels) -> bool:
            try:
                number = int(labels[key])
            except (KeyError, ValueError):
                return False
            return number > bound if op == ">" else number < bound

        return compares
    if match := _EXISTS_REQUIREMENT.match(requirement):
        key, negated = match["key"], bool(match["neg"])

        def exists(labels: Labels) -> bool:
            return (key in labels) != negated

        return exists
    raise ValueError(f"unable to parse requirement {requirement!r}")


def parse_label_selector(selector: str) -> Callable[[Labels], bool]:
    """A predicate on labels from a label selector string, as the API server understands it:
    ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``, ``a in (x,y)``, ``a notin (x,y)``, ``a>1``,
    ``a<1``; a comma is AND. ``!=`` and ``notin`` match objects without the label.
    ValueError for a selector the API server would reject."""
    checks = [_label_requirement(requirement) for requirement in _split_requirements(selector)]

    def matches(labels: Labels) -> bool:
        return all(check(labels) for check in checks)

    return matches


def label_selector_matches(selector: str, labels: Labels | None) -> bool:
    """Whether labels match a label selector string (see ``parse_label_selector``)."""
    return parse_label_selector(selector)(labels or {})


def _field_requirement(requirement: str) -> Callable[[Mapping[str, Any]], bool]:
    match = _FIELD_REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"invalid field selector requirement {requirement!r}")
    path, value, negated = match["key"], match["value"], match["op"] == "!="

    def check(obj: Mapping[str, Any]) -> bool:
        found: Any = obj
        for part in path.split("."):
            found = found.get(part) if isinstance(found, Mapping) else None
        actual = "" if found is None else str(found)
        return (actual == value) != negated

    return check


def parse_field_selector(selector: str) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate on objects from a field selector (``metadata.name=x,status.phase!=Failed``).
    The API server supports a few fields per kind; any dotted path works here."""
    checks = [_field_requirement(requirement) for requirement in _split_requirements(selector)]

    def matches(obj: Mapping[str, Any]) -> bool:
        return all(check(obj) for check in checks)

    return matches


# --------------------------------------------------------------------------- CRD schemas


def load_workflow_crd() -> dict[str, Any]:
    """The Workflow CustomResourceDefinition of ``crds/workflow.yaml``."""
    return yaml.safe_load(WORKFLOW_CRD.read_text())


def openapi_to_jsonschema(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as a JSON Schema (draft 4) that ``jsonschema`` checks like the
    API server: ``x-kubernetes-*`` extensions dropped (int-or-string becomes a type union),
    ``nullable`` allows null; oneOf/anyOf/allOf/not, patterns, enums, bounds pass through."""
    if not isinstance(schema, Mapping):
        return schema
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties", "definitions"):
            result[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("allOf", "anyOf", "oneOf"):
            result[key] = [openapi_to_jsonschema(sub) for sub in value]
        elif key in ("items", "additionalProperties", "not"):
            result[key] = openapi_to_jsonschema(value)
        else:
            result[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        result["type"] = ["integer", "string"]
    if schema.get("nullable") and isinstance(result.get("type"), str):
        result["type"] = [result["type"], "null"]
    return result


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    """RFC 3339 date-time (jsonschema checks it only with an optional package)."""
    if not isinstance(value, str) or "T" not in value.upper():
        return False
    datetime.datetime.fromisoformat(value.replace("z", "Z"))
    return value.upper().endswith("Z") or bool(re.search(r"[+-]\d\d:\d\d$", value))


def schema_errors(body: Any, openapi_schema: Mapping[str, Any]) -> list[str]:
    """Every violation of a CRD's openAPIV3Schema by ``body``, as "path: message" lines."""
    validator = jsonschema.Draft4Validator(
        openapi_to_jsonschema(openapi_schema), format_checker=_FORMATS
    )
    errors = sorted(validator.iter_errors(body), key=lambda error: list(error.absolute_path))
    return [
        f"{'.'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in errors
    ]


def _workflow_schema() -> dict[str, Any]:
    crd = load_workflow_crd()
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]


def validate_workflow(body: Mapping[str, Any]) -> None:
    """Check a Workflow object against the CRD's openAPIV3Schema; an AssertionError listing
    every violation if it does not conform (what ``kubectl apply`` would be refused for)."""
    errors = schema_errors(body, _workflow_schema())
    if errors:
        name = (body.get("metadata") or {}).get("name", "<unnamed>")
        raise AssertionError(
            f"Workflow {name!r} does not conform to crds/workflow.yaml:\n  " + "\n  ".join(errors)
        )


def apply_schema_defaults(obj: Any, schema: Mapping[str, Any]) -> None:
    """Fill in the schema's ``default`` values where fields are absent, as the API server does
    (in place; nested defaults apply inside defaulted objects too)."""
    if isinstance(obj, dict):
        properties = schema.get("properties") or {}
        for name, sub in properties.items():
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                apply_schema_defaults(obj[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for name, value in obj.items():
                if name not in properties:
                    apply_schema_defaults(value, extra)
    elif isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        for item in obj:
            apply_schema_defaults(item, schema["items"])


def prune_unknown_fields(obj: Any, schema: Mapping[str, Any], *, root: bool = False) -> None:
    """Drop the fields a structural schema does not specify, as the API server does (in place):
    ``x-kubernetes-preserve-unknown-fields`` keeps them; the root's apiVersion, kind and
    metadata always stay."""
    if isinstance(obj, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        for name in list(obj):
            if name in properties:
                if not (root and name == "metadata"):
                    prune_unknown_fields(obj[name], properties[name])
            elif root and name in ("apiVersion", "kind", "metadata"):
                continue
            elif isinstance(extra, Mapping):
                prune_unknown_fields(obj[name], extra)
            elif not (preserve or extra is True):
                del obj[name]
    elif isinstance(obj, list) and isinstance(schema.get("items"), Mapping):
        for item in obj:
            prune_unknown_fields(item, schema["items"])


# --------------------------------------------------------------------------- API calls (RBAC)


class ApiCall(NamedTuple):
    """One request to a resource, in RBAC terms (verb, apiGroup "" for core, resource,
    subresource "" for none), with where it went and who sent it."""

    verb: str
    group: str
    resource: str
    subresource: str
    namespace: str | None
    name: str | None
    test_client: str | None  # the TEST_CLIENT_HEADER value; None for the code under test
    user_agent: str = ""

    @property
    def rbac(self) -> tuple[str, str, str, str]:
        return (self.verb, self.group, self.resource, self.subresource)


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def rbac_call(
    method: str, path: str, query: Mapping[str, str], test_client: str | None = None
) -> ApiCall | None:
    """What RBAC rule an HTTP request needs; None for discovery and other non-resource URLs
    (/api, /apis, /apis/<group>[/<version>], /version, /openapi/..., /healthz...)."""
    parts = [part for part in path.split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, rest = "", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return None
    watch_path = bool(rest) and rest[0] == "watch"  # the deprecated /watch/ URLs
    rest = rest[1:] if watch_path else rest
    if not rest:
        return None
    namespace = None
    namespace_itself = rest[0] == "namespaces" and (
        len(rest) <= 2 or (len(rest) == 3 and rest[2] in ("status", "finalize"))
    )
    if rest[0] == "namespaces" and not namespace_itself:
        namespace, rest = rest[1], rest[2:]
    resource, name, subresource = rest[0], (rest[1] if len(rest) > 1 else None), "/".join(rest[2:])
    method = method.upper()
    if method == "GET" and (watch_path or str(query.get("watch", "")).lower() in _TRUE):
        verb = "watch"
    elif method in ("GET", "HEAD"):
        verb = "get" if name else "list"
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _VERBS.get(method, method.lower())
    return ApiCall(verb, group, resource, subresource, namespace, name, test_client)


# --------------------------------------------------------------------------- the emulator


def _error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes; non-objects replace)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _in_key_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects in the order the API server lists them: by namespace, then name."""
    return sorted(
        objects, key=lambda obj: (obj["metadata"].get("namespace") or "", obj["metadata"]["name"])
    )


@dataclass(frozen=True)
class _Change:
    """One watch event as stored: the object after (``obj``) and before (``old``) it."""

    revision: int
    resource: kmock.resource
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesEmulator):
    """kmock's KubernetesEmulator with the API server behaviour an operator relies on (see the
    module docstring). Objects stay in kmock's ``objects`` array; tests may read them there."""

    enforce_schemas: bool = True  # default, prune and validate custom resources of known CRDs
    calls: list[ApiCall] = attrs.field(factory=list, init=False)
    _revision: int = attrs.field(default=0, init=False)
    _changes: list[_Change] = attrs.field(factory=list, init=False)
    _streams: dict[kmock.resource, kmock.Bus[_Change]] = attrs.field(
        factory=lambda: collections.defaultdict(kmock.Bus), init=False
    )
    _schemas: dict[kmock.resource, dict[str, Any]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[self._is_replace_or_collection_delete] << self._serve_put_or_delete_all

    # ----- recording

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        call = rbac_call(
            raw_request.method,
            raw_request.path,
            dict(raw_request.query),
            raw_request.headers.get(TEST_CLIENT_HEADER),
        )
        if call is not None:
            self.calls.append(call._replace(user_agent=raw_request.headers.get("User-Agent", "")))
        watch = raw_request.query.get("watch")
        if watch is not None and watch != "true" and watch.lower() in _TRUE:
            # The API server parses booleans like Go (kubernetes-asyncio sends "True"); kmock
            # only takes "true" as a watch.
            query = raw_request.query.copy()
            query["watch"] = "true"
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.with_query(query))
        return await super().__call__(raw_request)

    def api_calls(
        self, *, include_test_clients: bool = False, user_agents: tuple[str, ...] = ()
    ) -> set[tuple[str, str, str, str]]:
        """(verb, apiGroup, resource, subresource) of every resource request received, in RBAC
        vocabulary: e.g. ("watch", "dagkube.io", "workflows", ""), ("patch", "", "pods",
        "status"). Discovery is left out, and so are the calls of the test's own helpers
        (requests with TEST_CLIENT_HEADER) unless ``include_test_clients``; with
        ``user_agents``, only requests whose User-Agent starts with one of them."""
        return {
            call.rbac
            for call in self.calls
            if (include_test_clients or call.test_client is None)
            and (not user_agents or call.user_agent.startswith(user_agents))
        }

    # ----- declarations

    def declare_crd(self, crd: Mapping[str, Any]) -> None:
        """Serve a CustomResourceDefinition as a real cluster does once it is applied: its served
        versions in discovery (with their subresources), the CRD object itself (established),
        and its schema for defaulting, pruning and validation. Declare before clients watch."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            resource = kmock.resource(spec["group"], version["name"], names["plural"])
            self.resources[resource] = kmock.ResourceInfo(
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                kind=names["kind"],
                singular=names.get("singular", names["kind"].lower()),
                verbs=set(ALL_VERBS),
                shortnames=set(names.get("shortNames", [])),
                categories=set(names.get("categories", [])),
                subresources=set(version.get("subresources") or {}),
            )
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if schema:
                self._schemas[resource] = schema
        stored = copy.deepcopy(dict(crd))
        stored["metadata"] = self._new_metadata(stored.get("metadata") or {}, None)
        stored["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
            "conditions": [
                {"type": kind, "status": "True", "reason": reason, "lastTransitionTime": now}
                for kind, reason in (("NamesAccepted", "NoConflicts"), ("Established", "Ready"))
                for now in [now_rfc3339()]
            ],
        }
        key: ObjectKey = (CRDS, None, stored["metadata"]["name"])
        self._store(key, stored)
        self._changes.append(_Change(self._revision, CRDS, "ADDED", stored, None))

    # ----- state helpers (called with self._lock held)

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _new_metadata(self, metadata: Mapping[str, Any], namespace: str | None) -> dict[str, Any]:
        result = dict(metadata)
        result.pop("namespace", None)
        if namespace is not None:
            result["namespace"] = namespace
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            result.pop(key, None)
        result["uid"] = str(uuid.uuid4())
        result["creationTimestamp"] = now_rfc3339()
        result["resourceVersion"] = self._next_revision()
        result["generation"] = 1
        return result

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        # NB: ``self.resources[x]`` (and so ``.get(x)``) would declare x as a side effect.
        return self.resources[resource] if resource in self.resources else None  # noqa: SIM401

    def _known(self, resource: kmock.resource) -> bool:
        return any(resource == known for known in self._get_resources())

    def _has_status_subresource(self, resource: kmock.resource) -> bool:
        info = self._info(resource)
        return info is not None and "status" in info.subresources

    def _live(self, key: ObjectKey) -> dict[str, Any] | None:
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _live_items(
        self, request: kmock.Request | None = None, *, copied: bool = True
    ) -> Iterator[tuple[ObjectKey, dict[str, Any]]]:
        """The objects not deleted (in the request's scope, if given); deep copies unless
        ``copied`` is false (then they must not be changed)."""
        for key, obj in list(self.objects.items()):
            if not obj.deleted and (request is None or self._in_scope(request, key)):
                yield key, copy.deepcopy(obj.raw) if copied else obj.raw

    def _store(self, key: ObjectKey, obj: dict[str, Any]) -> None:
        if key in self.objects:
            self.objects[key].history.append(copy.deepcopy(obj))
        else:
            self.objects[key] = copy.deepcopy(obj)

    async def _emit(
        self, resource: kmock.resource, kind: str, obj: Mapping[str, Any], old: Any = None
    ) -> None:
        change = _Change(self._revision, resource, kind, copy.deepcopy(dict(obj)), old)
        self._changes.append(change)
        await self._streams[resource].put(change)

    def _not_found(self, key: ObjectKey) -> kmock.KubernetesError:
        resource, _, name = key
        return _error(
            404,
            "NotFound",
            f'{resource.plural} "{name}" not found',
            name=name,
            kind=resource.plural,
        )

    def _check_object(self, resource: kmock.resource, obj: dict[str, Any]) -> None:
        """Validate names and labels; default, prune and validate a custom resource."""
        metadata = obj["metadata"]
        name = metadata.get("name", "")
        problems = []
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            problems.append(
                f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must "
                "consist of lower case alphanumeric characters, '-' or '.'"
            )
        for label, value in (metadata.get("labels") or {}).items():
            prefix, _, short = label.rpartition("/")
            if not isinstance(value, str) or not _LABEL_VALUE.match(value):
                problems.append(f"metadata.labels: Invalid value: {value!r} (label {label})")
            if not _LABEL_NAME.match(short) or (prefix and not _DNS_SUBDOMAIN.match(prefix)):
                problems.append(f"metadata.labels: Invalid value: {label!r}: bad label key")
        schema = self._schemas.get(resource) if self.enforce_schemas else None
        if schema is not None:
            apply_schema_defaults(obj, schema)
            prune_unknown_fields(obj, schema, root=True)
            problems += schema_errors(obj, schema)
        if problems:
            kind = obj.get("kind") or resource.plural
            raise _error(
                422,
                "Invalid",
                f'{kind} "{name}" is invalid: ' + "; ".join(problems),
                name=name,
                kind=kind,
                causes=problems,
            )

    @staticmethod
    def _fold_secret_string_data(obj: dict[str, Any]) -> None:
        string_data = obj.pop("stringData", None) or {}
        if string_data:
            data = obj.setdefault("data", {})
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()

    async def _remove(self, key: ObjectKey, obj: dict[str, Any], *, orphan: bool = False) -> None:
        """Really delete an object (no finalizers left), then its dependents (the garbage
        collector: deleted when no owner is left; references to the gone owner removed)."""
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = self._next_revision()
        self.objects[key].delete()
        await self._emit(key[0], "DELETED", final)
        uid, namespace = obj["metadata"].get("uid"), key[1]
        if key[0] == NAMESPACES:  # the namespace controller: everything in it goes
            for member_key in list(self.objects):
                member = self._live(member_key)  # fresh: a cascade may have changed it
                if member_key[1] == key[2] and member is not None:
                    await self._delete_object(member_key, member)
        for dep_key in list(self.objects):
            stored = self.objects[dep_key]  # read afresh: a cascade may have changed it
            if stored.deleted or uid is None:
                continue
            refs = stored.raw["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == uid for ref in refs):
                continue
            if namespace is not None and dep_key[1] != namespace:
                continue  # a namespaced owner only owns objects of its namespace
            dependent = copy.deepcopy(stored.raw)
            remaining = [ref for ref in refs if self._uid_exists(ref.get("uid"))]
            if remaining or orphan:  # keep it, without the references to the gone owner
                updated = copy.deepcopy(dependent)
                updated["metadata"].pop("ownerReferences")
                if remaining:
                    updated["metadata"]["ownerReferences"] = remaining
                await self._commit_update(dep_key, dependent, updated)
            else:
                await self._delete_object(dep_key, dependent)

    def _uid_exists(self, uid: str | None) -> bool:
        return any(obj["metadata"].get("uid") == uid for _, obj in self._live_items(copied=False))

    async def _delete_object(
        self, key: ObjectKey, obj: dict[str, Any], *, orphan: bool = False
    ) -> dict[str, Any]:
        """DELETE semantics: a soft delete (deletionTimestamp) while finalizers remain."""
        metadata = obj["metadata"]
        if metadata.get("deletionTimestamp"):
            return obj
        if metadata.get("finalizers"):
            updated = copy.deepcopy(obj)
            updated["metadata"]["deletionTimestamp"] = now_rfc3339()
            updated["metadata"]["deletionGracePeriodSeconds"] = 0
            return await self._commit_update(key, obj, updated)
        await self._remove(key, obj, orphan=orphan)
        return obj

    async def _commit_update(
        self, key: ObjectKey, old: dict[str, Any], new: dict[str, Any]
    ) -> dict[str, Any]:
        """Store a changed object (new resourceVersion, MODIFIED event); a released object
        (deletionTimestamp, no finalizers left) is deleted for real."""
        if new == old:
            return old
        new["metadata"]["resourceVersion"] = self._next_revision()
        self._store(key, new)
        await self._emit(key[0], "MODIFIED", new, old)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._remove(key, new)
        return new

    # ----- request helpers

    @staticmethod
    def _selectors(request: kmock.Request) -> Callable[[Mapping[str, Any]], bool]:
        try:
            labels = parse_label_selector(request.params.get("labelSelector", ""))
            fields = parse_field_selector(request.params.get("fieldSelector", ""))
        except ValueError as exc:
            raise _error(400, "BadRequest", f"unable to parse selector: {exc}") from None
        return lambda obj: labels((obj.get("metadata") or {}).get("labels") or {}) and fields(obj)

    def _key(self, request: kmock.Request) -> ObjectKey:
        assert request.resource is not None and request.name is not None
        return (request.resource, request.namespace, request.name)

    def _in_scope(self, request: kmock.Request, key: ObjectKey) -> bool:
        resource, namespace, name = key
        return (
            resource == request.resource
            and (request.namespace is None or namespace == request.namespace)
            and (request.name is None or name == request.name)
        )

    def _require_known(self, request: kmock.Request) -> None:
        assert request.resource is not None
        if not self._known(request.resource):
            raise _error(
                404, "NotFound", f"the server could not find the resource {request.url.path}"
            )

    def _list_kind(self, resource: kmock.resource) -> tuple[str, str]:
        info = self._info(resource)
        kind = info.kind if info is not None and info.kind else str(resource.plural).capitalize()
        api_version = f"{resource.group}/{resource.version}" if resource.group else "v1"
        return api_version, kind

    # ----- serving (the fallbacks kmock calls when no reaction of the test intercepted)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip KubernetesEmulator._handle: it changes the state before the reactions are
        # matched (an injected error would still create the object); the serving methods
        # below change it instead.
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        self._require_known(request)
        assert request.resource is not None
        matches = self._selectors(request)
        async with self._lock:
            items = [obj for _, obj in self._live_items(request, copied=False) if matches(obj)]
            revision = str(self._revision)
        items = _in_key_order(items)
        metadata: dict[str, Any] = {"resourceVersion": revision}
        limit = int(request.params.get("limit") or 0)
        if limit > 0:
            start = int(request.params.get("continue") or 0)
            if start + limit < len(items):
                metadata["continue"] = str(start + limit)
                metadata["remainingItemCount"] = len(items) - start - limit
            items = items[start : start + limit]
        api_version, kind = self._list_kind(request.resource)
        return {
            "apiVersion": api_version,
            "kind": f"{kind}List",
            "metadata": metadata,
            "items": items,
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        self._require_known(request)
        assert request.resource is not None
        matches = self._selectors(request)
        since = request.params.get("resourceVersion", "")
        initial_events = request.params.get("sendInitialEvents") == "true"
        timeout = request.params.get("timeoutSeconds")
        deadline = asyncio.get_running_loop().time() + float(timeout) if timeout else None
        yield b""  # send the headers: the stream is open even if nothing happens
        bus = self._streams[request.resource]
        async with self._lock:
            mark = await bus.mark()  # under the lock: no change slips between replay and live
            if since.isdigit() and int(since) > 0 and not initial_events:
                replay = [
                    event
                    for change in self._changes
                    if change.revision > int(since) and change.resource == request.resource
                    if (event := self._event(request, change, matches)) is not None
                ]
            else:
                current = [obj for _, obj in self._live_items(request) if matches(obj)]
                replay = [{"type": "ADDED", "object": obj} for obj in _in_key_order(current)]
            revision = str(self._revision)
        try:
            for event in replay:
                yield event
            if initial_events:
                api_version, kind = self._list_kind(request.resource)
                yield {
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": api_version,
                        "kind": kind,
                        "metadata": {
                            "resourceVersion": revision,
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }
            changes = cast(AsyncGenerator[_Change, None], bus.stream(since=mark))
            try:
                while True:
                    if deadline is None:
                        change = await anext(changes)
                    else:
                        remaining = deadline - asyncio.get_running_loop().time()
                        try:
                            change = await asyncio.wait_for(anext(changes), max(remaining, 0))
                        except TimeoutError:
                            return  # the server-side timeout: the client reconnects
                    event = self._event(request, change, matches)
                    if event is not None:
                        yield event
            finally:
                await changes.aclose()
        finally:
            with contextlib.suppress(ValueError):
                await bus.unmark(mark)

    def _event(
        self,
        request: kmock.Request,
        change: _Change,
        matches: Callable[[Mapping[str, Any]], bool],
    ) -> dict[str, Any] | None:
        """The watch event a change means for this watcher, if any (objects entering or
        leaving its selector are ADDED or DELETED for it)."""
        metadata = change.obj["metadata"]
        key = (change.resource, metadata.get("namespace"), metadata["name"])
        if not self._in_scope(request, key):
            return None
        now = matches(change.obj)
        before = change.old is not None and matches(change.old)
        if change.type == "MODIFIED" and now != before:
            kind = "ADDED" if now else "DELETED"
        elif now:
            kind = change.type
        else:
            return None
        return {"type": kind, "object": change.obj}

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        key = self._key(request)
        async with self._lock:
            obj = self._live(key)
        if obj is None:
            raise self._not_found(key)
        return obj

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        self._require_known(request)
        resource = request.resource
        assert resource is not None
        if not isinstance(request.data, Mapping):
            raise _error(400, "BadRequest", "the body of a create must be a JSON object")
        obj = copy.deepcopy(dict(request.data))
        metadata = obj.get("metadata")
        if not isinstance(metadata, dict):
            metadata = obj["metadata"] = {}
        info = self._info(resource)
        namespaced = info is None or info.namespaced is not False
        namespace = (request.namespace or metadata.get("namespace")) if namespaced else None
        if request.namespace and metadata.get("namespace") not in (None, "", request.namespace):
            raise _error(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        api_version, kind = self._list_kind(resource)
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        async with self._lock:
            if not metadata.get("name"):
                prefix = metadata.get("generateName")
                if not prefix:
                    raise _error(
                        422,
                        "Invalid",
                        f"{kind}: metadata.name: Required value: name or generateName is required",
                    )
                while True:
                    suffix = "".join(secrets.choice(_GENERATE_ALPHABET) for _ in range(5))
                    metadata["name"] = f"{prefix}{suffix}"
                    if self._live((resource, namespace, metadata["name"])) is None:
                        break
            key: ObjectKey = (resource, namespace, metadata["name"])
            if self._live(key) is not None:
                raise _error(
                    409,
                    "AlreadyExists",
                    f'{resource.plural} "{metadata["name"]}" already exists',
                    name=metadata["name"],
                    kind=resource.plural,
                )
            if resource == SECRETS:
                self._fold_secret_string_data(obj)
            if info is not None and "status" in info.subresources:
                obj.pop("status", None)  # create cannot set a status the subresource owns
            if resource == PODS:
                obj["status"] = {"phase": "Pending"}
            if resource == NAMESPACES:
                obj["status"] = {"phase": "Active"}
            self._check_object(resource, obj)
            if namespace is not None:
                await self._ensure_namespace(namespace)
            obj["metadata"] = self._new_metadata(metadata, namespace)  # the newest version
            self._store(key, obj)
            await self._emit(resource, "ADDED", obj)
        return kmock.Response(status=201, payload=obj)

    async def _ensure_namespace(self, name: str) -> None:
        """Create the Namespace object of a namespace first used (a deviation: a real server
        refuses objects in a namespace that does not exist; tests need not create them)."""
        key: ObjectKey = (NAMESPACES, None, name)
        if self._live(key) is None:
            obj = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": self._new_metadata({"name": name}, None),
                "status": {"phase": "Active"},
            }
            self._store(key, obj)
            await self._emit(NAMESPACES, "ADDED", obj)

    async def add_namespace(self, name: str) -> None:
        """Make a namespace exist (kopf lists namespaces to find those it serves)."""
        async with self._lock:
            await self._ensure_namespace(name)

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        patch = request.data
        if content_type == "application/apply-patch+yaml":
            raise _error(415, "UnsupportedMediaType", "server-side apply is not emulated")
        if content_type == "application/json-patch+json" or isinstance(patch, list):
            if not isinstance(patch, list):
                raise _error(400, "BadRequest", "a JSON patch must be a list of operations")

            def apply(old: dict[str, Any]) -> dict[str, Any]:
                return jsonpatch.apply_patch(old, patch, in_place=False)

        else:  # merge-patch or strategic-merge-patch (lists replaced, as a merge patch does)
            if not isinstance(patch, Mapping):
                raise _error(400, "BadRequest", "a merge patch must be a JSON object")

            def apply(old: dict[str, Any]) -> dict[str, Any]:
                return _merge_patch(old, patch)

        return await self._update(request, apply)

    async def _serve_put_or_delete_all(self, request: kmock.Request) -> kmock.Payload:
        if request.method == kmock.method.PUT:
            body = request.data
            if not isinstance(body, Mapping):
                raise _error(400, "BadRequest", "the body of a replace must be a JSON object")
            name = (body.get("metadata") or {}).get("name")
            if name not in (None, request.name):
                raise _error(400, "BadRequest", "the name of the object does not match the URL")
            return await self._update(request, lambda old: copy.deepcopy(dict(body)))
        self._require_known(request)
        matches = self._selectors(request)
        deleted = []
        async with self._lock:
            for key, obj in self._live_items(request):
                if matches(obj):
                    deleted.append(await self._delete_object(key, obj))
        assert request.resource is not None
        api_version, kind = self._list_kind(request.resource)
        return {"apiVersion": api_version, "kind": f"{kind}List", "items": deleted}

    def _is_replace_or_collection_delete(self, request: kmock.Request) -> bool:
        if request.resource is None or request.resource.plural is None:
            return False
        if request.method == kmock.method.PUT:
            return request.name is not None
        return request.method == kmock.method.DELETE and request.name is None

    async def _update(
        self,
        request: kmock.Request,
        compute: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> kmock.Payload:
        """PATCH or PUT: ``compute`` makes the candidate from the stored object; the server's
        rules (preconditions, subresources, server-owned fields, finalizers) then apply."""
        key = self._key(request)
        resource = key[0]
        subresource = request.subresource or ""
        if subresource not in ("", "status"):
            raise _error(404, "NotFound", f"subresource {subresource!r} is not emulated")
        info = self._info(resource)
        if subresource and info is not None and subresource not in info.subresources:
            raise _error(404, "NotFound", f"{resource.plural} have no {subresource} subresource")
        async with self._lock:
            old = self._live(key)
            if old is None:
                raise self._not_found(key)
            try:
                candidate = compute(copy.deepcopy(old))
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise _error(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from None
            if not isinstance(candidate, dict):
                raise _error(422, "Invalid", "the patched object is not a JSON object")
            wanted = (candidate.get("metadata") or {}).get("resourceVersion")
            current = old["metadata"]["resourceVersion"]
            if wanted not in (None, "", current):
                raise _error(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {resource.plural} "{key[2]}": the object '
                    "has been modified; please apply your changes to the latest version and "
                    "try again",
                    name=key[2],
                    kind=resource.plural,
                )
            if subresource == "status":
                new = copy.deepcopy(old)
                new.pop("status", None)
                if candidate.get("status") is not None:
                    new["status"] = candidate["status"]
            else:
                new = candidate
                new.setdefault("apiVersion", old.get("apiVersion"))
                new.setdefault("kind", old.get("kind"))
                if self._has_status_subresource(resource):
                    new.pop("status", None)
                    if "status" in old:
                        new["status"] = old["status"]
            metadata = new.get("metadata")
            if not isinstance(metadata, dict):
                metadata = new["metadata"] = {}
            for field in ("name", "namespace", "uid", "creationTimestamp", "generation"):
                metadata.pop(field, None)
                if field in old["metadata"]:
                    metadata[field] = old["metadata"][field]
            for field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
                metadata.pop(field, None)
                if field in old["metadata"]:
                    metadata[field] = old["metadata"][field]
            metadata["resourceVersion"] = current
            if old["metadata"].get("deletionTimestamp"):
                added = set(metadata.get("finalizers") or []) - set(
                    old["metadata"].get("finalizers") or []
                )
                if added:
                    raise _error(
                        422,
                        "Invalid",
                        f"metadata.finalizers: Forbidden: no new finalizers can be added if "
                        f"the object is being deleted, found new finalizers {sorted(added)}",
                    )
            if resource == SECRETS:
                self._fold_secret_string_data(new)
            if new.get("spec") != old.get("spec"):
                metadata["generation"] = int(old["metadata"].get("generation") or 0) + 1
            self._check_object(resource, new)
            return await self._commit_update(key, old, new)

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        key = self._key(request)
        options = request.data if isinstance(request.data, Mapping) else {}
        policy = request.params.get("propagationPolicy") or options.get("propagationPolicy")
        preconditions = options.get("preconditions") or {}
        async with self._lock:
            obj = self._live(key)
            if obj is None:
                raise self._not_found(key)
            for field in ("uid", "resourceVersion"):
                if preconditions.get(field) not in (None, obj["metadata"].get(field)):
                    raise _error(
                        409,
                        "Conflict",
                        f"Precondition failed: {field} in precondition: {preconditions[field]}, "
                        f"{field} in object meta: {obj['metadata'].get(field)}",
                    )
            # Foreground is emulated as Background: the dependents go at once, either way.
            return await self._delete_object(key, obj, orphan=policy == "Orphan")


def declare_workflow_crd(emulator: ApiServerEmulator) -> None:
    """Make the emulator serve the Workflow resource of ``crds/workflow.yaml`` (discovery at
    /apis/dagkube.io/v1alpha1 with workflows and workflows/status, the CRD object, the schema)."""
    emulator.declare_crd(load_workflow_crd())


# --------------------------------------------------------------------------- the cluster


async def wait_for(
    condition: Callable[[], Awaitable[T | None] | T | None],
    timeout_s: float = 10.0,
    message: str = "condition",
) -> T:
    """Poll a condition (a coroutine function, or a plain one) until it returns something true
    (never a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        await asyncio.sleep(0.02)


@dataclass
class EmulatedCluster:
    """A served emulator: its URL for the code under test, and plain-HTTP helpers (sent with
    TEST_CLIENT_HEADER, so they stay out of ``emulator.api_calls()``)."""

    emulator: ApiServerEmulator
    url: str
    http: aiohttp.ClientSession

    # ----- generic

    async def get(self, path: str, **params: str) -> Any:
        """The JSON answer of a GET (any path, query parameters as keywords); None for 404."""
        async with self.http.get(path, params=params) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return await response.json()

    async def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.http.request(method, path, **kwargs) as response:
            if response.status >= 400:
                raise aiohttp.ClientResponseError(
                    response.request_info,
                    response.history,
                    status=response.status,
                    message=f"{response.reason}: {await response.text()}",
                    headers=response.headers,
                )
            return await response.json()

    async def _list(self, path: str, selector: str | None) -> dict[str, dict[str, Any]]:
        params = {"labelSelector": selector} if selector else {}
        answer = await self._send("GET", path, params=params)
        return {obj["metadata"]["name"]: obj for obj in answer["items"]}

    # ----- Pods

    @staticmethod
    def pods_path(namespace: str, name: str = "") -> str:
        return f"/api/v1/namespaces/{namespace}/pods" + (f"/{name}" if name else "")

    async def pods(self, namespace: str, selector: str | None = None) -> dict[str, dict[str, Any]]:
        """Every Pod of the namespace (matching the label selector, if any), by name."""
        return await self._list(self.pods_path(namespace), selector)

    async def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get(self.pods_path(namespace, name))

    async def create_pod(self, body: dict[str, Any]) -> dict[str, Any]:
        path = self.pods_path(body["metadata"]["namespace"])
        return await self._send("POST", path, json=body)

    async def set_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """What a kubelet does: merge-patch the Pod's status subresource."""
        await self._send(
            "PATCH",
            self.pods_path(namespace, name) + "/status",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def delete_pod(self, namespace: str, name: str) -> None:
        await self._send("DELETE", self.pods_path(namespace, name))

    # ----- Workflows

    @staticmethod
    def workflows_path(namespace: str, name: str = "") -> str:
        return f"/apis/dagkube.io/v1alpha1/namespaces/{namespace}/workflows" + (
            f"/{name}" if name else ""
        )

    async def create_workflow(
        self, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        """Create a Workflow (e.g. an example manifest) in ``namespace`` or the body's own;
        the stored object as the server answers it (defaulted, with uid...)."""
        obj = copy.deepcopy(dict(body))
        metadata = obj.setdefault("metadata", {})
        namespace = namespace or metadata.get("namespace") or "default"
        metadata["namespace"] = namespace
        obj.setdefault("apiVersion", "dagkube.io/v1alpha1")
        obj.setdefault("kind", "Workflow")
        return await self._send("POST", self.workflows_path(namespace), json=obj)

    async def workflow(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.get(self.workflows_path(namespace, name))

    async def workflows(
        self, namespace: str, selector: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Every Workflow of the namespace (matching the label selector, if any), by name."""
        return await self._list(self.workflows_path(namespace), selector)

    async def delete_workflow(self, namespace: str, name: str) -> bool:
        """Delete a Workflow (its owned Pods go with it); False if there was none."""
        async with self.http.delete(self.workflows_path(namespace, name)) as response:
            if response.status == 404:
                return False
            response.raise_for_status()
            return True

    async def patch_workflow(
        self, namespace: str, name: str, patch: Mapping[str, Any], *, status: bool = False
    ) -> dict[str, Any]:
        """Merge-patch a Workflow (or, with ``status``, its status subresource)."""
        return await self._send(
            "PATCH",
            self.workflows_path(namespace, name) + ("/status" if status else ""),
            json=patch,
            headers={"Content-Type": "application/merge-patch+json"},
        )

    # ----- Namespaces, Secrets and Events

    async def create_namespace(self, name: str) -> dict[str, Any]:
        """Create a Namespace (objects created in a missing namespace create it too)."""
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        return await self._send("POST", "/api/v1/namespaces", json=body)

    async def create_secret(
        self, namespace: str, name: str, string_data: Mapping[str, str]
    ) -> dict[str, Any]:
        """Create an Opaque Secret from plain strings (stored base64-encoded in ``data``)."""
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "type": "Opaque",
            "stringData": dict(string_data),
        }
        return await self._send("POST", f"/api/v1/namespaces/{namespace}/secrets", json=body)

    async def events(self, namespace: str) -> list[dict[str, Any]]:
        """The core/v1 Events of the namespace (what kopf posts), oldest first."""
        answer = await self._send("GET", f"/api/v1/namespaces/{namespace}/events")
        return sorted(answer["items"], key=lambda event: int(event["metadata"]["resourceVersion"]))


def terminated(phase: str, exit_code: int, container: str = "worker") -> dict[str, Any]:
    """A Pod status whose container ended with ``exit_code``."""
    return {
        "phase": phase,
        "containerStatuses": [
            {"name": container, "state": {"terminated": {"exitCode": exit_code}}}
        ],
    }


@contextlib.asynccontextmanager
async def kubernetes_api(*, workflow_crd: bool = True) -> AsyncIterator[EmulatedCluster]:
    """Serve a fresh ApiServerEmulator (built-in kinds, and the Workflow CRD unless told not
    to) for the duration of the block."""
    async with ApiServerEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        if workflow_crd:
            declare_workflow_crd(emulator)
        await emulator.add_namespace("default")
        url = str(server.url).rstrip("/")
        headers = {TEST_CLIENT_HEADER: "emulated-cluster"}
        async with aiohttp.ClientSession(base_url=url, headers=headers) as http:
            yield EmulatedCluster(emulator, url, http)
