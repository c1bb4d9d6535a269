"""A workflow whose middle task raises (used by the CLI failure tests)."""

import dagkube


@dagkube.task
def load(n: int) -> list[int]:
    return list(range(n))


@dagkube.task
def parse(values: list[int]) -> int:
    raise KeyError(f"column 'price' missing in {len(values)} rows")


workflow = dagkube.Workflow(parse(load(5)), name="cli-failing")
