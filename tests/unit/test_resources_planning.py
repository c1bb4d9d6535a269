"""Resource classes, SLAs, planner selection and the wukong planner."""

from __future__ import annotations

import pytest

import dagkube
from dagkube.errors import InvalidOption
from dagkube.planning import PlanningOptions, plan
from dagkube.planning.sla import parse_sla, sla_percentile
from dagkube.resources import cpu_millicores, format_memory, parse_classes, parse_memory


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512Mi", 512),
        ("2Gi", 2048),
        ("1.5Gi", 1536),
        ("1536", 1536),
        (" 4Gi ", 4096),
        ("1048576Ki", 1024),
        (256, 256),
    ],
)
def test_parse_memory_accepts(text, mib):
    assert parse_memory(text) == mib


@pytest.mark.parametrize("text", ["512MB", "-1Gi", "Gi", "", "1.0001Gi", "64Mi", "2 GB", True])
def test_parse_memory_rejects_with_accepted_forms(text):
    with pytest.raises(InvalidOption) as info:
        parse_memory(text)
    assert repr(text) in str(info.value) or "too small" in str(info.value)
    assert "512Mi" in str(info.value) or "128Mi" in str(info.value)


@pytest.mark.parametrize("text", ["1" * 400, "2Ti", "1048577"])
def test_parse_memory_rejects_sizes_beyond_the_largest_class(text):
    with pytest.raises(InvalidOption, match="too large: the largest class is 1Ti"):
        parse_memory(text)
    assert parse_memory("1Ti") == 1024 * 1024


def test_classes_are_sorted_and_distinct():
    assert parse_classes("2Gi,512Mi,2048") == [512, 2048]
    assert parse_classes(None) == [512, 1024, 2048]
    with pytest.raises(InvalidOption, match="No resource classes"):
        parse_classes(" , ")


def test_cpu_is_proportional_to_memory_and_capped():
    assert cpu_millicores(512) == 286
    assert cpu_millicores(2048) == 1143
    assert cpu_millicores(1792) == 1000
    assert cpu_millicores(64 * 1024) == 6000  # max_cpu 6
    assert cpu_millicores(4096, max_cpu=2) == 2000
    assert format_memory(2048) == "2Gi" and format_memory(1536) == "1536Mi"


@pytest.mark.parametrize(
    ("text", "normal"),
    [("avg", "avg"), ("P95", "p95"), ("p99.9", "p99.9"), ("p1", "p1"), ("mean", "avg")],
)
def test_sla_accepts(text, normal):
    assert parse_sla(text) == normal


@pytest.mark.parametrize("text", ["p100", "p0", "p", "95", "p-5", "median", "p100.5"])
def test_sla_rejects_listing_accepted_forms(text):
    with pytest.raises(InvalidOption, match="'avg', or a percentile"):
        parse_sla(text)


def test_sla_percentile():
    assert sla_percentile("avg") is None
    assert sla_percentile("p99.9") == 99.9


@dagkube.task
def inc(x):
    return x + 1


@dagkube.task(min_memory="2Gi")
def heavy(x):
    return x


def test_wukong_plan_is_flexible_single_class():
    wf = dagkube.Workflow(inc(inc(1)), name="w")
    p = plan(wf.dag, "wukong", PlanningOptions([512, 1024, 2048, 4096], sla="p95"))
    assert p.planner == "wukong" and p.sla == "p95"
    assert {t.memory_mib for t in p.tasks.values()} == {1024}
    assert all(t.worker_id is None for t in p.tasks.values())
    assert p.notes and "flexible" in p.notes[0]
    assert p.history_samples == 0
    assert any("no history" in note for note in p.notes)


def test_min_memory_hint_raises_the_class():
    wf = dagkube.Workflow(heavy(inc(1)), name="w")
    p = plan(wf.dag, "wukong", PlanningOptions([512, 1024, 2048]))
    assert p.classes_used() == [2048]


def test_unknown_planner_lists_the_accepted_ones():
    wf = dagkube.Workflow(inc(1))
    with pytest.raises(
        InvalidOption,
        match="Planner 'magic' is unknown: choose one of wukong, uniform, non-uniform",
    ):
        wf.plan("magic")
