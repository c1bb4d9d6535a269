#!/usr/bin/env bash
# Builds the local control plane's binaries from Go modules and caches them by version outside the
# checkout: kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy and kubectl from
# k8s.io/kubernetes (wrapper module tools/cluster/k8s), etcd from go.etcd.io/etcd/server/v3
# (wrapper module tools/cluster/etcd). A cache entry is reused while its wrapper's go.mod and go.sum
# are unchanged; the build of one entry goes to a temporary folder that is renamed into place, so an
# interrupted build never leaves a half-filled cache.
#
#   tools/cluster/build.sh            build what is missing, print the cache folder of each entry
#   tools/cluster/build.sh --print    print the folders without building (exit 1 if one is missing)
#
# Environment: DAGKUBE_CACHE (default ~/.cache/dagkube). Go's own module and build caches are used
# as they are configured (GOMODCACHE, GOCACHE), so a second build of another version is quicker.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${DAGKUBE_CACHE:-$HOME/.cache/dagkube}"
PRINT_ONLY=0
[ "${1:-}" = "--print" ] && PRINT_ONLY=1

export GOTOOLCHAIN=local   # an error, never a silent toolchain download
export CGO_ENABLED=0       # static binaries, as upstream builds them
export GOFLAGS="-trimpath -mod=readonly"

if ! command -v go >/dev/null; then
    echo "build.sh: the local control plane is built with Go (>= 1.26), and 'go' is not on PATH" >&2
    exit 2
fi

# The version a wrapper requires, read from its go.mod (one place to change it).
required_version() { # <wrapper dir> <module path>
    awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$1/go.mod"
}

# A stamp of the inputs that decide what the build produces (this script included).
inputs_stamp() { # <wrapper dir>
    { go env GOVERSION; cat "$1/go.mod" "$1/go.sum" "$0"; } | sha256sum | cut -c1-16
}

# -o: a folder for several packages (binaries named after them), a file name for one.
build_entry() { # <name> <wrapper dir> <-o target inside the entry> -- <packages...>
    local name="$1" dir="$2" target="$3"; shift 3
    local out="$CACHE/$name" stamp
    stamp="$(inputs_stamp "$dir")"
    if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
        echo "$out"; return 0
    fi
    if [ "$PRINT_ONLY" = 1 ]; then
        echo "build.sh: $out is not built (run tools/cluster/build.sh)" >&2; return 1
    fi
    local ldflags="$LDFLAGS" packages=() started
    shift  # --
    packages=("$@")
    mkdir -p "$CACHE"
    local tmp; tmp="$(mktemp -d "$CACHE/.$name.XXXXXX")"
    chmod 755 "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    started=$(date +%s)
    echo "build.sh: building $name into $out ..." >&2
    (cd "$dir" && go build -ldflags "$ldflags" -o "$tmp/$target" "${packages[@]}")
    echo "$stamp" > "$tmp/.stamp"
    echo "$(( $(date +%s) - started ))" > "$tmp/.build-seconds"
    rm -rf "$out"
    mv "$tmp" "$out"
    trap - EXIT
    echo "build.sh: $name built in $(cat "$out/.build-seconds") s" >&2
    echo "$out"
}

K8S_VERSION="$(required_version "$HERE/k8s" k8s.io/kubernetes)"
ETCD_VERSION="$(required_version "$HERE/etcd" go.etcd.io/etcd/server/v3)"
if [ -z "$K8S_VERSION" ] || [ -z "$ETCD_VERSION" ]; then
    echo "build.sh: cannot read the required versions from tools/cluster/{k8s,etcd}/go.mod" >&2
    exit 2
fi

# Version stamps: without them /version reports v0.0.0-master and Helm's kubeVersion checks break.
major="${K8S_VERSION#v}"; major="${major%%.*}"
minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
LDFLAGS="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    LDFLAGS+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    LDFLAGS+=" -X $p.gitTreeState=clean -X $p.gitCommit=0000000000000000000000000000000000000000"
    LDFLAGS+=" -X $p.buildDate=1970-01-01T00:00:00Z"
done
build_entry "k8s-$K8S_VERSION" "$HERE/k8s" "" -- \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl

LDFLAGS="-s -w"
build_entry "etcd-$ETCD_VERSION" "$HERE/etcd" etcd -- go.etcd.io/etcd/server/v3

if [ "$PRINT_ONLY" = 0 ]; then
    reported="$("$CACHE/k8s-$K8S_VERSION/kube-apiserver" --version)"
    if [ "$reported" != "Kubernetes $K8S_VERSION" ]; then
        echo "build.sh: kube-apiserver reports '$reported', expected 'Kubernetes $K8S_VERSION'" >&2
        exit 1
    fi
fi
