"""Running a benchmark's ``--quick`` smoke run from a test."""

from __future__ import annotations

import subprocess
import sys

from tests.paths import REPO


def run_quick(name: str, *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``benchmarks/<name> --quick`` in the repository; asserts it exited 0."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), "--quick"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done
