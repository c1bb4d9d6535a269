#!/usr/bin/env bash
# Build the operator and worker images (`make images`), with docker, or podman where docker is
# missing. Names match the chart's defaults: ${IMAGE_PREFIX}/operator:${TAG} and .../worker:${TAG}.
#
#   tools/build_images.sh            # ghcr.io/dagkube/{operator,worker}:<chart appVersion>
#   IMAGE_PREFIX=localhost/dk TAG=dev tools/build_images.sh
#   CONTAINER_TOOL=podman tools/build_images.sh
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${IMAGE_PREFIX:-ghcr.io/dagkube}"
tag="${TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$root/charts/dagkube/Chart.yaml")}"

tool="${CONTAINER_TOOL:-}"
if [ -z "$tool" ]; then
    for candidate in docker podman; do
        if command -v "$candidate" >/dev/null 2>&1; then
            tool="$candidate"
            break
        fi
    done
fi
if [ -z "$tool" ]; then
    echo "build_images.sh: neither docker nor podman is installed: install one of them" \
        "to build the dagkube images" >&2
    exit 2
fi
if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build_images.sh: CONTAINER_TOOL=$tool is not installed (use docker or podman)" >&2
    exit 2
fi
if ! "$tool" info >/dev/null 2>&1; then
    echo "build_images.sh: $tool is installed but cannot build here ('$tool info' fails:" \
        "is its daemon running and reachable? CONTAINER_TOOL picks another tool)" >&2
    exit 2
fi
if [ -z "$tag" ]; then
    echo "build_images.sh: no TAG given and no appVersion in charts/dagkube/Chart.yaml" >&2
    exit 2
fi

build() {  # build <Dockerfile> <image>
    echo "==> $tool build -f $1 -t $2 $root"
    "$tool" build -f "$root/$1" -t "$2" "$root"
}

build operator/Dockerfile "$prefix/operator:$tag"
build worker-image/Dockerfile "$prefix/worker:$tag"
echo "built $prefix/operator:$tag and $prefix/worker:$tag"
