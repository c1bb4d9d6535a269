"""Transfer times, fitted the way the worker measures them.

A task's *download* is one call that fetches every input value it does not hold (outputs of
other workers not pre-loaded, constants it has not fetched yet); its *upload* is the
completion call that carries its output, when the output is stored. The two take different
paths (batched reads on the I/O thread; writes with the completion script), so each
direction has its own model, learnt from its own samples only:

* ``latency_s``: the median of the direction's small transfers (under ``SMALL_BYTES``, where
  bytes cost next to nothing): the cost of one call. A fetch of several values makes more
  round trips inside that call (their lengths, then batches of at most 8 MiB), but measured
  here they cost next to nothing beside the call itself (the hop to the I/O thread, its
  scheduling): a fan-in's fetch of six small values took a median 6.1 ms, a single
  value's 5.6 ms;
* ``bandwidth_bytes_s``: the median of its large transfers' bytes / (seconds - latency);
* a factor per size bucket (a power of two of bytes): the SLA statistic of measured / line
  ratios of that bucket, pooled with the buckets up to ``POOL_BUCKETS`` away until
  ``MIN_BUCKET_SAMPLES`` ratios are in (a bucket of two samples, one of them a stall, would
  otherwise price every transfer of its size at the stall); a size outside the sampled
  buckets takes the nearest one's. For the average, the mean leaves out the top and bottom
  ``TRIM`` of the ratios (at least one at each end): under load one small transfer in five
  to ten stalls for 10-40x its usual time (a new worker's first fetch also opens its
  connection), and a few of those in a short history moved the mean by several times. On
  the benchmark's histories the run totals were predicted best by the median (34% median
  error), then the mean of the middle half (37%), the mean without the top and bottom
  tenth (45%) and the plain mean (56%); the middle half keeps some weight on the stalls.

Uploads that overlap share the bytes' path (the cores that copy them, Redis, the disk under
the object store): a 16 MB upload took 10-13 ms alone here and 29-37 ms when two or three
others were in flight (four producers of large_fanin finishing on four workers at once). An
upload's *sharing* is one plus the uploads of its run already in flight when it starts
(:func:`upload_sharing`); its bytes part is timed ``sharing`` times slower, the latency not.
The fit takes the sharing out of each sample and the timing model puts it back for the run
it predicts, counted the same way (an upload is not re-timed when a later one starts, so
three uploads at once are timed 1x, 2x and 3x: their sum comes near what was measured, 12 +
24 + 36 ms against 12 + 37 + 37). Without it, one history holding both kinds priced every
upload of a plan whose uploads run one at a time (a worker's chain of producers) at the mean
of both: a uniform plan's 11 ms uploads at 15-45 ms.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from dagkube.planning.fitting import statistic
from dagkube.planning.history import TaskSample

SMALL_BYTES = 64 * 1024
MIN_BUCKET_SAMPLES = 8
MAX_BUCKET = 64  # sizes up to 2**64 bytes
POOL_BUCKETS = 2  # a sparse bucket pools with buckets at most this far (4x the size) away
TRIM = 0.25  # the average: the mean of the middle half (the interquartile mean)


def size_bucket(nbytes: int) -> int:
    """A transfer's size bucket: sizes within a power of two share a correction factor."""
    return max(nbytes, 1).bit_length()


def robust_statistic(values: Sequence[float], percentile: float | None) -> float:
    """The percentile, or for the mean (None) the mean without the top and bottom TRIM (at
    least one value at each end, from three values on)."""
    if percentile is not None or len(values) < 3:
        return statistic(values, percentile)
    ordered = sorted(values)
    cut = max(1, math.floor(len(ordered) * TRIM))
    return statistic(ordered[cut : len(ordered) - cut], None)


@dataclass(frozen=True)
class TransferModel:
    """``(latency + bytes / bandwidth) * factor(bucket)`` for one direction."""

    latency_s: float
    bandwidth_bytes_s: float
    factors: dict[int, float] = field(default_factory=dict)

    def line_s(self, nbytes: int, sharing: float = 1.0) -> float:
        return self.latency_s + nbytes * sharing / self.bandwidth_bytes_s

    def seconds(self, nbytes: int, sharing: float = 1.0) -> float:
        """Seconds of one call that moves ``nbytes`` (0 bytes: nothing to move) while
        ``sharing`` - 1 other transfers move theirs."""
        if nbytes <= 0:
            return 0.0
        return self.line_s(nbytes, sharing) * self.factors.get(size_bucket(nbytes), 1.0)


def upload_sharing(samples: Sequence[TaskSample]) -> list[int]:
    """Per sample, 1 + the uploads of its run in flight when its upload began (it begins as
    its execution ends; an earlier start wins a tie). Only uploads of at least SMALL_BYTES
    share (a small one is its call's latency: counting them would cost a plan of thousands
    of small outputs a scan per upload and change nothing); 1 for any other sample and for
    one recorded without its run and start."""
    sharing = [1] * len(samples)
    by_run: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for index, s in enumerate(samples):
        if s.upload_bytes >= SMALL_BYTES and s.upload_s > 0 and s.run_id and s.started_at > 0:
            begin = s.started_at + s.exec_s
            by_run[s.run_id].append((begin, begin + s.upload_s, index))
    for uploads in by_run.values():
        uploads.sort()
        in_flight: list[float] = []  # ends of the uploads begun so far (a heap)
        for begin, end, index in uploads:
            while in_flight and in_flight[0] <= begin:
                heapq.heappop(in_flight)
            sharing[index] = 1 + len(in_flight)
            heapq.heappush(in_flight, end)
    return sharing


def fit_transfers(
    samples: Sequence[tuple[int, float] | tuple[int, float, int]],
    percentile: float | None,
    *,
    latency_s: float,
    bandwidth_bytes_s: float,
) -> TransferModel:
    """A direction's model from its (bytes, seconds) or (bytes, seconds, sharing) samples;
    ``latency_s`` and ``bandwidth_bytes_s`` stand in where no small (or large) sample
    exists."""
    given = [(s[0], s[1], s[2] if len(s) > 2 else 1) for s in samples]
    triples = [(b, t, k) for b, t, k in given if b > 0 and t > 0]
    small = [t for b, t, _ in triples if b < SMALL_BYTES]
    if small:
        latency_s = statistic(small, 50)
    rates = [b * k / (t - latency_s) for b, t, k in triples if b >= SMALL_BYTES and t > latency_s]
    if rates:
        bandwidth_bytes_s = statistic(rates, 50)
    line = TransferModel(latency_s, bandwidth_bytes_s)
    ratios: dict[int, list[float]] = defaultdict(list)
    for nbytes, seconds, sharing in triples:
        ratios[size_bucket(nbytes)].append(seconds / line.line_s(nbytes, sharing))
    if not ratios:
        return line
    factors: dict[int, float] = {}
    for bucket in range(min(ratios), max(ratios) + 1):
        found = _pooled(ratios, bucket)
        if found:
            factors[bucket] = robust_statistic(found, percentile)
    # Other sizes take the nearest such bucket's factor (filled in: looked up, not searched).
    near = sorted(factors)
    for bucket in range(MAX_BUCKET + 1):
        if bucket not in factors:
            factors[bucket] = factors[min(near, key=lambda b: (abs(b - bucket), b))]
    return TransferModel(latency_s, bandwidth_bytes_s, factors)


def _pooled(ratios: dict[int, list[float]], bucket: int) -> list[float]:
    """The bucket's ratios and its neighbours' within POOL_BUCKETS, nearest first, until
    MIN_BUCKET_SAMPLES are in (none: no sample near it)."""
    found = list(ratios.get(bucket, ()))
    for distance in range(1, POOL_BUCKETS + 1):
        if len(found) >= MIN_BUCKET_SAMPLES:
            break
        found += ratios.get(bucket - distance, []) + ratios.get(bucket + distance, [])
    return found
