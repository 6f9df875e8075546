"""Reading Prometheus expositions in tests, and ``promtool`` (Debian's
prometheus package) on them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

#: (sample name, sorted labels) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(exposition: bytes) -> Samples:
    """Every sample of a text exposition, keyed by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


def check_metrics(exposition: bytes) -> None:
    """``promtool check metrics``: the exposition follows Prometheus' rules."""
    _promtool(["check", "metrics"], exposition)


def check_rules(path: Path) -> None:
    """``promtool check rules``: every expression in the file is valid PromQL."""
    _promtool(["check", "rules", str(path)], None)


def _promtool(args: list[str], stdin: bytes | None) -> None:
    """Fail the test with promtool's complaints; skip where it is not installed
    (``.ci/run`` installs it)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    checked = subprocess.run([promtool, *args], input=stdin, capture_output=True, check=False)
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
