"""Run the interop suite and the differential tests against each Synapse release of the matrix.

The matrix is :data:`synrepl.releases.INTEROP_TESTED`.  For each release
asked for, an environment holding it is built (``synapse_envs.py``: its own
wheel, dependencies of its day), then:

- the differential and drift tests (``tests/test_synapse_differential.py``
  and friends) run *inside* that environment, against that release's own
  classes, as synrepl.releases describes it;
- the interop suite runs from this interpreter, with the release's Synapse
  processes (``SYNREPL_SYNAPSE_PYTHON``), either whole (``--whole``) or its
  wire scenarios (:data:`WIRE_MODULES`);
- with the newest release, the mixed cluster too: a worker of the release
  before it (``SYNREPL_SYNAPSE_PREVIOUS_PYTHON``).

Each scenario's result (passed, failed, skipped) goes to ``--results``
(JSON, kept across runs: a run updates the scenarios it ran), and
``--table FILE`` rewrites the table between the ``matrix:start`` and
``matrix:end`` markers of FILE from it (``docs/tested-against.md``).

Usage (anything after ``--`` goes to the interop suite's pytest)::

    python tests/interop/matrix.py [--whole] [--root DIR] newest oldest 1.141.0 ... [-- -k cluster]
    python tests/interop/matrix.py --whole all
    python tests/interop/matrix.py --table docs/tested-against.md   # from saved results

Exit status 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import synapse_envs

from synrepl.releases import INTEROP_TESTED, NEWEST, SynapseRelease

#: The tests that compare synrepl with a release's own classes, run in its environment.
DIFFERENTIAL = (
    "tests/test_synapse_differential.py",
    "tests/test_http_synapse_drift.py",
    "tests/test_sharding.py",
    "tests/test_releases.py",
)

#: The interop modules run against every release even without ``--whole``:
#: joining and the rows each action produces, the cluster's writers and
#: faults, the HTTP stubs, the observers and the CLI's read of the traffic.
WIRE_MODULES = (
    "test_main_process.py",
    "test_cluster.py",
    "test_http_stubs.py",
    "test_observers.py",
)

#: Left out of the wire scenarios (run with ``--whole``): USER_SYNC's
#: presence scenario waits on Synapse's presence timers, two to five minutes
#: per run on older releases, and tests presence rather than the wire.
WIRE_DESELECTED = ("test_main_process.py::test_user_sync_and_clear_user_sync_drive_presence",)

#: Columns of the table, in order: a scenario is a test module.
SCENARIO_TITLES = {
    "differential": "differential and drift",
    "test_main_process": "main process",
    "test_cluster": "cluster",
    "test_mixed_cluster": "rolling upgrade",
    "test_http_stubs": "HTTP stubs",
    "test_observers": "observers",
    "test_event_sources": "event sources",
    "test_cli": "CLI",
    "test_cli_watch_events": "watch --full",
    "test_audit": "audit",
    "test_conformance": "conformance",
    "test_exporter": "exporter",
    "test_export": "export",
}


def pick(names: Iterable[str]) -> list[SynapseRelease]:
    """Releases by name: ``newest``, ``oldest``, ``all`` or a version."""
    chosen: list[SynapseRelease] = []
    for name in names:
        if name == "all":
            found = list(INTEROP_TESTED)
        elif name == "newest":
            found = [max(INTEROP_TESTED)]
        elif name == "oldest":
            found = [min(INTEROP_TESTED)]
        else:
            release = SynapseRelease.parse(name)
            if release not in INTEROP_TESTED:
                raise SystemExit(
                    f"{release} is not in the matrix (synrepl.releases.INTEROP_TESTED: "
                    f"{', '.join(map(str, INTEROP_TESTED))})"
                )
            found = [release]
        chosen += [r for r in found if r not in chosen]
    return sorted(chosen, reverse=True)


def previous_of(release: SynapseRelease) -> SynapseRelease | None:
    """The matrix's release just before ``release`` (the rolling upgrade's worker)."""
    older = [r for r in INTEROP_TESTED if r < release]
    return max(older) if older else None


def outcomes(junit: Path, group: str | None = None) -> dict[str, dict[str, int]]:
    """``{scenario: {"passed": n, "failed": n, "skipped": n}}`` from a JUnit
    XML file: a scenario is a test module, or ``group`` for all of them."""
    counts: dict[str, dict[str, int]] = {}
    for case in ET.parse(junit).iter("testcase"):
        scenario = group or case.get("classname", "").split(".")[0]
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            outcome = "failed"
        elif "skipped" in kinds:
            outcome = "skipped"
        else:
            outcome = "passed"
        counts.setdefault(scenario, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
    return counts


def run_pytest(
    python: str,
    args: Sequence[str],
    junit: Path,
    env: dict[str, str],
    cwd: Path,
    group: str | None = None,
) -> dict[str, dict[str, int]]:
    """Run pytest; its scenarios' tallies.  A run that ended without its
    report (pytest itself failed: usage, collection, a crash) counts as a
    failed scenario (``interop run``), so that it can never pass unnoticed."""
    junit.unlink(missing_ok=True)
    command = [python, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    print("+", " ".join(command), flush=True)
    code = subprocess.run(command, cwd=cwd, env=env, check=False).returncode
    tallies = outcomes(junit, group) if junit.exists() else {}
    if code not in (0, 1, 5) or (code == 1 and not any(t["failed"] for t in tallies.values())):
        tallies[f"{group or 'interop'} run"] = {"passed": 0, "failed": 1, "skipped": 0}
    return tallies


def run_release(
    release: SynapseRelease, root: Path, whole: bool, work: Path, extra: Sequence[str] = ()
) -> dict[str, dict[str, int]]:
    """Everything the matrix runs against one release; its scenarios' tallies."""
    started = time.monotonic()
    here = synapse_envs.installed_release(sys.executable)
    python = (
        sys.executable
        if here == str(release)
        else str(synapse_envs.ensure(str(release), root, tests=True))
    )
    env = {**os.environ, "SYNREPL_SYNAPSE_PYTHON": python}
    env.pop("SYNREPL_SYNAPSE_PREVIOUS_PYTHON", None)
    results: dict[str, dict[str, int]] = {}

    junit = work / f"differential-{release}.xml"
    differential = ["-q", "-m", "not releases", *DIFFERENTIAL]
    results |= run_pytest(python, differential, junit, env, REPO, group="differential")

    selection = [] if whole else [*WIRE_MODULES, *(f"--deselect={t}" for t in WIRE_DESELECTED)]
    previous = previous_of(release) if release == NEWEST else None
    if previous is not None:
        env["SYNREPL_SYNAPSE_PREVIOUS_PYTHON"] = str(synapse_envs.ensure(str(previous), root))
        if selection:
            selection.append("test_mixed_cluster.py")
    elif whole:
        selection = ["--ignore=test_mixed_cluster.py"]
    junit = work / f"interop-{release}.xml"
    results |= run_pytest(sys.executable, [*selection, *extra], junit, env, HERE)
    print(f"Synapse {release}: {time.monotonic() - started:.0f} s", flush=True)
    return results


def table(saved: dict[str, dict[str, object]]) -> str:
    """The markdown table of saved results: a row per release, a column per scenario."""
    releases = sorted(saved, key=SynapseRelease.parse, reverse=True)
    seen = {s for r in releases for s in saved[r]["scenarios"]}  # type: ignore[attr-defined]
    columns = [s for s in SCENARIO_TITLES if s in seen] + sorted(seen - set(SCENARIO_TITLES))
    lines = [
        "| release | " + " | ".join(SCENARIO_TITLES.get(c, c) for c in columns) + " | run |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for release in releases:
        entry = saved[release]
        scenarios: dict[str, dict[str, int]] = entry["scenarios"]  # type: ignore[assignment]
        cells = []
        for column in columns:
            tally = scenarios.get(column)
            if tally is None:
                cells.append("not run")
            elif tally["failed"]:
                cells.append(f"**FAIL** {tally['failed']} of {sum(tally.values())}")
            elif tally["passed"]:
                skipped = f", {tally['skipped']} skipped" if tally["skipped"] else ""
                cells.append(f"pass {tally['passed']}{skipped}")
            else:
                cells.append(f"skipped ({tally['skipped']})")
        lines.append(f"| {release} | " + " | ".join(cells) + f" | {entry['when']} |")
    return "\n".join(lines)


def write_table(path: Path, saved: dict[str, dict[str, object]]) -> None:
    text = path.read_text()
    start, end = "<!-- matrix:start -->", "<!-- matrix:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{table(saved)}\n{end}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("releases", nargs="*", help="newest, oldest, all or versions")
    parser.add_argument("--whole", action="store_true", help="the whole interop suite")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("SYNREPL_SYNAPSE_ENVS", REPO / ".synapse-envs")),
        help="where the release environments live",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(os.environ.get("SYNREPL_MATRIX_RESULTS", REPO / ".matrix-results.json")),
    )
    parser.add_argument("--table", type=Path, help="rewrite the matrix table in this file")
    args = parser.parse_args(argv)

    saved: dict[str, dict[str, object]] = (
        json.loads(args.results.read_text()) if args.results.exists() else {}
    )
    failed = False
    work = args.results.parent / ".matrix-junit"
    work.mkdir(parents=True, exist_ok=True)
    for release in pick(args.releases):
        try:
            scenarios = run_release(release, args.root.resolve(), args.whole, work, extra)
        except synapse_envs.InstallError as e:
            print(f"Synapse {release}: {e}", file=sys.stderr)
            scenarios = {"install": {"passed": 0, "failed": 1, "skipped": 0}}
        failed |= any(t["failed"] for t in scenarios.values())
        # A run updates the scenarios it ran and keeps the others' last results.
        entry = saved.setdefault(str(release), {"scenarios": {}})
        entry["scenarios"] = {**entry["scenarios"], **scenarios}  # type: ignore[dict-item]
        entry["when"] = datetime.date.today().isoformat()
        args.results.write_text(json.dumps(saved, indent=1, sort_keys=True))
    if args.table:
        write_table(args.table, saved)
    for release in sorted(saved, key=SynapseRelease.parse, reverse=True):
        print(release, json.dumps(saved[release]["scenarios"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
