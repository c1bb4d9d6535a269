#!/usr/bin/env bash
# The kind end-to-end tier (`make e2e-kind`): a real Kubernetes cluster in Docker running the
# operator and worker images built from this checkout, installed with the Helm chart.
#
#   1. checks the prerequisites: a reachable Docker engine, kind, helm and kubectl;
#   2. creates the kind cluster of kind-config.yaml (or reuses one of the same name);
#   3. builds both images (tools/build_images.sh) and loads them into the cluster;
#   4. installs charts/dagkube and waits for Redis and the operator Deployment;
#   5. applies examples/manifests/workflow-{module,inline}.yaml, waits for Succeeded and checks
#      their status (runId, tasks done == total, makespan, workers);
#   6. reads the operator's /metrics through the API server's service proxy;
#   7. applies tests/e2e/workflow-long.yaml, waits until it is Running with worker Pods,
#      deletes it and checks that its Pods are gone;
#   8. deletes the cluster it created, unless KEEP_CLUSTER=1.
#
# On failure it prints the Workflows, Pods, operator logs and events before tearing down.
# Exit status: 0 passed, 1 failed, 77 a prerequisite is missing (nothing was started).
#
#   tools/e2e_kind.sh              # the whole run
#   tools/e2e_kind.sh --check      # only the prerequisite checks (exit 0 or 77)
#   KEEP_CLUSTER=1 tools/e2e_kind.sh
#
# Settings (environment): KEEP_CLUSTER=1 keeps the cluster (a cluster that already existed is
# always kept), CLUSTER_NAME (dagkube-e2e), NAMESPACE (dagkube-e2e), RELEASE (dagkube),
# IMAGE_PREFIX (localhost/dagkube), TAG (e2e), SKIP_BUILD=1 loads images built before,
# KIND (path of kind), KIND_VERSION (v0.29.0, for `go install` when kind is missing),
# KIND_NODE_IMAGE (kindest/node:vX.Y.Z), WORKFLOW_TIMEOUT (600 s), E2E_WORKDIR (build/e2e-kind).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cluster="${CLUSTER_NAME:-dagkube-e2e}"
namespace="${NAMESPACE:-dagkube-e2e}"
release="${RELEASE:-dagkube}"
image_prefix="${IMAGE_PREFIX:-localhost/dagkube}"
tag="${TAG:-e2e}"
kind_version="${KIND_VERSION:-v0.29.0}"
workflow_timeout="${WORKFLOW_TIMEOUT:-600}"
workdir="${E2E_WORKDIR:-$root/build/e2e-kind}"
tools_bin="$root/.tools/bin"
operator_image="$image_prefix/operator:$tag"
worker_image="$image_prefix/worker:$tag"
examples=(workflow-module.yaml workflow-inline.yaml)
long_manifest="$root/tests/e2e/workflow-long.yaml"
long_workflow="e2e-long-sleep"

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
info() { printf '    %s\n' "$*"; }
fail() { printf 'e2e_kind.sh: FAILED: %s\n' "$*" >&2; exit 1; }
skip() { printf 'e2e_kind.sh: SKIP: %s\n' "$*" >&2; exit 77; }

# ------------------------------------------------------------------ prerequisites
find_python() {
    if [ -x "$root/.venv/bin/python" ]; then
        python="$root/.venv/bin/python"
    elif command -v python3 >/dev/null 2>&1; then
        python="$(command -v python3)"
    else
        skip "python3 is needed for the JSON checks (make e2e-kind creates .venv)"
    fi
}

check_docker() {
    command -v docker >/dev/null 2>&1 \
        || skip "kind e2e needs a Docker engine: docker is not installed"
    local out limit=()
    if command -v timeout >/dev/null 2>&1; then
        limit=(timeout 60)
    fi
    if ! out="$(${limit[@]+"${limit[@]}"} docker info 2>&1 >/dev/null)"; then
        skip "kind e2e needs a Docker engine: 'docker info' fails" \
            "($(printf '%s' "$out" | tail -n 1))"
    fi
}

# find_kind run|check: $KIND, kind on PATH, .tools/bin/kind, or (run only) `go install` it there.
find_kind() {
    if [ -n "${KIND:-}" ]; then
        [ -x "$KIND" ] || skip "KIND=$KIND is not an executable"
        kind="$KIND"
    elif command -v kind >/dev/null 2>&1; then
        kind="$(command -v kind)"
    elif [ -x "$tools_bin/kind" ]; then
        kind="$tools_bin/kind"
    elif command -v go >/dev/null 2>&1; then
        kind="$tools_bin/kind"
        if [ "$1" = check ]; then
            kind="$kind (go install sigs.k8s.io/kind@$kind_version when run)"
            return
        fi
        step "kind is missing: go install sigs.k8s.io/kind@$kind_version into .tools/bin"
        mkdir -p "$tools_bin"
        GOBIN="$tools_bin" go install "sigs.k8s.io/kind@$kind_version" \
            || skip "kind is missing and go install sigs.k8s.io/kind@$kind_version failed"
    else
        skip "kind e2e needs kind (https://kind.sigs.k8s.io), which no package registry this" \
            "project uses ships: put it on PATH or at .tools/bin/kind, e.g. curl -Lo" \
            ".tools/bin/kind https://kind.sigs.k8s.io/dl/$kind_version/kind-linux-amd64 &&" \
            "chmod +x .tools/bin/kind (or install Go: go install sigs.k8s.io/kind@$kind_version)"
    fi
}

# find_k8s_tools run|check: helm and kubectl of .tools/bin (make k8s-tools), fetched if missing.
find_k8s_tools() {
    helm="$tools_bin/helm"
    kubectl="$tools_bin/kubectl"
    if [ -x "$helm" ] && [ -x "$kubectl" ]; then
        return
    fi
    if [ "$1" = check ]; then
        helm="$helm (fetched by tools/k8s_binaries.py when run)"
        return
    fi
    step "helm/kubectl missing in .tools/bin: tools/k8s_binaries.py (as make k8s-tools does)"
    "$python" "$root/tools/k8s_binaries.py" --dest "$tools_bin" \
        || skip "no helm/kubectl in .tools/bin and tools/k8s_binaries.py failed: make k8s-tools"
}

mode=run
case "${1:-}" in
    "") ;;
    --check) mode=check ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

step "prerequisites"
find_python
check_docker
find_kind "$mode"
find_k8s_tools "$mode"
info "docker $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '(version?)')"
info "kind: $kind"
info "helm: $helm"
if [ "$mode" = check ]; then
    exit 0
fi

mkdir -p "$workdir"
export KUBECONFIG="$workdir/kubeconfig"
k() { "$kubectl" "$@"; }
kn() { "$kubectl" -n "$namespace" "$@"; }

# ------------------------------------------------------------------ teardown and diagnostics
created_cluster=0
diagnostics() {
    echo
    echo "================ diagnostics ================"
    if ! k version --request-timeout=10s >/dev/null 2>&1; then
        echo "the cluster's API server does not answer: no diagnostics"
        return
    fi
    k get dkwf,pods -A -o wide || true
    echo "---- Workflows (yaml)"
    kn get dkwf -o yaml || true
    echo "---- operator logs"
    kn logs "deployment/${operator_deployment:-$release-operator}" --all-containers --tail=400 \
        || true
    kn logs "deployment/${operator_deployment:-$release-operator}" --all-containers --previous \
        --tail=100 2>/dev/null || true
    echo "---- Pods not Running"
    kn describe pods --field-selector=status.phase!=Running,status.phase!=Succeeded || true
    echo "---- worker logs (up to 5 Pods)"
    local pod
    for pod in $(kn get pods -l dagkube.io/component=worker -o name 2>/dev/null | head -n 5); do
        echo "-- $pod"
        kn logs "$pod" --tail=60 || true
    done
    echo "---- events"
    k get events -A --sort-by=.lastTimestamp | tail -n 120 || true
    echo "============================================="
}

finish() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$status" -ne 0 ] && [ -s "$KUBECONFIG" ]; then
        diagnostics
    fi
    if [ "$created_cluster" = 1 ]; then
        if [ "${KEEP_CLUSTER:-0}" = 1 ]; then
            step "KEEP_CLUSTER=1: cluster $cluster kept (export KUBECONFIG=$KUBECONFIG;" \
                "delete it with: $kind delete cluster --name $cluster)"
        else
            step "deleting cluster $cluster"
            "$kind" delete cluster --name "$cluster" || true
        fi
    elif [ -n "${reused:-}" ]; then
        step "cluster $cluster existed before this run and is kept (export KUBECONFIG=$KUBECONFIG)"
    fi
    if [ "$status" -eq 0 ]; then
        step "kind e2e PASSED"
    else
        printf '\n==> kind e2e FAILED (exit %s)\n' "$status" >&2
    fi
    exit "$status"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------ helpers
# phase_of <workflow>: its status.phase, empty while it has none (or does not exist).
phase_of() {
    kn get "workflows.dagkube.io/$1" -o jsonpath='{.status.phase}' 2>/dev/null || true
}

# wait_phase <workflow> <phase> <timeout s>: kubectl wait in short slices, failing early when the
# Workflow ends in another phase (Failed, or Succeeded while Running is awaited).
wait_phase() {
    local name="$1" want="$2" deadline=$((SECONDS + $3)) phase last="-"
    while true; do
        if kn wait "workflows.dagkube.io/$name" --for=jsonpath='{.status.phase}'="$want" \
            --timeout=5s >/dev/null 2>&1; then
            info "$name: $want"
            return 0
        fi
        phase="$(phase_of "$name")"
        if [ "$phase" != "$last" ]; then
            info "$name: phase ${phase:-<none yet>}"
            last="$phase"
        fi
        if [ "$phase" = Failed ] || { [ "$want" = Running ] && [ "$phase" = Succeeded ]; }; then
            fail "$name reached $phase while waiting for $want: $(kn get \
                "workflows.dagkube.io/$name" -o jsonpath='{.status.message}' 2>/dev/null || true)"
        fi
        [ "$SECONDS" -lt "$deadline" ] || fail "$name not $want within $3 s (phase ${phase:-none})"
        sleep 1
    done
}

# check_status <workflow>: the status fields of a Succeeded run (retried briefly: the operator
# may write the last counters just after the phase).
check_status() {
    local name="$1" file="$workdir/$1.json" deadline=$((SECONDS + 60)) out
    while true; do
        kn get "workflows.dagkube.io/$name" -o json >"$file"
        if out="$("$python" - "$file" 2>&1 <<'PY'
import json
import sys

with open(sys.argv[1]) as handle:
    status = json.load(handle).get("status") or {}
tasks = status.get("tasks") or {}
workers = status.get("workers") or {}
problems = []
if status.get("phase") != "Succeeded":
    problems.append(f"phase is {status.get('phase')!r}")
if not status.get("runId"):
    problems.append("status.runId is empty")
if not isinstance(tasks.get("total"), int) or tasks["total"] < 1:
    problems.append(f"status.tasks.total is {tasks.get('total')!r}")
elif tasks.get("done") != tasks["total"]:
    problems.append(f"status.tasks.done {tasks.get('done')!r} != total {tasks['total']}")
if tasks.get("failed"):
    problems.append(f"status.tasks.failed is {tasks['failed']}")
makespan = status.get("actualMakespanSeconds")
if not isinstance(makespan, (int, float)) or makespan <= 0:
    problems.append(f"status.actualMakespanSeconds is {makespan!r}")
started = sum(v for v in workers.values() if isinstance(v, int))
if started < 1:
    problems.append(f"status.workers {workers!r} counts no worker")
if problems:
    print("; ".join(problems))
    sys.exit(1)
print(
    f"runId {status['runId']}, tasks {tasks['done']}/{tasks['total']}, makespan "
    f"{makespan:.2f} s, workers {workers}, planner {status.get('planner')} "
    f"sla {status.get('sla')}, predicted {status.get('predictedMakespanSeconds')} s"
)
PY
)"; then
            info "$name: $out"
            return 0
        fi
        [ "$SECONDS" -lt "$deadline" ] || fail "$name status: $out"
        sleep 3
    done
}

# workflow_pods <run id> <uid>: names of the Pods of one run, by the dagkube.io/run label or by
# an ownerReference to the Workflow.
workflow_pods() {
    kn get pods -o json >"$workdir/pods.json"
    "$python" - "$workdir/pods.json" "$1" "$2" <<'PY'
import json
import sys

path, run_id, uid = sys.argv[1:]
with open(path) as handle:
    pods = json.load(handle)["items"]
for pod in pods:
    meta = pod["metadata"]
    owned = any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or [])
    if owned or (run_id and (meta.get("labels") or {}).get("dagkube.io/run") == run_id):
        print(f"{meta['name']} {pod.get('status', {}).get('phase', '?')}")
PY
}

# check_metrics <file>: the operator's metric families, with the counts this run must have.
check_metrics() {
    "$python" - "$1" <<'PY'
import re
import sys

sample = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
values: dict[str, list[tuple[str, float]]] = {}
with open(sys.argv[1]) as handle:
    for line in handle:
        match = sample.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            values.setdefault(name, []).append((labels or "", float(value)))


def total(name: str, phase: str | None = None) -> float:
    return sum(
        value
        for labels, value in values.get(name, [])
        if phase is None or f'phase="{phase}"' in labels
    )


problems = []
for name in (
    "dagkube_operator_workflows",
    "dagkube_operator_pods_created_total",
    "dagkube_operator_workflows_finished_total",
):
    if name not in values:
        problems.append(f"no {name} samples")
if not any('phase="' in labels for labels, _ in values.get("dagkube_operator_workflows", [])):
    problems.append("dagkube_operator_workflows has no phase label")
if total("dagkube_operator_workflows", "Succeeded") < 2:
    problems.append('dagkube_operator_workflows{phase="Succeeded"} < 2')
if total("dagkube_operator_workflows_finished_total", "Succeeded") < 2:
    problems.append('dagkube_operator_workflows_finished_total{phase="Succeeded"} < 2')
if total("dagkube_operator_pods_created_total") < 1:
    problems.append("dagkube_operator_pods_created_total < 1")
if problems:
    print("; ".join(problems))
    sys.exit(1)
for name in sorted(values):
    if name.startswith("dagkube_operator_"):
        for labels, value in values[name]:
            print(f"{name}{labels} {value:g}")
PY
}

# load_image <image>: kind load docker-image, or through a saved archive where Docker's
# containerd image store breaks the direct load ("content digest ... not found").
load_image() {
    if "$kind" load docker-image --name "$cluster" "$1"; then
        return 0
    fi
    info "kind load docker-image $1 failed: retrying through docker save + kind load image-archive"
    local archive="$workdir/image.tar"
    docker image save -o "$archive" "$1"
    "$kind" load image-archive --name "$cluster" "$archive"
    rm -f "$archive"
}

# ------------------------------------------------------------------ the run
if "$kind" get clusters 2>/dev/null | grep -qx "$cluster"; then
    step "reusing the existing kind cluster $cluster"
    reused=1
else
    step "creating kind cluster $cluster from kind-config.yaml"
    created_cluster=1
    image_args=()
    if [ -n "${KIND_NODE_IMAGE:-}" ]; then
        image_args=(--image "$KIND_NODE_IMAGE")
    fi
    "$kind" create cluster --name "$cluster" --config "$root/kind-config.yaml" \
        --kubeconfig "$KUBECONFIG" --wait 180s ${image_args[@]+"${image_args[@]}"}
fi
"$kind" export kubeconfig --name "$cluster" --kubeconfig "$KUBECONFIG"
k cluster-info
node_format='{range .items[*]}{.metadata.name}: allocatable cpu {.status.allocatable.cpu}'
node_format+=', memory {.status.allocatable.memory}'
node_format+=', kubelet {.status.nodeInfo.kubeletVersion}{"\n"}{end}'
k get nodes -o jsonpath="$node_format" | sed 's/^/    node /'

if [ "${SKIP_BUILD:-0}" = 1 ]; then
    step "SKIP_BUILD=1: using the images built before ($operator_image, $worker_image)"
else
    step "building $operator_image and $worker_image (tools/build_images.sh)"
    CONTAINER_TOOL=docker IMAGE_PREFIX="$image_prefix" TAG="$tag" "$root/tools/build_images.sh"
fi

step "loading the images into the cluster"
load_image "$operator_image"
load_image "$worker_image"
redis_image="$(sed -n '/^redis:/,/^[a-z]/{s/^    repository: *//p;s/^    tag: *//p;}' \
    "$root/charts/dagkube/values.yaml" | head -n 2 | paste -sd: -)"
if [ -n "$redis_image" ] && docker image inspect "$redis_image" >/dev/null 2>&1; then
    load_image "$redis_image"
else
    info "${redis_image:-the Redis image} is not in the local Docker: the node pulls it"
fi

step "helm upgrade --install $release charts/dagkube (namespace $namespace)"
"$helm" upgrade --install "$release" "$root/charts/dagkube" \
    --namespace "$namespace" --create-namespace \
    --set operator.image.repository="$image_prefix/operator" \
    --set operator.image.tag="$tag" \
    --set operator.image.pullPolicy=Never \
    --set worker.image.repository="$image_prefix/worker" \
    --set worker.image.tag="$tag" \
    --set redis.persistence.enabled=false \
    --set operator.maxWorkersPerRun=8
selector="app.kubernetes.io/instance=$release"
operator_deployment="$(kn get deployment -l "$selector,app.kubernetes.io/component=operator" \
    -o jsonpath='{.items[0].metadata.name}')"
redis_statefulset="$(kn get statefulset -l "$selector,app.kubernetes.io/component=redis" \
    -o jsonpath='{.items[0].metadata.name}')"
metrics_service="$(kn get service -l "$selector,app.kubernetes.io/component=operator" \
    -o jsonpath='{.items[0].metadata.name}')"
[ -n "$operator_deployment" ] || fail "the chart created no operator Deployment"
[ -n "$metrics_service" ] || fail "the chart created no metrics Service"
if [ -n "${reused:-}" ]; then
    # Same tag, new image: restart so the operator runs what was just loaded.
    kn rollout restart "deployment/$operator_deployment"
fi

step "waiting for the Workflow CRD, Redis and the operator"
k wait --for=condition=Established crd/workflows.dagkube.io --timeout=60s
if [ -n "$redis_statefulset" ]; then
    kn rollout status "statefulset/$redis_statefulset" --timeout=300s
fi
kn rollout status "deployment/$operator_deployment" --timeout=300s
kn wait --for=condition=Available "deployment/$operator_deployment" --timeout=300s

step "removing Workflows left from an earlier run"
kn delete workflows.dagkube.io --all --wait=true --timeout=180s

step "applying the example Workflows"
example_names=()
for manifest in "${examples[@]}"; do
    name="$(kn apply -f "$root/examples/manifests/$manifest" -o jsonpath='{.metadata.name}')"
    info "applied $manifest: Workflow $name"
    example_names+=("$name")
done

step "waiting for ${example_names[*]} to succeed (timeout ${workflow_timeout} s each)"
for name in "${example_names[@]}"; do
    wait_phase "$name" Succeeded "$workflow_timeout"
done
kn get workflows.dagkube.io -o wide

step "checking the status of the succeeded Workflows"
for name in "${example_names[@]}"; do
    check_status "$name"
done

step "reading the operator's metrics (service $metrics_service, port metrics)"
metrics_file="$workdir/metrics.txt"
deadline=$((SECONDS + 90))
while true; do
    if k get --raw "/api/v1/namespaces/$namespace/services/$metrics_service:metrics/proxy/metrics" \
        >"$metrics_file" 2>"$workdir/metrics.err" \
        && grep -q '^dagkube_operator_workflows' "$metrics_file" \
        && check_metrics "$metrics_file" >"$workdir/metrics.check"; then
        break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        cat "$workdir/metrics.err" "$workdir/metrics.check" 2>/dev/null >&2 || true
        grep '^dagkube_operator' "$metrics_file" >&2 || true
        fail "the operator's metrics lack what the run should have produced (above)"
    fi
    sleep 5
done
sed 's/^/    /' "$workdir/metrics.check"

step "long-running Workflow: apply, wait for Running with worker Pods, delete"
kn apply -f "$long_manifest"
wait_phase "$long_workflow" Running 300
uid="$(kn get "workflows.dagkube.io/$long_workflow" -o jsonpath='{.metadata.uid}')"
run_id="$(kn get "workflows.dagkube.io/$long_workflow" -o jsonpath='{.status.runId}')"
info "$long_workflow: uid $uid, runId ${run_id:-<none>}"
deadline=$((SECONDS + 180))
until [ -n "$(workflow_pods "$run_id" "$uid")" ]; do
    [ "$SECONDS" -lt "$deadline" ] \
        || fail "$long_workflow has no Pods labelled dagkube.io/run=$run_id or owned by it"
    sleep 2
    [ -n "$run_id" ] \
        || run_id="$(kn get "workflows.dagkube.io/$long_workflow" -o jsonpath='{.status.runId}')"
done
workflow_pods "$run_id" "$uid" | sed 's/^/    pod /'
phase="$(phase_of "$long_workflow")"
[ "$phase" = Running ] || fail "$long_workflow is $phase, not Running, before its deletion"
kn delete "workflows.dagkube.io/$long_workflow" --wait=true --timeout=180s
deadline=$((SECONDS + 180))
while true; do
    left="$(workflow_pods "$run_id" "$uid")"
    [ -n "$left" ] || break
    if [ "$SECONDS" -ge "$deadline" ]; then
        printf '%s\n' "$left" >&2
        fail "Pods of the deleted $long_workflow still exist after 180 s (above)"
    fi
    sleep 2
done
info "$long_workflow deleted; its Pods are gone"

step "cleaning up the example Workflows"
kn delete workflows.dagkube.io --all --wait=true --timeout=180s
