"""Plans that never lose against a simpler one the planner could have made.

A planner's choice (:mod:`~dagkube.planning.planners`) is the plain plan; each optimization
switched on is tried on it in composition order and kept only if the timing model predicts
the result better for the objective asked (:class:`~dagkube.planning.objective.Goal`), so an
optimization predicted not to help is not applied and says why in the notes. The ``auto``
planner does this from every planner's plain plan and keeps the best of them (ties keep the
simpler: wukong < uniform < non-uniform, fewer optimizations first). Every candidate
evaluated is recorded in the Plan's ``alternatives`` (docs/architecture.md, "Planners").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Final

from dagkube.dag import DagSpec
from dagkube.planning.assembly import Choice, build_plan, simulate_plan
from dagkube.planning.estimates import SharedEstimates
from dagkube.planning.model import OPTIMIZATIONS, SIMPLICITY, Alternative, Plan
from dagkube.planning.objective import Goal, Prediction
from dagkube.planning.optimizations import Marks, RuleInput, duplicates_lost, mark, mark_prewarm
from dagkube.planning.options import PlanningOptions
from dagkube.planning.planners import choose_non_uniform, choose_uniform, choose_wukong
from dagkube.planning.predictions import Estimates, Predictor
from dagkube.planning.rules import source_order
from dagkube.planning.timing import Timing

# taskdup is not modelled (a duplicate runs only when an upstream is later than predicted),
# so no prediction can show it helps: auto tries the others unless taskdup is asked for.
MODELLED: Final = tuple(name for name in OPTIMIZATIONS if name != "taskdup")
# auto simulates about this many tasks in all (10,000 tasks: three schedules; see the
# planning-time table of docs/benchmarks.md), then stops trying candidates and says so;
# never fewer than AUTO_MIN.
AUTO_SIMULATED_TASKS: Final = 30_000
AUTO_MIN_SIMULATIONS: Final = 2
# Planning time is part of the user's wait (``wf.run`` plans, then runs): past the two plain
# plans, auto spends at most this share of the best predicted makespan on further candidates,
# at about SIMULATED_TASK_S per simulated task (measured on a 2-core VM: 40 us; a constant,
# not a clock, so a plan does not depend on how busy the machine is).
AUTO_PLANNING_SHARE: Final = 0.1
SIMULATED_TASK_S: Final = 40e-6
# auto keeps an optimization nobody asked for only where it is predicted to gain more than
# this share of the objective: the model's predictions of one plan against another are not
# closer than a few percent, and an optimization adds work it only partly sees (preload on a
# 16 x 16 MiB fan-in on 2 cores, predicted 2% faster, ran 25% slower: its background
# downloads share the cores with the producers).
AUTO_MIN_GAIN: Final = 0.03


@dataclass
class Candidate:
    """A choice with some optimizations applied, and the timing model's schedule of it."""

    choice: Choice
    timing: Timing
    applied: list[str] = field(default_factory=list)
    marks: Marks = field(default_factory=dict)
    rejected: str | None = None  # why the step that made it was not kept

    @property
    def label(self) -> str:
        """e.g. ``uniform+preload``, ``uniform@1024Mi`` (uniform on a warm smaller class)."""
        name = self.choice.planner + (f"@{self.choice.variant}" if self.choice.variant else "")
        return "+".join([name, *self.applied])

    @property
    def prediction(self) -> Prediction:
        return Prediction(self.timing.makespan_s, self.timing.gb_s)


@dataclass
class _Search:
    """One planning call: what it decides by, what it evaluated, and the simulations it may
    still make (None: no limit)."""

    shared: SharedEstimates
    options: PlanningOptions
    goal: Goal
    budget: int | None = None
    keep: Goal | None = None  # what an optimization must win by to be kept (None: goal)
    starved: bool = False  # a candidate was not tried for want of budget
    short_run_s: float | None = None  # the budget was cut to fit a run predicted this short
    evaluated: list[Candidate] = field(default_factory=list)
    placed: dict[str, Choice | None] = field(default_factory=dict)  # planner -> for preload

    def add(self, candidate: Candidate) -> Candidate:
        self.evaluated.append(candidate)
        return candidate

    def spend(self, simulations: int) -> None:
        if self.budget is not None:
            self.budget -= simulations

    def affordable(self) -> bool:
        return self.budget is None or self.budget > 0

    @property
    def dag(self) -> DagSpec:
        return self.shared.dag

    @property
    def predictor(self) -> Predictor:
        return self.shared.predictor

    def sizes(self, choice: Choice) -> Estimates:
        """``choice``'s task estimates, predicted once."""
        if choice.sizes is None:
            choice.sizes = self.shared.at(choice.memory)
        return choice.sizes

    def rules(self, choice: Choice, timing: Timing) -> RuleInput:
        """What the optimization rules read of ``choice``."""
        return RuleInput(
            self.dag, choice.memory, choice.worker_of, self.predictor, self.sizes(choice), timing
        )

    def simulate(self, choice: Choice, marks: Marks) -> Timing:
        self.spend(1)
        return simulate_plan(self.shared, choice.memory, choice.worker_of, self.options, marks)


Rechoose = Callable[[], Choice | None]  # the choice placed for preload, None if the same


def _optimize(
    search: _Search, base: Choice, names: list[str], rechoose: Rechoose | None
) -> tuple[Candidate, list[str]]:
    """``base`` with each of ``names`` tried in composition order, each kept only if the
    goal prefers the result; returns the best and the notes saying what was kept and why."""
    current = search.add(Candidate(base, base.timing))
    notes: list[str] = []
    skipped: list[str] = []
    for name in names:
        if name == "taskdup":
            current = _taskdup(search, current, notes)
            continue
        if not search.affordable():
            skipped.append(name)
            continue
        trial = _trial(search, current, name, rechoose, notes)
        if trial is None:
            continue
        search.add(trial)
        verdict = search.goal.versus(trial.prediction, current.prediction)
        if (search.keep or search.goal).better(trial.prediction, current.prediction):
            notes.append(f"{name}: {verdict} without: applied")
            current = trial
        else:
            if search.goal.better(trial.prediction, current.prediction):
                verdict += f", within the {AUTO_MIN_GAIN:.0%} auto asks of one"
            trial.rejected = f"no better than {current.label}: {verdict}"
            notes.append(f"{name}: {verdict} without: not applied")
    if skipped:
        search.starved = True
        notes.append(f"{', '.join(skipped)}: not tried on {base.planner} (planning budget spent)")
    if current.applied:
        counts = {name: 0 for name in current.applied}
        for entries in current.marks.values():
            for entry in entries:
                counts[entry.name] += 1
        notes.append(
            "optimizations: " + ", ".join(f"{n} on {c} task(s)" for n, c in counts.items())
        )
    return current, notes


def _trial(
    search: _Search, current: Candidate, name: str, rechoose: Rechoose | None, notes: list[str]
) -> Candidate | None:
    """``current`` with ``name`` added, predicted; None (and a note) where it marks nothing."""
    choice = current.choice
    if name == "preload" and rechoose is not None:
        choice = rechoose() or choice  # fan-ins placed for pre-loading, where that differs
    if name == "prewarm":  # on the schedule the other optimizations produce
        marks = {t: list(entries) for t, entries in current.marks.items()}
        requested = mark_prewarm(search.rules(choice, current.timing), marks)
        if not requested:
            notes.append("prewarm: no cold start is predicted after the run begins")
            return None
    else:
        marks = mark([*current.applied, name], search.rules(choice, choice.timing))
        if not any(e.name == name for entries in marks.values() for e in entries):
            notes.append(f"{name}: no task where it applies on {choice.planner}")
            return None
    timing = search.simulate(choice, marks)
    if name == "prewarm":
        used = sum(1 for a in timing.activities if a.prewarmed)
        if not used:
            notes.append("prewarm: no pre-warmed worker would be ready in time; none asked")
            return None
        notes.append(f"prewarm: {requested} worker(s) requested ahead of demand, {used} used")
    return Candidate(choice, timing, [*current.applied, name], marks)


def _taskdup(search: _Search, current: Candidate, notes: list[str]) -> Candidate:
    """taskdup, asked for, is applied where it can be, except on upstreams whose function's
    earlier duplicates gained nothing: the model predicts nothing for it."""
    if search.options.history.empty:
        notes.append("taskdup: off until the workflow has history to predict lateness from")
        return current
    lost = duplicates_lost(search.options.history)
    if lost:
        notes.append(
            "taskdup: not on upstreams of "
            + ", ".join(
                f"{f} ({n} earlier duplicate(s) gained {s:+.3f}s in all)"
                for f, (n, s) in sorted(lost.items())
            )
        )
    choice = current.choice
    marks = mark([*current.applied, "taskdup"], search.rules(choice, choice.timing))
    if not any(e.name == "taskdup" for entries in marks.values() for e in entries):
        notes.append(f"taskdup: no task where it applies on {choice.planner}")
        return current
    notes.append(
        "taskdup: not modelled (a duplicate runs only when an upstream is later than "
        "predicted): applied as asked"
    )
    kept = search.add(Candidate(choice, current.timing, [*current.applied, "taskdup"], marks))
    current.rejected = f"the same predictions as {kept.label}: taskdup applied as asked"
    return kept


def plan_named(dag: DagSpec, planner: str, options: PlanningOptions) -> Plan:
    """The named planner's choice with the optimizations switched on that are predicted to
    help; non-uniform's candidates include the uniform plan its downgrades start from."""
    search = _Search(_shared(dag, options), options, options.goal())
    rechoose: Rechoose | None = None
    if planner == "wukong":
        base = choose_wukong(search.shared, options)
    else:
        uniform = choose_uniform(search.shared, options)
        assert uniform is not None
        if planner == "uniform":
            base = uniform
        else:
            search.add(Candidate(uniform, uniform.timing))
            base = choose_non_uniform(search.shared, options, uniform)
        rechoose = _placed_for_preload(search, planner, uniform)
    final, notes = _optimize(search, base, list(options.optimizations), rechoose)
    return _finish(search, final, [*final.choice.notes, *notes], list(options.optimizations))


def plan_auto(dag: DagSpec, options: PlanningOptions) -> Plan:
    """Every planner's plain plan, each with the optimizations (those asked for; else every
    one the timing model predicts) tried on it, then the best for the goal."""
    tasks = max(1, len(dag.tasks))
    budget = max(AUTO_MIN_SIMULATIONS, AUTO_SIMULATED_TASKS // tasks)
    search = _Search(_shared(dag, options), options, options.goal(), budget=budget)
    names = list(options.optimizations) or list(MODELLED)
    if not options.optimizations:  # tried unasked: kept only for a clear predicted gain
        search.keep = replace(search.goal, tolerance=AUTO_MIN_GAIN)
    search_notes: list[str] = []
    uniform = choose_uniform(search.shared, options)
    assert uniform is not None
    bases = [choose_wukong(search.shared, options), uniform]
    search.spend(1 + uniform.simulations)
    # uniform on the workers alive now, when they are of a smaller class: a plain plan too,
    # always evaluated (left out by the budget, the run went to wukong at 3x its time)
    warm = _on_warm_class(search)
    if warm is not None:
        search.spend(warm.simulations)
    plain = [*bases, warm] if warm is not None else bases
    _fit_budget_to_run(search, min(base.timing.makespan_s for base in plain), tasks)
    if search.affordable():
        non_uniform = choose_non_uniform(
            search.shared, options, uniform, max_simulations=search.budget
        )
        search.spend(non_uniform.simulations)
        if non_uniform.memory != uniform.memory:
            bases.append(non_uniform)
        else:
            search_notes.append("non-uniform: no downgrade kept, the same plan as uniform")
    else:
        search.starved = True
        search_notes.append("non-uniform: not tried: the planning budget is spent")
    if warm is not None:
        bases.append(warm)
    notes_of: dict[int, list[str]] = {}  # id of every candidate -> its base's notes
    finals: list[Candidate] = []
    for base in bases:
        rechoose = None
        if base.planner != "wukong" and not base.variant:
            rechoose = _placed_for_preload(search, base.planner, uniform)
        first = len(search.evaluated)
        final, notes = _optimize(search, base, names, rechoose)
        finals.append(final)
        for candidate in search.evaluated[first:]:
            notes_of[id(candidate)] = notes
    chosen = finals[0]
    # Every candidate not rejected on the way, the simpler first: one replaces the best so
    # far only when strictly better, so predictions that tie keep the simpler plan.
    for candidate in sorted(search.evaluated, key=_simplicity):
        if candidate.rejected is None and search.goal.better(
            candidate.prediction, chosen.prediction
        ):
            chosen = candidate
    notes = notes_of[id(chosen)]
    if search.starved and search.short_run_s is not None:
        search_notes.append(
            f"auto: the best plain plan is predicted to take {search.short_run_s:.3f}s: "
            f"candidates limited to about {AUTO_PLANNING_SHARE:.0%} of that in planning time"
        )
    elif search.starved:
        search_notes.append(
            f"auto: {len(dag.tasks):,} tasks: candidates limited to about "
            f"{AUTO_SIMULATED_TASKS:,} simulated tasks to keep planning fast"
        )
    summary = (
        f"auto: {chosen.label} chosen for {search.goal.describe()} of "
        f"{len(search.evaluated)} candidate(s)"
    )
    return _finish(
        search, chosen, [summary, *chosen.choice.notes, *notes, *search_notes], chosen.applied
    )


def _on_warm_class(search: _Search) -> Choice | None:
    """uniform's plan on the smaller class with the most idle workers now (they start warm,
    where uniform's largest class may start cold), if every task fits it; None otherwise."""
    options = search.options
    largest = max(options.classes_mib)
    warm = [m for m, n in options.warm_pool.items() if n > 0 and m < largest]
    if not warm:
        return None
    memory_mib = max(warm, key=lambda m: (options.warm_pool[m], m))
    floors = search.shared.floors()  # cached: the ones uniform checked
    if memory_mib not in options.classes_mib or any(f > memory_mib for f in floors.values()):
        return None
    return choose_uniform(search.shared, options, memory_mib=memory_mib)


def _fit_budget_to_run(search: _Search, best_s: float, tasks: int) -> None:
    """Cut the simulations left to what AUTO_PLANNING_SHARE of a ``best_s`` run pays for:
    searching longer than a short run could gain makes the user wait longer, not less."""
    worth = int(AUTO_PLANNING_SHARE * best_s / (tasks * SIMULATED_TASK_S))
    if search.budget is not None and worth < search.budget:
        search.budget = worth
        search.short_run_s = best_s


def _shared(dag: DagSpec, options: PlanningOptions) -> SharedEstimates:
    """The estimates every candidate of this planning call shares (sizes at the largest
    class first: uniform, which every planner but wukong starts from, is planned there)."""
    return SharedEstimates(dag, options.predictor(), max(options.classes_mib))


def _simplicity(candidate: Candidate) -> tuple[int, int]:
    return SIMPLICITY.index(candidate.choice.planner), len(candidate.applied)


def _placed_for_preload(search: _Search, planner: str, uniform: Choice) -> Rechoose:
    """The choice whose fan-ins are placed for pre-loading (:func:`assign_workers`), made
    when preload is tried; None where the placement is the plain one's."""

    def placed(planner: str) -> Choice | None:
        shared, options = search.shared, search.options
        if planner == "uniform":
            found = choose_uniform(shared, options, preload=True, differs_from=uniform)
            if found is not None:
                search.spend(found.simulations)
            return found
        start = rechoose_for("uniform")
        if start is None:
            return None
        found = choose_non_uniform(shared, options, start, max_simulations=search.budget)
        search.spend(found.simulations)
        return found

    def rechoose_for(planner: str) -> Choice | None:
        if planner not in search.placed:  # made once per planning call
            search.placed[planner] = placed(planner)
        return search.placed[planner]

    def rechoose() -> Choice | None:
        return rechoose_for(planner)

    return rechoose


def _finish(search: _Search, chosen: Candidate, notes: list[str], switched: list[str]) -> Plan:
    """The chosen candidate as a Plan, every candidate recorded with why it was not chosen."""
    goal = search.goal
    _order_sources(search, chosen, notes)
    if not goal.fits(chosen.prediction):
        notes.append(
            f"no candidate fits the GB-s budget {goal.max_gb_s:g}: the cheapest, "
            f"{chosen.label} ({chosen.timing.gb_s:.3f} GB-s), is chosen"
        )
    alternatives = [_alternative(goal, c, chosen) for c in search.evaluated]
    if len(alternatives) > 1:
        notes.append(
            "candidates: "
            + "; ".join(
                f"{a.label} {a.model_makespan_s:.3f}s {a.predicted_gb_s:.3f} GB-s"
                + (" (chosen)" if a.chosen else "")
                for a in alternatives
            )
        )
    return build_plan(
        search.dag,
        search.options,
        chosen.choice,
        search.predictor,
        marks=chosen.marks,
        timing=chosen.timing,
        optimizations=switched,
        notes=notes,
        alternatives=alternatives,
    )


def _order_sources(search: _Search, chosen: Candidate, notes: list[str]) -> None:
    """With more sources than the worker cap lets start at once, the chosen plan with its
    sources queued the longest path first (list scheduling by the critical path), kept if
    the timing model predicts it better than the DAG's order, which it was made with. It is
    not always: on Seismology-100 (100 like tasks into one fan-in) the DAG's order ran 8%
    faster, as the model predicted (which source holds the fan-in's worker, and when it
    starts, moves with the order). Not tried on a plan with optimization marks: their
    parameters (a pre-warm's delay, a duplicate's predicted end, a delayed upload's wait) were
    timed on the DAG's order."""
    options, dag = search.options, search.dag
    if options.max_workers is None or len(dag.sources) <= options.max_workers:
        return
    if any(chosen.marks.values()):
        return
    choice = chosen.choice
    if source_order(dag, search.sizes(choice).exec_s) == dag.sources:
        return
    timing = simulate_plan(
        search.shared, choice.memory, choice.worker_of, options, chosen.marks, longest_first=True
    )
    first = Prediction(timing.makespan_s, timing.gb_s)
    verdict = search.goal.versus(first, chosen.prediction)
    if (search.keep or search.goal).better(first, chosen.prediction):
        chosen.timing = timing
        notes.append(f"sources: the longest path first: {verdict} in the DAG's order")
    else:
        notes.append(f"sources: in the DAG's order (the longest path first: {verdict})")


def _alternative(goal: Goal, candidate: Candidate, chosen: Candidate) -> Alternative:
    why = None
    if candidate is not chosen:
        if not goal.fits(candidate.prediction) and goal.fits(chosen.prediction):
            why = f"over the GB-s budget ({candidate.timing.gb_s:.3f} > {goal.max_gb_s:g})"
        elif candidate.rejected:
            why = candidate.rejected
        elif goal.compare(candidate.prediction, chosen.prediction) == 0:
            why = f"ties with {chosen.label}, which is simpler or came first"
        else:
            why = (
                f"{chosen.label} is better: {goal.versus(candidate.prediction, chosen.prediction)}"
            )
    return Alternative(
        label=candidate.label,
        model_makespan_s=round(candidate.timing.makespan_s, 6),
        predicted_gb_s=round(candidate.timing.gb_s, 6),
        chosen=candidate is chosen,
        rejected=why,
    )
