"""A workflow whose task raises with a 20 MB message (the error-size tests)."""

import dagkube

MESSAGE_BYTES = 20_000_000


@dagkube.task
def shout(n: int) -> None:
    raise ValueError("HEAD " + "x" * n + " TAIL")


workflow = dagkube.Workflow(shout(MESSAGE_BYTES), name="huge-error")
