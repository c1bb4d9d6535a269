"""A provisioner for PersistentVolumeClaims: the cluster's default StorageClass ``local`` gives
each claim a folder of the cluster (``volumes/pvc-<uid>``) as a hostPath PersistentVolume; the
controller manager's volume binder binds the two. A released volume (its claim deleted) is
removed with its folder, as the class's ``reclaimPolicy: Delete`` says."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from localcluster.agent.api import Api, ApiError

log = logging.getLogger("localcluster.storage")

CLASS = "local"
PROVISIONER = "dagkube.io/local-path"


class Provisioner:
    def __init__(self, api: Api, root: Path) -> None:
        self.api = api
        self.root = root

    async def ensure_class(self) -> None:
        body = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
        try:
            await self.api.create("/apis/storage.k8s.io/v1/storageclasses", body)
        except ApiError as exc:
            if exc.status != 409:
                raise

    def _ours(self, claim: dict) -> bool:
        spec, annotations = claim.get("spec") or {}, claim["metadata"].get("annotations") or {}
        asked = annotations.get("volume.kubernetes.io/storage-provisioner") or annotations.get(
            "volume.beta.kubernetes.io/storage-provisioner"
        )
        return asked == PROVISIONER or (asked is None and spec.get("storageClassName") == CLASS)

    async def claim_event(self, kind: str, obj: Any) -> None:
        claims = obj if kind == "SYNC" else [obj]
        if kind == "DELETED":
            return
        for claim in claims:
            if (claim.get("spec") or {}).get("volumeName") or not self._ours(claim):
                continue
            if (claim.get("status") or {}).get("phase") not in (None, "Pending"):
                continue
            await self._provision(claim)

    async def _provision(self, claim: dict) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        name = f"pvc-{meta['uid']}"
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)  # the claim's Pod may run as any user
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER},
            },
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": spec.get("storageClassName") or CLASS,
                "hostPath": {"path": str(folder), "type": "DirectoryOrCreate"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            await self.api.create("/api/v1/persistentvolumes", volume)
            log.info("provisioned %s for %s/%s", name, meta["namespace"], meta["name"])
        except ApiError as exc:
            if exc.status != 409:
                log.warning("cannot provision %s: %s", name, exc)

    async def volume_event(self, kind: str, obj: Any) -> None:
        volumes = obj if kind == "SYNC" else [obj]
        if kind == "DELETED":
            return
        for volume in volumes:
            annotations = volume["metadata"].get("annotations") or {}
            if annotations.get("pv.kubernetes.io/provisioned-by") != PROVISIONER:
                continue
            if (volume.get("status") or {}).get("phase") != "Released":
                continue
            if (volume.get("spec") or {}).get("persistentVolumeReclaimPolicy") != "Delete":
                continue
            path = Path(volume["spec"]["hostPath"]["path"])
            if path.parent == self.root:
                shutil.rmtree(path, ignore_errors=True)
            await self.api.delete(f"/api/v1/persistentvolumes/{volume['metadata']['name']}")
