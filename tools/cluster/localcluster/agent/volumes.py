"""What a container sees besides its command: environment variables (literal, from Secrets,
ConfigMaps and the Pod's own fields, Service links) and volumes materialized as folders of the
Pod (emptyDir, Secret, ConfigMap, projected service-account tokens from the TokenRequest API,
downward API, hostPath, PersistentVolumeClaims bound to local volumes)."""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path
from typing import Any

from localcluster.agent.api import Api, ApiError

TOKEN_SECONDS = 3607  # what the kubelet asks for (an hour, plus a little)
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


class ConfigError(Exception):
    """The container cannot be configured (CreateContainerConfigError)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references in command, args and env values ($$ escapes a $)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, text)


def field_value(pod: dict, path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise ConfigError(f"fieldRef {path!r} is not supported by the local node agent")


class Resolver:
    """Reads the Secrets and ConfigMaps a Pod references (as the node, which may read only
    those of its own Pods) once per Pod."""

    def __init__(self, api: Api, pod: dict) -> None:
        self.api = api
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self._cache: dict[tuple[str, str], dict[str, str] | None] = {}

    async def data(self, kind: str, name: str, optional: bool = False) -> dict[str, str]:
        key = (kind, name)
        if key not in self._cache:
            plural = "secrets" if kind == "Secret" else "configmaps"
            try:
                obj = await self.api.get(f"/api/v1/namespaces/{self.namespace}/{plural}/{name}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                self._cache[key] = None
            else:
                values = dict(obj.get("data") or {})
                if kind == "Secret":
                    values = {k: base64.b64decode(v).decode() for k, v in values.items()}
                else:
                    for k, v in (obj.get("binaryData") or {}).items():
                        values[k] = base64.b64decode(v).decode(errors="replace")
                self._cache[key] = values
        found = self._cache[key]
        if found is None:
            if optional:
                return {}
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        return found


async def environment(
    resolver: Resolver,
    container: dict,
    base: dict[str, str],
    service_env: dict[str, str],
) -> dict[str, str]:
    """The container's environment: the image's, the Service links, envFrom, then env."""
    pod = resolver.pod
    env = {**base, **service_env, "HOSTNAME": pod["metadata"]["name"]}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, ref in (
            ("Secret", source.get("secretRef")),
            ("ConfigMap", source.get("configMapRef")),
        ):
            if ref:
                values = await resolver.data(kind, ref["name"], bool(ref.get("optional")))
                env.update({prefix + k: v for k, v in values.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom") or {}
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            kind = "Secret" if "secretKeyRef" in source else "ConfigMap"
            ref = source.get("secretKeyRef") or source.get("configMapKeyRef") or {}
            values = await resolver.data(kind, ref["name"], bool(ref.get("optional")))
            if ref["key"] not in values:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
            env[name] = values[ref["key"]]
        elif "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = _resource_field(container, source["resourceFieldRef"])
        else:
            env[name] = ""
    return env


def _resource_field(container: dict, ref: dict) -> str:
    from localcluster.agent.quantity import cpu_millis, memory_bytes

    kind, _, resource = ref["resource"].partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(resource)
    divisor = ref.get("divisor", "1")
    if value is None:
        return "0"
    if resource == "cpu":
        return str(-(-cpu_millis(value) // cpu_millis(divisor)))
    return str(-(-memory_bytes(value) // memory_bytes(divisor)))


def _write_files(
    folder: Path, files: dict[str, str], mode: int, uid: int | None, gid: int | None
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(content)
        os.chmod(tmp, mode)
        if uid is not None or gid is not None:
            os.chown(tmp, -1 if uid is None else uid, -1 if gid is None else gid)
        os.replace(tmp, target)


def _items(values: dict[str, str], items: list[dict] | None) -> dict[str, str]:
    if not items:
        return dict(values)
    return {i["path"]: values[i["key"]] for i in items if i["key"] in values}


async def service_account_token(api: Api, pod: dict, source: dict) -> str:
    meta = pod["metadata"]
    account = pod["spec"].get("serviceAccountName") or "default"
    body: dict[str, Any] = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [source["audience"]] if source.get("audience") else None,
            "expirationSeconds": int(source.get("expirationSeconds") or TOKEN_SECONDS),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
    reply = await api.create(path, body)
    return str(reply["status"]["token"])


async def materialize(
    resolver: Resolver,
    volume: dict,
    folder: Path,
    *,
    fs_group: int | None,
    volumes_root: Path,
) -> Path:
    """Fill ``folder`` with what ``volume`` holds; returns the host path to mount."""
    kind = next((k for k in volume if k != "name"), "")
    source_spec = volume.get(kind)
    mode_default = (
        int(source_spec.get("defaultMode", 0o644)) if isinstance(source_spec, dict) else 0o644
    )
    if "emptyDir" in volume:
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o777 if fs_group is None else 0o2775)
        if fs_group is not None:
            os.chown(folder, 0, fs_group)
        return folder
    if "hostPath" in volume:
        path = Path(volume["hostPath"]["path"])
        kind = volume["hostPath"].get("type", "")
        if kind == "DirectoryOrCreate":
            path.mkdir(parents=True, exist_ok=True)
        elif not path.exists() and kind not in ("", "FileOrCreate"):
            raise ConfigError(f"hostPath {path} does not exist")
        return path
    if "secret" in volume:
        source = volume["secret"]
        values = await resolver.data("Secret", source["secretName"], bool(source.get("optional")))
        _write_files(folder, _items(values, source.get("items")), mode_default, None, fs_group)
        return folder
    if "configMap" in volume:
        source = volume["configMap"]
        values = await resolver.data("ConfigMap", source["name"], bool(source.get("optional")))
        _write_files(folder, _items(values, source.get("items")), mode_default, None, fs_group)
        return folder
    if "projected" in volume:
        files: dict[str, str] = {}
        for source in volume["projected"].get("sources") or []:
            if "serviceAccountToken" in source:
                token = source["serviceAccountToken"]
                files[token["path"]] = await service_account_token(
                    resolver.api, resolver.pod, token
                )
            elif "configMap" in source:
                ref = source["configMap"]
                values = await resolver.data("ConfigMap", ref["name"], bool(ref.get("optional")))
                files.update(_items(values, ref.get("items")))
            elif "secret" in source:
                ref = source["secret"]
                values = await resolver.data("Secret", ref["name"], bool(ref.get("optional")))
                files.update(_items(values, ref.get("items")))
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    if "fieldRef" in item:
                        files[item["path"]] = field_value(
                            resolver.pod, item["fieldRef"]["fieldPath"]
                        )
        mode = int(volume["projected"].get("defaultMode", 0o644))
        _write_files(folder, files, mode, None, fs_group)
        return folder
    if "downwardAPI" in volume:
        files = {
            item["path"]: field_value(resolver.pod, item["fieldRef"]["fieldPath"])
            for item in volume["downwardAPI"].get("items") or []
            if "fieldRef" in item
        }
        _write_files(folder, files, 0o644, None, fs_group)
        return folder
    if "persistentVolumeClaim" in volume:
        return await _claim_path(
            resolver, volume["persistentVolumeClaim"]["claimName"], volumes_root
        )
    kinds = ", ".join(k for k in volume if k != "name")
    raise ConfigError(f"volume {volume['name']!r}: kind {kinds} is not supported by the local node")


async def _claim_path(resolver: Resolver, claim: str, volumes_root: Path) -> Path:
    namespace = resolver.namespace
    pvc = await resolver.api.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
    volume_name = (pvc.get("spec") or {}).get("volumeName")
    if not volume_name:
        raise ConfigError(f"persistentvolumeclaim {claim!r} is not bound")
    pv = await resolver.api.get(f"/api/v1/persistentvolumes/{volume_name}")
    spec = pv.get("spec") or {}
    path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
    if not path:
        raise ConfigError(f"persistentvolume {volume_name!r} is neither hostPath nor local")
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
