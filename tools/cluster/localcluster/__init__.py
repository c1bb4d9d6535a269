"""A local Kubernetes cluster for tests and demos: the real control plane (built from Go
modules by tools/cluster/build.sh) as processes on loopback, and dagkube's own node agent that
runs Pods as processes in cgroups and network namespaces. See docs/kubernetes.md."""
