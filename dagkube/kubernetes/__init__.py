"""dagkube on Kubernetes: worker Pod builders (``pods``), the KubernetesBackend (``backend``),
submitting Workflows (``submit``) and the Workflow custom resource's names and phases
(``workflow_cr``, standard library only).

Nothing in the core imports this package (only the operator, and lazily): its client library
is an optional dependency, the ``kubernetes`` extra.
"""
