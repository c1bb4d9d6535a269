"""dagkube on Kubernetes: worker Pod builders (``pods``) and the KubernetesBackend (``backend``).

Nothing in the core imports this package (only the operator, and lazily): its client library
is an optional dependency, the ``kubernetes`` extra.
"""
