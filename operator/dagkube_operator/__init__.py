"""The dagkube Kubernetes operator: Workflow custom resources in, planned worker Pods out.

Run it with ``python -m dagkube_operator`` (settings from the environment, see ``config``).
"""
