"""A failing task's remote traceback shows the user's file name and source line, however the
function was defined and whichever cloudpickle the project allows serialized it.

cloudpickle 3.1.3 renames the file of every function it pickles by value to ``<dynamic-code>``;
older versions keep it. Both are checked: the locked version in this process's environment and
the lowest version pyproject.toml allows, installed beside the suite and put first on the
probe's PYTHONPATH (the probe's workers inherit it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

PROBE = ROOT / "tests" / "data" / "traceback_probe.py"
CASES = ("file", "module", "inline", "exec", "cell")


def lowest_allowed(requirement: str) -> str:
    """``cloudpickle>=3.0`` -> ``3.0.0``: the oldest release the dependency range admits."""
    match = re.fullmatch(r"cloudpickle\s*>=\s*([0-9.]+)(,.*)?", requirement)
    assert match, f"cloudpickle's requirement {requirement!r} has no lower bound to test"
    parts = match.group(1).split(".")
    return ".".join([*parts, "0", "0"][:3])


def uv_binary() -> str:
    local = ROOT / ".tools" / "uv" / "bin" / "uv"
    found = str(local) if local.exists() else shutil.which("uv")
    assert found, "uv is needed to install the lowest cloudpickle: run `make test` (it installs uv)"
    return found


@pytest.fixture(scope="module")
def tracebacks(redis_server, tmp_path_factory) -> dict[str, dict]:
    """version label -> the probe's report (cloudpickle version, traceback per case)."""
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = [r for r in requirements["dependencies"] if r.startswith("cloudpickle")]
    lowest = lowest_allowed(pin)
    overlay = tmp_path_factory.mktemp("cloudpickle-lowest")
    subprocess.run(
        [uv_binary(), "pip", "install", "--quiet", "--no-deps", "--target", str(overlay),
         "--python", sys.executable, f"cloudpickle=={lowest}"],
        check=True,
    )  # fmt: skip
    reports = {}
    for label, pythonpath in (("locked", ""), ("lowest", str(overlay))):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p)}
        home = tmp_path_factory.mktemp(f"home-{label}")
        done = subprocess.run(
            [sys.executable, str(PROBE), redis_server.url, str(home), *CASES],
            capture_output=True, text=True, env=env, timeout=240, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        reports[label] = json.loads(done.stdout.strip().splitlines()[-1])
    assert reports["lowest"]["cloudpickle"] == lowest
    return reports


@pytest.mark.parametrize("version", ["locked", "lowest"])
@pytest.mark.parametrize(
    ("case", "where"),
    [
        ("file", r"dagkube-probe-\w+/probe_pipeline\.py"),  # deleted before the run
        ("module", re.escape(str(ROOT / "tests" / "integration" / "test_runtime.py"))),
        ("inline", r"dagkube-inline-\w+/probe_inline\.py"),  # gone with the build's folder
        ("cell", re.escape("<ipython-input-7-0123456789ab>")),
    ],
)
def test_the_traceback_shows_the_users_file_and_lines(tracebacks, version, case, where):
    report = tracebacks[version]["cases"][case]
    assert report["status"] == "failed"
    text = report["traceback"]
    assert "<dynamic-code>" not in text
    if case == "module":
        assert re.search(rf'File "{where}", line \d+, in boom\n +raise ValueError', text), text
        return
    clean = rf'File "[^"]*{where}", line 13, in clean\n    return check\(rows\)\n'
    assert re.search(clean, text), text
    assert re.search(
        rf'File "[^"]*{where}", line 6, in check\n'
        rf'    raise ValueError\(f"only {{len\(rows\)}} rows arrived"\)\n',
        text,
    ), text
    assert text.rstrip().endswith("ValueError: only 3 rows arrived")


@pytest.mark.parametrize("version", ["locked", "lowest"])
def test_code_without_a_file_says_its_source_is_not_available(tracebacks, version):
    text = tracebacks[version]["cases"]["exec"]["traceback"]
    note = "(source not available: <notebook-cell> is not a file: the code was built from a string"
    assert re.search(rf'File "<notebook-cell>", line 13, in clean\n +{re.escape(note)}', text), text
    assert re.search(rf'File "<notebook-cell>", line 6, in check\n +{re.escape(note)}', text), text


def test_lowest_allowed_reads_the_lower_bound():
    assert lowest_allowed("cloudpickle>=3.0") == "3.0.0"
    assert lowest_allowed("cloudpickle>=3.1.2,<4") == "3.1.2"
    with pytest.raises(AssertionError, match="no lower bound"):
        lowest_allowed("cloudpickle")
