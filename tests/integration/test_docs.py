"""The README's Python examples run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_examples_run(tmp_path, redis_server):
    blocks = python_blocks()
    assert len(blocks) >= 2
    script = "\n".join(blocks)
    # The tour's printed value must be the real one.
    script += "\nassert wf.run() == 170346800\n"
    path = tmp_path / "readme_tour.py"
    path.write_text(script)
    result = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "DAGKUBE_REDIS_URL": redis_server.url},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "170346800"
