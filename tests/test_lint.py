"""
The code's own checks: ruff (pycodestyle, pyflakes, import order, pyupgrade,
bugbear) and mypy (with the zope.interface plugin; strict on the pure modules),
configured in pyproject.toml.  They run with the suite so that CI fails on a
regression.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = run("ruff", "check", "--no-cache", "mailhub", "tests", "bench", "twisted", "setup.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = run("mypy", "--cache-dir", os.path.join(ROOT, ".mypy_cache"))
    assert result.returncode == 0, result.stdout + result.stderr
