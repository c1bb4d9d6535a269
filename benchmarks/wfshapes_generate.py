"""Generate the WfCommons shapes that ``shapes.py`` replays, as JSON under benchmarks/shapes/.

The shapes are committed, so the benchmark needs neither ``wfcommons`` nor what it brings
(matplotlib, pandas, SciPy, pathos: about 250 MB) in the project's environment. This script
regenerates them in a throwaway environment; it imports nothing from dagkube:

    .tools/uv/bin/uv run --no-project --python python3 --with wfcommons==1.6 \\
        python benchmarks/wfshapes_generate.py [--tasks 100,1000] [--seed 0]

A WfChef recipe draws the graph and every runtime and file size from Python's and NumPy's
global generators, so both are seeded before each build: the same wfcommons version and seed
give the same files. A recipe refuses a task count below its smallest base graph (Seismology:
103, BWA: 106); the smallest count it accepts at or above the one asked is used instead, and
both are recorded. What is kept per task: its type (the last dotted part of the recipe's task
name, lower case), its recorded runtime in seconds, the total size of its output files in
bytes, and its parents (indices of earlier tasks: the list is in topological order).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
# The shape names shapes.py knows -> the WfChef recipe class of wfcommons 1.6.
RECIPES = {
    "cycles": "CyclesRecipe",
    "seismology": "SeismologyRecipe",
    "soykb": "SoykbRecipe",
    "srasearch": "SrasearchRecipe",
    "bwa": "BwaRecipe",
    "rnaseq": "RnaseqRecipe",
}
MAX_EXTRA_TASKS = 50  # how far above the asked count to look for one the recipe accepts


def build(recipe_class: str, num_tasks: int, seed: int) -> Any:
    """One seeded wfcommons Workflow (a networkx DiGraph of its tasks)."""
    import numpy as np
    from wfcommons.wfchef import recipes
    from wfcommons.wfgen import WorkflowGenerator

    random.seed(seed)
    np.random.seed(seed)
    recipe = getattr(recipes, recipe_class).from_num_tasks(num_tasks)
    return WorkflowGenerator(recipe).build_workflow()


def smallest_accepted(recipe_class: str, tasks: int, seed: int) -> tuple[int, Any]:
    """The first count >= ``tasks`` the recipe builds a workflow for, and that workflow."""
    refusals = []
    for count in range(tasks, tasks + MAX_EXTRA_TASKS + 1):
        try:
            return count, build(recipe_class, count, seed)
        except ValueError as exc:  # "Cannot create synthetic graph with N nodes from ..."
            refusals.append(str(exc))
    raise SystemExit(
        f"{recipe_class} builds no workflow of {tasks} to {tasks + MAX_EXTRA_TASKS} tasks: "
        f"{refusals[-1]}"
    )


def task_type(name: str) -> str:
    """A dagkube task name from a recipe's task name (no '#', short, lower case)."""
    return re.sub(r"[^a-z0-9_-]", "_", name.rsplit(".", 1)[-1].lower())


def shape_document(name: str, tasks: int, seed: int) -> dict[str, Any]:
    import networkx as nx

    recipe_class = RECIPES[name]
    count, workflow = smallest_accepted(recipe_class, tasks, seed)
    order = list(nx.lexicographical_topological_sort(workflow))
    index = {node: position for position, node in enumerate(order)}
    rows = []
    for node in order:
        task = workflow.nodes[node]["task"]
        parents = sorted(index[parent] for parent in workflow.predecessors(node))
        output_bytes = sum(int(f.size) for f in task.output_files)
        rows.append([task_type(task.name), round(float(task.runtime), 6), output_bytes, parents])
    return {
        "name": name,
        "source": f"wfcommons {version('wfcommons')} {recipe_class}.from_num_tasks({count})",
        "requested_tasks": tasks,
        "seed": seed,
        "tasks": rows,
    }


def dumps(document: dict[str, Any]) -> str:
    """JSON with one task per line: small, and readable in a diff."""
    head = {k: v for k, v in document.items() if k != "tasks"}
    lines = [json.dumps(row, separators=(",", ":")) for row in document["tasks"]]
    body = ",\n    ".join(lines)
    return json.dumps(head, indent=2)[:-2] + f',\n  "tasks": [\n    {body}\n  ]\n}}\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="100,1000", help="task counts, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="shape names")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}: choose from {', '.join(RECIPES)}")
    SHAPES_DIR.mkdir(exist_ok=True)
    for name in names:
        for tasks in (int(t) for t in args.tasks.split(",")):
            document = shape_document(name, tasks, args.seed)
            path = SHAPES_DIR / f"{name}-{tasks}.json"
            path.write_text(dumps(document))
            print(f"{path.name}: {len(document['tasks'])} tasks ({document['source']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
