"""The Workflow custom resource's names and phases, written once: the submitting side
(``dagkube.kubernetes.submit``, the command line) and the operator import them from here.

Imports nothing but the standard library, so the operator's status builders and the command
line can use it without loading the Kubernetes client. The CRD in the Helm chart spells the
same names.
"""

from __future__ import annotations

import enum
from typing import Final

GROUP: Final = "dagkube.io"
VERSION: Final = "v1alpha1"
PLURAL: Final = "workflows"
KIND: Final = "Workflow"
API_VERSION: Final = f"{GROUP}/{VERSION}"


class Phase(enum.StrEnum):
    """``status.phase`` of a Workflow, in the order a run goes through them."""

    PENDING = "Pending"  # no status yet: the operator has not planned it
    PLANNING = "Planning"  # building the DAG and planning it
    RUNNING = "Running"  # launched: its workers run its tasks
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


# A Workflow in one of these phases does not change phase again.
ENDED_PHASES: Final = (Phase.SUCCEEDED, Phase.FAILED)
