"""Transfer predictions describe what the worker measures: a download per task (one fetch of
the values it lacks) and an upload per stored output, each learnt from its own direction's
samples, robust to the stalls of a loaded machine."""

from __future__ import annotations

import pytest

from dagkube.planning.history import HistorySnapshot, TaskSample
from dagkube.planning.predictions import Predictor
from dagkube.planning.transfers import MIN_BUCKET_SAMPLES, fit_transfers

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
