"""dagkube.runtime.cgroups on fake v1 and v2 cgroup trees in tmp_path (never /sys/fs/cgroup)."""

from __future__ import annotations

import errno
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from dagkube.runtime import cgroups
from dagkube.runtime.cgroups import Cgroup, CgroupError, Hierarchy, Limits, Usage

LIMITS = Limits(memory_bytes=100 * 2**20, cpu_millis=286)
POD = "dagkube-local/dkbr0/node-0/pod-1"
SUBTREE = "cgroup.subtree_control"
V1_CONTROLLERS = {"memory": "memory", "cpu,cpuacct": "cpu,cpuacct", "pids": "pids"}


def mount_line(mount_id: int, mount_point: Path, fstype: str, options: str) -> str:
    """One /proc/self/mountinfo line (the kernel writes a space in a path as \\040)."""
    escaped = str(mount_point).replace(" ", "\\040")
    return (
        f"{mount_id} 26 0:{mount_id} / {escaped} rw,nosuid,nodev,noexec,relatime "
        f"shared:{mount_id} - {fstype} {fstype} {options}"
    )


def write_mountinfo(folder: Path, lines: list[str]) -> Path:
    base = [
        "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro",
        "25 22 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw",
        "26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755",
    ]
    path = folder / "mountinfo"
    path.write_text("\n".join(base + lines) + "\n")
    return path


def v2_folder(folder: Path, controllers: str = "cpuset cpu io memory hugetlb pids") -> Path:
    """A unified-hierarchy cgroup folder with the files the kernel puts in every one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cgroup.controllers").write_text(controllers + "\n")
    for name in ("cgroup.subtree_control", "cgroup.procs", "memory.max", "cpu.max"):
        (folder / name).touch()
    return folder


def v1_folder(folder: Path) -> Path:
    """A cgroup folder of a v1 hierarchy, with the control files set_limits writes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("cgroup.procs", "memory.limit_in_bytes", "cpu.cfs_period_us", "cpu.cfs_quota_us"):
        (folder / name).touch()
    return folder


@pytest.fixture
def v2_root(tmp_path: Path) -> Path:
    """A cgroup2 mount with the pod's cgroup and its ancestors there, as the kernel shows them."""
    root = v2_folder(tmp_path / "unified")
    for ancestor in ("dagkube-local", "dagkube-local/dkbr0", "dagkube-local/dkbr0/node-0"):
        v2_folder(root / ancestor, controllers="cpu memory pids")
    v2_folder(root / POD, controllers="cpu memory pids")
    return root


@pytest.fixture
def v1_roots(tmp_path: Path) -> dict[str, Path]:
    """One v1 hierarchy per mount, cpu and cpuacct sharing one as systemd mounts them."""
    roots = {}
    for mount, controllers in V1_CONTROLLERS.items():
        v1_folder(tmp_path / mount)
        v1_folder(tmp_path / mount / POD)
        for controller in controllers.split(","):
            roots[controller] = tmp_path / mount
    return roots


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str]]:
    """Every (file, value) the module writes, in order: a plain file keeps only the last one,
    where the kernel would accumulate "+memory", "+cpu", ... in cgroup.subtree_control."""
    seen: list[tuple[Path, str]] = []
    original = cgroups._write

    def record(path: Path, value: str) -> None:
        seen.append((path, value))
        original(path, value)

    monkeypatch.setattr(cgroups, "_write", record)
    return seen


# --- Finding the hierarchy -------------------------------------------------------------------


def test_mounts_reads_cgroup2_and_v1_controllers(tmp_path):
    unified, memory, cpu = tmp_path / "cgroup root", tmp_path / "memory", tmp_path / "cpu,cpuacct"
    mountinfo = write_mountinfo(
        tmp_path,
        [
            mount_line(27, unified, "cgroup2", "rw,nsdelegate"),
            mount_line(28, tmp_path / "systemd", "cgroup", "rw,xattr,name=systemd"),
            mount_line(35, memory, "cgroup", "rw,memory"),
            mount_line(36, cpu, "cgroup", "rw,cpu,cpuacct"),
            mount_line(37, tmp_path / "blkio", "cgroup", "rw,blkio"),
        ],
    )
    assert cgroups._mounts(mountinfo) == (unified, {"memory": memory, "cpu": cpu, "cpuacct": cpu})


def test_detect_prefers_v2_when_it_has_memory_and_cpu(tmp_path):
    unified = v2_folder(tmp_path / "unified")
    v1_folder(tmp_path / "memory")
    mountinfo = write_mountinfo(
        tmp_path,
        [
            mount_line(27, unified, "cgroup2", "rw,nsdelegate,memory_recursiveprot"),
            mount_line(35, tmp_path / "memory", "cgroup", "rw,memory"),
        ],
    )
    hierarchy = cgroups.detect(mountinfo=mountinfo)
    assert hierarchy is not None
    assert (hierarchy.layout, hierarchy.roots) == ("v2", {"unified": unified})


@pytest.mark.parametrize(
    "v2_controllers", [None, "", "cpu pids"], ids=["v1-only", "hybrid", "v2-without-memory"]
)
def test_detect_falls_back_to_v1(tmp_path, v1_roots, v2_controllers):
    lines = [
        mount_line(35 + i, tmp_path / mount, "cgroup", f"rw,{controllers}")
        for i, (mount, controllers) in enumerate(V1_CONTROLLERS.items())
    ]
    if v2_controllers is not None:
        unified = v2_folder(tmp_path / "unified", controllers=v2_controllers)
        lines.append(mount_line(27, unified, "cgroup2", "rw,nsdelegate"))
    hierarchy = cgroups.detect(mountinfo=write_mountinfo(tmp_path, lines))
    assert hierarchy is not None
    assert (hierarchy.layout, hierarchy.roots) == ("v1", v1_roots)


def test_detect_skips_read_only_hierarchies(tmp_path, v1_roots, monkeypatch):
    # As in a container with /sys/fs/cgroup mounted read-only: access() fails with EROFS even
    # for root, which these tests run as, so access() is what is faked here.
    unified = v2_folder(tmp_path / "unified")
    lines = [mount_line(27, unified, "cgroup2", "rw,nsdelegate")] + [
        mount_line(35 + i, tmp_path / mount, "cgroup", f"rw,{controllers}")
        for i, (mount, controllers) in enumerate(V1_CONTROLLERS.items())
    ]
    mountinfo = write_mountinfo(tmp_path, lines)
    read_only = {unified}
    monkeypatch.setattr(cgroups.os, "access", lambda path, mode: Path(path) not in read_only)

    hierarchy = cgroups.detect(mountinfo=mountinfo)
    assert hierarchy is not None and hierarchy.layout == "v1"
    read_only.add(tmp_path / "pids")
    assert cgroups.detect(mountinfo=mountinfo) is None


@pytest.mark.parametrize(
    "mounts",
    [
        [],
        [("unified", "cgroup2", "rw")],  # v2 without memory and cpu, no v1
        [("memory", "cgroup", "rw,memory"), ("pids", "cgroup", "rw,pids")],  # no cpu
        [("memory", "cgroup", "rw,memory"), ("gone", "cgroup", "rw,cpu,cpuacct")],  # not there
    ],
    ids=["none", "v2-unusable", "v1-without-cpu", "v1-missing-folder"],
)
def test_detect_finds_nothing_usable(tmp_path, mounts):
    v2_folder(tmp_path / "unified", controllers="io pids")
    for mount in ("memory", "pids"):
        v1_folder(tmp_path / mount)
    lines = [
        mount_line(30 + i, tmp_path / folder, fstype, options)
        for i, (folder, fstype, options) in enumerate(mounts)
    ]
    assert cgroups.detect(mountinfo=write_mountinfo(tmp_path, lines)) is None


# --- Creating and limiting --------------------------------------------------------------------


def test_v2_create_enables_controllers_in_ancestors_and_sets_limits(v2_root, writes):
    group = Hierarchy("v2", {"unified": v2_root}).create(f"{POD}/main-0", LIMITS)

    leaf = v2_root / POD / "main-0"
    assert group.folders == {"unified": leaf}
    assert (leaf / "memory.max").read_text() == "104857600"
    assert (leaf / "cpu.max").read_text() == "28600 100000"
    ancestors = ["", "dagkube-local", "dagkube-local/dkbr0", "dagkube-local/dkbr0/node-0", POD]
    assert [(path.parent, value) for path, value in writes if path.name == SUBTREE] == [
        (v2_root / folder, f"+{controller}")
        for folder in ancestors
        for controller in ("memory", "cpu", "pids")
    ]
    assert not (leaf / SUBTREE).exists()  # a leaf keeps its controllers to itself
    assert group.procs_files == [leaf / "cgroup.procs"]


def test_v2_enables_only_offered_controllers_not_yet_enabled(tmp_path, writes):
    root = v2_folder(tmp_path / "unified", controllers="cpu memory io")
    (root / SUBTREE).write_text("memory\n")

    Hierarchy("v2", {"unified": root}).create("job", Limits())

    assert [(p, v) for p, v in writes if p.name == SUBTREE] == [(root / SUBTREE, "+cpu")]


def test_v2_reused_cgroup_gets_new_limits_and_no_swap(v2_root):
    (v2_root / POD / "memory.swap.max").write_text("max\n")
    hierarchy = Hierarchy("v2", {"unified": v2_root})

    group = hierarchy.create(POD, LIMITS)
    assert (v2_root / POD / "memory.swap.max").read_text() == "0"
    group.set_limits(Limits())
    assert (v2_root / POD / "memory.max").read_text() == "max"
    assert (v2_root / POD / "cpu.max").read_text() == "max 100000"


def test_v1_create_writes_limits_in_each_hierarchy(v1_roots, tmp_path):
    memsw = tmp_path / "memory" / POD / "memory.memsw.limit_in_bytes"
    memsw.touch()

    group = Hierarchy("v1", v1_roots).create(POD, LIMITS)

    memory, cpu = tmp_path / "memory" / POD, tmp_path / "cpu,cpuacct" / POD
    assert (memory / "memory.limit_in_bytes").read_text() == "104857600"
    assert memsw.read_text() == "104857600"  # no swap on top of the memory limit
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "28600"
    assert group.procs_files == sorted(
        [memory / "cgroup.procs", cpu / "cgroup.procs", tmp_path / "pids" / POD / "cgroup.procs"]
    )


def test_v1_unlimited(v1_roots, tmp_path):
    Hierarchy("v1", v1_roots).create(POD, Limits())
    assert (tmp_path / "memory" / POD / "memory.limit_in_bytes").read_text() == "-1"
    assert (tmp_path / "cpu,cpuacct" / POD / "cpu.cfs_quota_us").read_text() == "-1"
    assert (tmp_path / "cpu,cpuacct" / POD / "cpu.cfs_period_us").read_text() == "100000"


@pytest.mark.parametrize(("cpu_millis", "quota_us"), [(1, 1000), (9, 1000), (10, 1000), (11, 1100)])
def test_tiny_quota_is_raised_to_the_kernel_minimum(
    v1_roots, v2_root, tmp_path, cpu_millis, quota_us
):
    Hierarchy("v2", {"unified": v2_root}).create(POD, Limits(cpu_millis=cpu_millis))
    Hierarchy("v1", v1_roots).create(POD, Limits(cpu_millis=cpu_millis))
    assert (v2_root / POD / "cpu.max").read_text() == f"{quota_us} 100000"
    assert (tmp_path / "cpu,cpuacct" / POD / "cpu.cfs_quota_us").read_text() == str(quota_us)


@pytest.mark.parametrize("path", ["", "/", "//"])
def test_the_root_cannot_be_a_workers_cgroup(v2_root, path):
    with pytest.raises(CgroupError, match="must not be the root"):
        Hierarchy("v2", {"unified": v2_root}).create(path, LIMITS)


def test_v1_needs_memory_and_cpu(v1_roots):
    roots = {name: root for name, root in v1_roots.items() if name != "cpu"}
    with pytest.raises(CgroupError, match="needs the memory and cpu controllers"):
        Hierarchy("v1", roots).create(POD, LIMITS)


def test_unwritable_control_file_is_a_cgroup_error_naming_it(v2_root):
    cpu_max = v2_root / POD / "cpu.max"
    cpu_max.unlink()
    cpu_max.mkdir()  # what even root cannot write to
    with pytest.raises(CgroupError, match=re.escape(f"cannot write '28600 100000' to {cpu_max}: ")):
        Hierarchy("v2", {"unified": v2_root}).create(POD, LIMITS)


# --- Joining and measuring --------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_add_writes_the_pid_into_every_procs_file(v1_roots, v2_root, layout):
    roots = v1_roots if layout == "v1" else {"unified": v2_root}
    group = Hierarchy(layout, roots).create(POD, LIMITS)

    group.add(4242)

    assert len(group.procs_files) == (3 if layout == "v1" else 1)
    assert [procs.read_text() for procs in group.procs_files] == ["4242"] * len(group.procs_files)
    assert group.pids() == [4242]


def test_add_to_a_removed_cgroup_is_a_cgroup_error_naming_the_file(v2_root):
    group = Hierarchy("v2", {"unified": v2_root}).create(POD, LIMITS)
    shutil.rmtree(v2_root / POD)
    with pytest.raises(
        CgroupError, match=re.escape(f"cannot write '4242' to {v2_root / POD}/cgroup.procs")
    ):
        group.add(4242)


def test_v2_usage(v2_root):
    group = Hierarchy("v2", {"unified": v2_root}).create(POD, LIMITS)
    folder = v2_root / POD
    (folder / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n")
    (folder / "memory.peak").write_text("157286400\n")
    (folder / "cpu.stat").write_text(
        "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
        "nr_periods 40\nnr_throttled 7\nthrottled_usec 350000\n"
    )
    assert group.usage() == Usage(
        memory_peak_bytes=157286400,
        oom_kills=2,
        cpu_usage_s=2.5,
        throttled_periods=7,
        throttled_s=0.35,
    )


def test_v1_usage(v1_roots, tmp_path):
    group = Hierarchy("v1", v1_roots).create(POD, LIMITS)
    memory, cpu = tmp_path / "memory" / POD, tmp_path / "cpu,cpuacct" / POD
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (memory / "memory.max_usage_in_bytes").write_text("209715200\n")
    (cpu / "cpu.stat").write_text("nr_periods 50\nnr_throttled 4\nthrottled_time 350000000\n")
    (cpu / "cpuacct.usage").write_text("2500000000\n")
    assert group.usage() == Usage(
        memory_peak_bytes=209715200,
        oom_kills=1,
        cpu_usage_s=2.5,
        throttled_periods=4,
        throttled_s=0.35,
    )


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_usage_of_a_fresh_cgroup_is_zero(v1_roots, v2_root, layout):
    roots = v1_roots if layout == "v1" else {"unified": v2_root}
    group = Hierarchy(layout, roots).create(POD, LIMITS)
    assert group.usage() == Usage(None, 0, 0.0, 0, 0.0)


# --- Removing ---------------------------------------------------------------------------------
# On a real cgroup the kernel's control files vanish with rmdir; in a plain folder they would
# not, so these trees hold only what rmdir can remove.


def test_remove_deletes_the_cgroup_and_its_descendants(tmp_path):
    pod = tmp_path / "unified" / "pod-1"
    for child in ("main-0", "main-1/nested", "sidecar-0"):
        (pod / child).mkdir(parents=True)
    group = Cgroup(Hierarchy("v2", {"unified": tmp_path / "unified"}), {"unified": pod})

    group.remove()

    assert list((tmp_path / "unified").iterdir()) == []
    group.remove()  # already gone: nothing to do


def test_remove_kills_the_processes_inside(tmp_path):
    pod = tmp_path / "unified" / "pod-1"
    pod.mkdir(parents=True)
    process = subprocess.Popen(["sleep", "300"])
    try:
        (pod / "cgroup.procs").write_text(f"{process.pid}\n")
        group = Cgroup(Hierarchy("v2", {"unified": tmp_path / "unified"}), {"unified": pod})
        # The fake procs file never empties, so remove() gives up after killing.
        with pytest.raises(
            CgroupError, match=re.escape(f"processes [{process.pid}] in {pod} did not exit")
        ):
            group.remove(timeout_s=0.0)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()


def test_remove_of_a_cgroup_another_remover_is_taking_down_is_not_an_error(tmp_path, monkeypatch):
    """Reading cgroup.procs of a cgroup the kernel is destroying fails with ENODEV."""
    pod = tmp_path / "unified" / "pod-1"
    pod.mkdir(parents=True)
    group = Cgroup(Hierarchy("v2", {"unified": tmp_path / "unified"}), {"unified": pod})
    read_text = Path.read_text

    def dying(path: Path, *args, **kwargs) -> str:
        if path.name == "cgroup.procs":
            raise OSError(errno.ENODEV, "No such device")
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", dying)
    group.remove()
    assert not pod.exists()


def test_remove_of_a_folder_that_is_not_empty_is_a_cgroup_error(tmp_path):
    pod = tmp_path / "unified" / "pod-1"
    pod.mkdir(parents=True)
    (pod / "leftover").touch()
    group = Cgroup(Hierarchy("v2", {"unified": tmp_path / "unified"}), {"unified": pod})
    with pytest.raises(CgroupError, match=re.escape(f"cannot remove {pod}: ")):
        group.remove()
