"""What "a better plan" means: the objective asked for (``makespan``, ``cost``, ``balanced``)
and an optional GB-s budget, applied to the timing model's predictions.

Every choice a planner makes between two plans (an optimization kept or not, non-uniform's
downgrades kept or not, the ``auto`` planner's pick) goes through :meth:`Goal.better`: a plan
must be strictly better to replace the simpler one, so predictions that tie keep the simpler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from dagkube.errors import InvalidOption

OBJECTIVES: Final = ("makespan", "cost", "balanced")
MAKESPAN_TOLERANCE: Final = 0.005  # makespans this close (relative) tie
GB_S_TOLERANCE: Final = 0.005  # GB-s this close (relative) tie
# balanced weighs a 1% shorter makespan like 1% fewer GB-s: their product is scale-free
BALANCED_TOLERANCE: Final = MAKESPAN_TOLERANCE + GB_S_TOLERANCE


def check_objective(value: object) -> str:
    """Normalize an objective name, or raise naming the value and the accepted ones."""
    normalized = str(value).strip().lower()
    if normalized not in OBJECTIVES:
        raise InvalidOption(
            f"Objective {value!r} is unknown: choose one of {', '.join(OBJECTIVES)}"
        )
    return normalized


def check_max_gb_s(value: object) -> float | None:
    """A GB-s budget: a positive finite number of GB-seconds, or None for no budget."""
    if value is None:
        return None
    try:
        budget = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        budget = float("nan")
    if isinstance(value, bool) or not 0 < budget < float("inf"):
        raise InvalidOption(
            f"GB-s budget {value!r} is not valid: use a positive number of GB-seconds"
        )
    return budget


@dataclass(frozen=True)
class Prediction:
    """The timing model's totals for one candidate plan."""

    makespan_s: float
    gb_s: float


def _order(a: float, b: float, tolerance: float) -> int:
    """-1 when ``a`` is smaller than ``b`` beyond ``tolerance`` (relative), 1 when larger, 0
    when they tie."""
    if a < b * (1 - tolerance):
        return -1
    if b < a * (1 - tolerance):
        return 1
    return 0


@dataclass(frozen=True)
class Goal:
    """The objective and budget one planning call decides by.

    * ``makespan``: the smaller predicted makespan; makespans within MAKESPAN_TOLERANCE tie
      and the smaller GB-s breaks the tie.
    * ``cost``: the smaller predicted GB-s; GB-s within GB_S_TOLERANCE tie and the smaller
      makespan breaks the tie.
    * ``balanced``: the smaller product makespan x GB-s (1% of either is worth the same);
      products within BALANCED_TOLERANCE tie and the smaller makespan breaks the tie.
    * ``max_gb_s``: a plan within the budget beats one over it; of two over it, the cheaper
      wins (so the cheapest is chosen when none fits).
    * ``tolerance``: a wider tie band for both measures (auto's optimizations tried unasked
      must win by more than the model's error).
    """

    objective: str = "makespan"
    max_gb_s: float | None = None
    tolerance: float | None = None  # both measures' tie band instead of the defaults

    def fits(self, p: Prediction) -> bool:
        return self.max_gb_s is None or p.gb_s <= self.max_gb_s

    def compare(self, a: Prediction, b: Prediction) -> int:
        """-1 when ``a`` is the better plan, 1 when ``b`` is, 0 when they tie."""
        if self.fits(a) != self.fits(b):
            return -1 if self.fits(a) else 1
        objective = self.objective if self.fits(a) else "cost"
        makespan_band = MAKESPAN_TOLERANCE if self.tolerance is None else self.tolerance
        gb_s_band = GB_S_TOLERANCE if self.tolerance is None else self.tolerance
        if objective == "makespan":
            first = _order(a.makespan_s, b.makespan_s, makespan_band)
            return first or _order(a.gb_s, b.gb_s, gb_s_band)
        if objective == "cost":
            first = _order(a.gb_s, b.gb_s, gb_s_band)
        else:
            product_a, product_b = a.makespan_s * a.gb_s, b.makespan_s * b.gb_s
            first = _order(product_a, product_b, makespan_band + gb_s_band)
        return first or _order(a.makespan_s, b.makespan_s, makespan_band)

    def better(self, a: Prediction, b: Prediction) -> bool:
        """``a`` is strictly better than ``b``: only then does it replace the simpler ``b``."""
        return self.compare(a, b) < 0

    def versus(self, a: Prediction, b: Prediction) -> str:
        """``a``'s predictions against ``b``'s, the objective's measure first, for the notes."""
        makespan = f"makespan {a.makespan_s:.3f}s vs {b.makespan_s:.3f}s"
        gb_s = f"GB-s {a.gb_s:.3f} vs {b.gb_s:.3f}"
        if self.objective == "makespan" and self.fits(a) and self.fits(b):
            return f"predicted {makespan}, {gb_s}"
        return f"predicted {gb_s}, {makespan}"

    def describe(self) -> str:
        budget = f", GB-s budget {self.max_gb_s:g}" if self.max_gb_s is not None else ""
        return f"objective {self.objective}{budget}"
