"""One virtual environment per Synapse release, for the interop matrix.

A release is installed as it could be installed when it came out: its own
binary wheel (the sdists need a Rust toolchain), with every dependency at the
newest version uploaded no later than two days after that wheel (pip's
``--uploaded-prior-to``).  A 2023 release run with today's dependencies fails
at import (1.98.0 and today's prometheus-client cannot even build a class
hierarchy together), so "installable here" means installable as of its date.

The upload time comes from the package index's JSON simple API
(``SYNREPL_SYNAPSE_INDEX``, default PyPI), and the install reads that index
alone: pip's configuration files are not read, because a local mirror
without upload times would let newer packages through.

Usage::

    python tests/interop/synapse_envs.py [--root DIR] RELEASE ...

prints, for each release, the interpreter to give the suite as
``SYNREPL_SYNAPSE_PYTHON``.  An environment already built for a release
(``synrepl-env.json`` says which) is reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

INDEX = os.environ.get("SYNREPL_SYNAPSE_INDEX", "https://pypi.org/simple")

#: How long after a release its dependencies may have been uploaded: a
#: release's wheels for all platforms can take a day to appear, and a bug-fix
#: release of a dependency often follows within one.
GRACE = datetime.timedelta(days=2)

#: pip new enough for ``--uploaded-prior-to`` (pip 25.3).
PIP = "pip>=25.3"


class InstallError(RuntimeError):
    """A release could not be installed."""


def upload_time(release: str, index: str = INDEX) -> datetime.datetime:
    """When the first of ``release``'s wheels was uploaded to ``index``."""
    request = urllib.request.Request(
        f"{index.rstrip('/')}/matrix-synapse/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        listing = json.load(answer)
    wheel = re.compile(rf"matrix_synapse-{re.escape(release)}-.*\.whl$")
    times = [
        datetime.datetime.fromisoformat(f["upload-time"])
        for f in listing["files"]
        if wheel.match(f["filename"]) and f.get("upload-time")
    ]
    if not times:
        raise InstallError(f"{index} lists no wheel of matrix-synapse {release}")
    return min(times)


def _pip(python: Path, *args: str) -> None:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_CONSTRAINT"):
        env.pop(name, None)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--index-url", INDEX, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise InstallError(
            f"pip install {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )


def installed_release(python: str | Path) -> str | None:
    """The matrix-synapse version ``python``'s environment holds (None: none)."""
    answer = subprocess.run(
        [
            str(python),
            "-c",
            "from importlib.metadata import version; print(version('matrix-synapse'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return answer.stdout.strip() if answer.returncode == 0 else None


def interpreter(directory: Path) -> Path:
    return directory / "bin" / "python"


#: What the differential and drift tests import beside Synapse and synrepl.
TEST_REQUIREMENTS = (
    "hypothesis",
    "pytest",
    "pytest-xdist",
    "pytest-twisted",
    "orjson",
    "rich",
    "redis",
)

REPO = Path(__file__).resolve().parents[2]


def add_tests(python: Path) -> None:
    """Make the environment able to run the differential tests too.

    synrepl goes in without its dependencies, and what the tests need is
    added only where it changes none of the release's own packages (the
    environment's freeze is the constraint), so the Synapse processes started
    from this environment run exactly as installed.
    """
    frozen = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    constraints = python.parent.parent / "synapse-constraints.txt"
    constraints.write_text(frozen)
    _pip(python, "--no-deps", "-e", str(REPO))
    _pip(python, "-c", str(constraints), *TEST_REQUIREMENTS)


def ensure(release: str, root: Path, *, tests: bool = False) -> Path:
    """The interpreter of an environment holding ``release``, built if need be.

    ``tests`` also installs synrepl and the differential tests' needs
    (:func:`add_tests`).
    """
    directory = root / f"synapse-{release}"
    marker = directory / "synrepl-env.json"
    if marker.exists():
        built = json.loads(marker.read_text())
        if built.get("release") == release and (built.get("tests") or not tests):
            return interpreter(directory)
    cutoff = upload_time(release) + GRACE
    venv.EnvBuilder(clear=True, with_pip=True).create(directory)
    python = interpreter(directory)
    _pip(python, "--upgrade", PIP)
    _pip(
        python,
        "--only-binary=matrix-synapse",
        "--uploaded-prior-to",
        cutoff.strftime("%Y-%m-%dT%H:%M:%SZ"),
        f"matrix-synapse[postgres,redis]=={release}",
    )
    if tests:
        add_tests(python)
    marker.write_text(
        json.dumps({"release": release, "dependencies_until": cutoff.isoformat(), "tests": tests})
    )
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("releases", nargs="+", metavar="RELEASE")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("SYNREPL_SYNAPSE_ENVS", ".synapse-envs")),
        help="where the environments live (default: $SYNREPL_SYNAPSE_ENVS or .synapse-envs)",
    )
    parser.add_argument(
        "--tests",
        action="store_true",
        help="also install synrepl and the differential tests' needs",
    )
    args = parser.parse_args(argv)
    for release in args.releases:
        try:
            print(release, ensure(release, args.root.resolve(), tests=args.tests))
        except InstallError as e:
            print(f"Synapse {release}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
