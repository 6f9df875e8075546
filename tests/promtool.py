"""``promtool check metrics`` on an exposition (Debian's prometheus package)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def check_metrics(exposition: bytes) -> None:
    """Fail the test with promtool's complaints; skip where it is not installed
    (``.ci/run`` installs it)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, check=False
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()


def check_rules(path: Path) -> None:
    """``promtool check rules``: every expression in the file is valid PromQL."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    checked = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, check=False
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
