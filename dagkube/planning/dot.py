"""A Plan as a Graphviz picture: tasks colored by class, grouped by worker, the critical path
highlighted, optimizations marked. Pure: returns DOT text; the CLI renders it with ``dot``."""

from __future__ import annotations

from dagkube.dag import DagSpec
from dagkube.planning.model import Plan
from dagkube.resources import format_memory

# Light to dark: small classes pale, large ones saturated (color-blind safe blues/oranges).
PALETTE = ["#deebf7", "#9ecae1", "#4292c6", "#fdae6b", "#e6550d", "#a63603"]


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def plan_to_dot(dag: DagSpec, plan: Plan) -> str:
    classes = sorted(plan.classes_mib)
    color = {c: PALETTE[min(i, len(PALETTE) - 1)] for i, c in enumerate(classes)}
    lines = [
        "digraph plan {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [color="#777777"];',
        f"  label={_quote(_title(plan))}; labelloc=t; fontname=Helvetica;",
    ]
    groups: dict[str | None, list[str]] = {}
    for task_id, task in plan.tasks.items():
        groups.setdefault(task.worker_id, []).append(task_id)

    def node(task_id: str) -> str:
        task = plan.tasks[task_id]
        label = task_id
        if task.predicted_start_s is not None and task.predicted_end_s is not None:
            label += f"\\n{task.predicted_start_s:.2f}-{task.predicted_end_s:.2f}s"
        if task.optimizations:
            label += "\\n" + ", ".join(o.name for o in task.optimizations)
        border = ', penwidth=2.5, color="#cb181d"' if task.critical_path else ""
        fill = color[task.memory_mib]
        return f'    {_quote(task_id)} [label="{label}", fillcolor="{fill}"{border}];'

    for index, (worker, members) in enumerate(groups.items()):
        if worker is None:  # flexible tasks: no cluster
            lines += [node(t) for t in members]
            continue
        memory = plan.tasks[members[0]].memory_mib
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f"    label={_quote(f'{worker} · {format_memory(memory)}')};")
        lines.append('    style="rounded,dashed"; color="#999999";')
        lines += [node(t) for t in members]
        lines.append("  }")
    for task_id, spec in dag.tasks.items():
        for dep in spec.deps:
            both = plan.tasks[dep].critical_path and plan.tasks[task_id].critical_path
            style = ' [color="#cb181d", penwidth=2.5]' if both else ""
            lines.append(f"  {_quote(dep)} -> {_quote(task_id)}{style};")
    legend = " ".join(f'<td bgcolor="{color[c]}">{format_memory(c)}</td>' for c in classes)
    lines.append(
        f'  legend [shape=plaintext, style="", label=<<table border="0" cellspacing="2">'
        f"<tr><td>class:</td>{legend}<td>red: critical path</td></tr></table>>];"
    )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _title(plan: Plan) -> str:
    parts = [f"{plan.planner}, SLA {plan.sla}"]
    if plan.predicted_makespan_s is not None:
        parts.append(f"predicted makespan {plan.predicted_makespan_s:.2f}s")
    if plan.predicted_gb_s is not None:
        parts.append(f"{plan.predicted_gb_s:.2f} GB-s")
    return ", ".join(parts)
