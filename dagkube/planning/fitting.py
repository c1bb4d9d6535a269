"""Size models: a measured quantity (execution seconds, output bytes) as a function of input
bytes, with the samples' spread around the fit kept as ratios.

A prediction at size ``x`` is ``curve(x) * bias(group) * factor``:

* ``curve`` is the best of three shapes, chosen by fit quality: a constant (tasks that ignore
  their input size), a power law ``a * x ** b`` (least squares in log-log; covers linear,
  sub-linear and quadratic work through the origin) and a line ``a + b * x`` (a fixed cost
  plus work per byte, which a power law bends). Quality is the mean squared log-ratio of
  samples to the curve divided by its degrees of freedom (n - parameters), so a shape with
  more parameters must earn its keep; ties keep the simpler one.
* ``bias`` is a group's (a task id's) median ratio to the curve, for groups with at least
  ``min_group`` samples: tasks of one function can differ by their arguments at the same
  size, which only their own samples show (the median: a one-off outlier is not a trait).
* ``factor`` is the SLA statistic of the residual ratios (sample / (curve * bias)): 1 on
  average, and for pNN the pNN of how far samples fall above the fit *at their own size*.
  Raw samples of other sizes would mix size with noise and pad the percentile.

Ratios (not differences) make the spread scale with the prediction: a task twice as large is
as noisy in relative terms, which is what the measurements of CPU-bound tasks show.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

VARIED_SIZES = 1.5  # max/min input size needed before a size dependence is fitted
MIN_FIT_SAMPLES = 3  # fewer samples: a constant (their statistic), nothing to choose from
MAX_EXPONENT = 2.0  # a power law steeper than quadratic is taken for noise
FIT_POINTS = 2000  # samples a curve is fitted on, at most

Shape = Literal["constant", "power", "linear"]


def statistic(values: Sequence[float], percentile: float | None) -> float:
    """The mean, or the given percentile with linear interpolation."""
    if not values:
        raise ValueError("statistic of no values")
    if percentile is None:
        return sum(values) / len(values)
    ordered = sorted(values)
    rank = (len(ordered) - 1) * percentile / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def upper_bound(values: Sequence[float], percentile: float) -> float:
    """A bound the next value stays under with probability >= ``percentile`` % if it is drawn
    like ``values`` were (exchangeable): their ceil(p (n + 1))-th smallest, capped at the
    largest (a split-conformal quantile; the plain percentile of a few values is too low as
    often as not)."""
    if not values:
        raise ValueError("upper bound of no values")
    ordered = sorted(values)
    rank = math.ceil(percentile / 100 * (len(ordered) + 1))
    return ordered[min(rank, len(ordered)) - 1]


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y on x (one pass over the points)."""
    n = sum_x = sum_y = sum_xx = sum_xy = 0.0
    for x, y in points:
        n += 1
        sum_x += x
        sum_y += y
        sum_xx += x * x
        sum_xy += x * y
    var = sum_xx - sum_x * sum_x / n
    if var <= 1e-12 * max(sum_xx, 1e-300):
        return 0.0
    return (sum_xy - sum_x * sum_y / n) / var


@dataclass(frozen=True)
class SizeModel:
    """A fitted curve, per-group biases and the SLA factor of the residual ratios."""

    shape: Shape
    a: float
    b: float = 0.0
    factor: float = 1.0
    bias: dict[str, float] = field(default_factory=dict)

    def curve(self, size: float) -> float:
        x = max(size, 1.0)
        if self.shape == "power":
            return self.a * x**self.b
        if self.shape == "linear":
            return self.a + self.b * x
        return self.a

    def curves(self, sizes: Sequence[float]) -> list[float]:
        """``curve`` at each of ``sizes`` (each already >= 1), in one pass."""
        a, b = self.a, self.b
        if self.shape == "power":
            return [a * x**b for x in sizes]
        if self.shape == "linear":
            return [a + b * x for x in sizes]
        return [a] * len(sizes)

    def predict(self, size: float, group: str = "") -> float:
        """The SLA's prediction at ``size`` for a member of ``group`` ("" or unknown: none)."""
        return self.curve(size) * self.bias.get(group, 1.0) * self.factor


def _power(lxs: list[float], lys: list[float]) -> tuple[float, float]:
    exponent = min(max(slope(list(zip(lxs, lys, strict=True))), 0.0), MAX_EXPONENT)
    return math.exp((sum(lys) - exponent * sum(lxs)) / len(lxs)), exponent


def _linear(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    per_byte = slope(list(zip(xs, ys, strict=True)))
    if per_byte <= 0:
        return None
    fixed = sum(ys) / len(ys) - per_byte * sum(xs) / len(xs)
    if fixed < 0:  # no negative fixed cost: the line through the origin
        per_byte = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
        fixed = 0.0
    return fixed, per_byte


def _best_curve(xs: list[float], ys: list[float]) -> SizeModel:
    """The constant, power law or line that fits best: the least mean squared log-ratio per
    degree of freedom (constant: 1 parameter, the others 2); ties keep the simpler shape."""
    lxs = [math.log(x) for x in xs]
    lys = [math.log(y) for y in ys]
    n = len(xs)
    best = SizeModel("constant", sum(ys) / n)
    if n < MIN_FIT_SAMPLES or max(xs) / min(xs) <= VARIED_SIZES:
        return best
    level = math.log(best.a)
    best_score = sum((ly - level) ** 2 for ly in lys) / (n - 1)
    scale, exponent = _power(lxs, lys)
    ln_scale = math.log(scale)
    score = sum((ly - ln_scale - exponent * lx) ** 2 for lx, ly in zip(lxs, lys, strict=True)) / (
        n - 2
    )
    if score < best_score:
        best, best_score = SizeModel("power", scale, exponent), score
    line = _linear(xs, ys)
    if line is not None:
        fixed, per_byte = line
        score = sum(
            (ly - math.log(max(fixed + per_byte * x, 1e-12))) ** 2
            for x, ly in zip(xs, lys, strict=True)
        ) / (n - 2)
        if score < best_score:
            best = SizeModel("linear", fixed, per_byte)
    return best


def _biases(ratios: list[float], members: dict[str, list[int]]) -> dict[str, float]:
    """Each group's median ratio to the curve: a one-off outlier of a task (its first call in
    a fresh process importing a library, a pause) is noise, left to the residuals that every
    task's SLA factor is taken from, not a lasting trait of that task."""
    return {group: _median([ratios[i] for i in found]) for group, found in members.items()}


def _median(values: list[float]) -> float:
    values.sort()
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def fit_size_model(
    points: Sequence[tuple[float, float, str]],
    percentile: float | None,
    *,
    min_group: int = 3,
    floor: float = 1e-6,
) -> SizeModel:
    """Fit ``value = f(size)`` to (size, value, group) points (see the module docstring);
    values are floored at ``floor`` so that ratios and logs stay finite."""
    if not points:
        raise ValueError("a size model needs at least one sample")
    xs = [max(float(x), 1.0) for x, _, _ in points]
    ys = [max(float(y), floor) for _, y, _ in points]
    groups = [g for _, _, g in points]
    found: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        if group:
            found[group].append(index)
    # A group with enough samples of its own gets a bias (not one holding every sample).
    members = {g: ids for g, ids in found.items() if min_group <= len(ids) < len(points)}
    # The curve on at most FIT_POINTS samples (evenly spread): enough for two parameters,
    # and planning stays fast on large histories; biases and ratios use every sample.
    stride = max(1, len(xs) // FIT_POINTS)
    model = _best_curve(xs[::stride], ys[::stride])
    ratios = [y / c for y, c in zip(ys, model.curves(xs), strict=True)]
    bias = _biases(ratios, members)
    if bias:  # refit the curve on the values with each task's bias taken out
        level = [y / bias.get(g, 1.0) for y, g in zip(ys, groups, strict=True)]
        model = _best_curve(xs[::stride], level[::stride])
        ratios = [y / c for y, c in zip(ys, model.curves(xs), strict=True)]
        bias = _biases(ratios, members)
        ratios = [r / bias.get(g, 1.0) for r, g in zip(ratios, groups, strict=True)]
    return SizeModel(
        model.shape,
        model.a,
        model.b,
        factor=statistic(ratios, percentile),
        bias=bias,
    )
