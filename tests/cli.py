"""Running the real `merger` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_merger(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m merger.cli ARGS` with this tree first on the path; `timeout` only guards against hangs."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "merger.cli", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(process: subprocess.CompletedProcess, *expected: str, limit: int = 1200) -> str:
    """The command failed with status 2 and one bounded `merger: error:` line holding `expected`."""
    assert process.returncode == 2, (process.returncode, process.stderr[-2000:])
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("merger: error: "), process.stderr[-2000:]
    assert len(lines[0]) <= limit, len(lines[0])
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
