"""Transfer predictions describe what the worker measures: a download per task (one fetch of
the values it lacks) and an upload per stored output, each learnt from its own direction's
samples, robust to the stalls of a loaded machine, with uploads in flight together timed as
sharing the path."""

from __future__ import annotations

import pytest

import dagkube
from dagkube.planning.history import HistorySnapshot, TaskSample
from dagkube.planning.predictions import Predictor
from dagkube.planning.timing import simulate
from dagkube.planning.transfers import MIN_BUCKET_SAMPLES, fit_transfers, upload_sharing

MB = 10**6


def sample(download: tuple[int, float] = (0, 0.0), upload: tuple[int, float] = (0, 0.0)):
    return TaskSample(
        "f",
        1024,
        100,
        upload[0],
        0.1,
        download_bytes=download[0],
        download_s=download[1],
        upload_bytes=upload[0],
        upload_s=upload[1],
    )


def test_downloads_and_uploads_are_learnt_apart():
    """Reads and writes take different paths: uploads of 4 MB take 40 ms here, downloads of
    4 MB 10 ms. One model of both put each half way (about 25 ms)."""
    tasks = [sample(download=(4 * MB, 0.010)) for _ in range(5)]
    tasks += [sample(upload=(4 * MB, 0.040)) for _ in range(5)]
    tasks += [sample(download=(100, 0.001), upload=(100, 0.002)) for _ in range(5)]
    predictor = Predictor(HistorySnapshot("h", 5, tasks))
    assert predictor.download_s(4 * MB) == pytest.approx(0.010, rel=0.01)
    assert predictor.upload_s(4 * MB) == pytest.approx(0.040, rel=0.01)
    assert predictor.download_s(100) == pytest.approx(0.001, rel=0.01)
    assert predictor.upload_s(100) == pytest.approx(0.002, rel=0.01)
    # either way (callers that do not say which): between the two
    assert 0.010 < predictor.transfer_s(4 * MB) < 0.040


def test_each_direction_keeps_its_own_rate_however_few_its_samples():
    """One 48 MB download per run beside four 16 MB uploads: the download keeps its own rate
    (150 MB/s), not the uploads' (30 MB/s), even as the only sample of its direction; a
    direction without samples borrows the joint model."""
    tasks = [sample(upload=(16 * MB, 16 / 30)) for _ in range(4)]
    tasks += [sample(download=(48 * MB, 48 / 150))]
    predictor = Predictor(HistorySnapshot("h", 1, tasks))
    assert predictor.download_s(48 * MB) == pytest.approx(48 / 150, rel=0.01)
    assert predictor.upload_s(16 * MB) == pytest.approx(16 / 30, rel=0.01)
    assert predictor.download_s(0) == 0.0  # held or pre-loaded values: nothing fetched
    only_uploads = Predictor(HistorySnapshot("h", 1, tasks[:4]))
    assert only_uploads.download_s(16 * MB) == pytest.approx(only_uploads.transfer_s(16 * MB))


def test_the_average_is_not_moved_by_a_few_stalls():
    """Under load a few small transfers stall for 30-40x their usual time: the average
    leaves them out (a trimmed mean), a percentile keeps them."""
    times = [0.001] * 18 + [0.030, 0.040]
    samples = [(100, t) for t in times]
    avg = fit_transfers(samples, None, latency_s=0.0005, bandwidth_bytes_s=300e6)
    p95 = fit_transfers(samples, 95, latency_s=0.0005, bandwidth_bytes_s=300e6)
    assert avg.seconds(100) == pytest.approx(0.001, rel=0.01)
    assert p95.seconds(100) > 0.025


def test_a_sparse_size_bucket_pools_with_its_neighbours():
    """Two samples of 30 bytes, one of them a stall, next to many of 5 bytes: the 30-byte
    bucket is priced from the pool (a round trip either way), not from its stall alone."""
    samples = [(5, 0.001)] * MIN_BUCKET_SAMPLES * 2 + [(30, 0.001), (30, 0.040)]
    model = fit_transfers(samples, None, latency_s=0.0005, bandwidth_bytes_s=300e6)
    assert model.seconds(30) == pytest.approx(0.001, rel=0.05)
    # buckets far apart keep their own factors; a size beyond the samples takes the nearest
    far = [(1000, 0.002)] * 2 + [(10**7, 0.02)] * 2
    model = fit_transfers(far, None, latency_s=0.0005, bandwidth_bytes_s=300e6)
    assert model.seconds(1000) == pytest.approx(0.002)
    assert model.seconds(10**7) == pytest.approx(0.02)
    # 1 GB: a round trip (2 ms) + 100 x the 10 MB bucket's 18 ms of bytes
    assert model.seconds(10**9) == pytest.approx(0.002 + 100 * 0.018)


def upload(
    run: str, begin: float, seconds: float, nbytes: int = 16 * MB, function: str = "f"
) -> TaskSample:
    """A task whose execution (50 ms) ended at ``begin`` and whose upload then took
    ``seconds``."""
    return TaskSample(
        function,
        1024,
        100,
        nbytes,
        0.05,
        upload_bytes=nbytes,
        upload_s=seconds,
        run_id=run,
        started_at=begin - 0.05,
    )


def test_uploads_in_flight_together_are_learnt_as_sharing_the_path():
    """A 16 MB upload takes 11 ms alone. One run stored four of them one after another; in
    another four producers ended at once and their uploads shared the path (11, 22, 33 and 44
    ms, as each began while the others were in flight), twice. The model learns the upload
    alone and times it by the uploads in flight: a history that did not say which uploads
    overlapped priced the lone upload at the mean of both kinds."""
    one_by_one = [upload("a", 10.0 + 0.1 * i, 0.011) for i in range(4)]
    at_once = [upload(run, 20.0, 0.011 * (i + 1)) for run in "bc" for i in range(4)]
    tasks = one_by_one + at_once
    assert upload_sharing(tasks) == [1, 1, 1, 1] + [1, 2, 3, 4] * 2
    predictor = Predictor(HistorySnapshot("h", 3, tasks))
    assert predictor.upload_s(16 * MB) == pytest.approx(0.011, rel=0.05)
    assert predictor.upload_s(16 * MB, 3) == pytest.approx(0.033, rel=0.05)
    # Samples without their run and start (recorded before runs kept them): each counts alone.
    anonymous = [upload("", s.started_at + s.exec_s, s.upload_s) for s in tasks]
    assert upload_sharing(anonymous) == [1] * 12
    assert Predictor(HistorySnapshot("h", 3, anonymous)).upload_s(16 * MB) > 0.015
    # An upload that ended before the next began is not in flight with it; small ones (a
    # call's latency) do not share.
    assert upload_sharing([upload("c", 1.0, 0.010), upload("c", 1.010, 0.010)]) == [1, 1]
    assert upload_sharing([upload("d", 1.0, 0.002, nbytes=1000)] * 3) == [1, 1, 1]


@dagkube.task
def produce(i):
    return i


@dagkube.task
def gather(values):
    return values


def test_the_timing_model_times_uploads_in_flight_together_as_sharing():
    """Three producers start on three workers at once and end together: their three uploads
    are timed 1x, 2x and 3x the bytes' time alone (counted as the fit counts them), the
    consumer's download of the three values is not shared."""
    wf = dagkube.Workflow(gather([produce(i) for i in range(3)]), name="shared-uploads")
    tasks = [upload("a", 10.0 + i, 0.010, 4 * MB, "produce") for i in range(5)]
    predictor = Predictor(HistorySnapshot("h", 5, tasks))
    alone = predictor.upload_s(4 * MB)
    latency = predictor.uploads.latency_s
    timing = simulate(
        wf.dag, dict.fromkeys(wf.dag.tasks, 1024), dict.fromkeys(wf.dag.tasks), predictor
    )
    uploads = sorted(timing.tasks[f"produce#{i}"].upload_s for i in range(3))
    factor = alone / predictor.uploads.line_s(4 * MB)
    bytes_alone = alone / factor - latency
    for sharing, seconds in enumerate(uploads, start=1):
        assert seconds == pytest.approx((latency + sharing * bytes_alone) * factor, rel=1e-6)
    assert uploads[0] == pytest.approx(alone)
