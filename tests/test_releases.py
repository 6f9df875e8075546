"""synrepl.releases against the releases themselves: the installed Synapse's
source, and (``-m releases``, network) each boundary release's wheel from
the package index, read as data by tests/synapse_releases.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from synapse_releases import WheelFacts, download_wheel, read_installed, read_wheel

from synrepl.commands import COMMAND_TYPES
from synrepl.http import ENDPOINTS
from synrepl.releases import (
    COMMANDS_SINCE,
    DEVICE_LISTS_FIELDS,
    ENDPOINT_PATH_NAMES_UNTIL,
    ENDPOINTS_SINCE,
    ENDPOINTS_UNTIL,
    NEWEST,
    OLDEST_KNOWN,
    STREAMS_SINCE,
    WRITER_KEYS_SINCE,
    ReleaseFacts,
    SynapseRelease,
    UnknownReleaseError,
    facts_for,
)
from synrepl.sharding import STREAM_WRITER_KEYS
from synrepl.streams import STREAM_NAMES


def r(text: str) -> SynapseRelease:
    return SynapseRelease.parse(text)


def test_versions_parse_from_every_form_they_come_in() -> None:
    assert r("1.135.0") == SynapseRelease(1, 135, 0)
    assert r("Synapse/1.163.2") == SynapseRelease(1, 163, 2)
    assert r("v1.140.0rc1") == SynapseRelease(1, 140, 0)
    assert r("1.99") == SynapseRelease(1, 99, 0)
    assert str(r("1.110.3")) == "1.110.3"
    assert r("1.99.0") < r("1.100.0") < r("1.100.1")  # numbers, not text
    for bad in ("", "Synapse", "one.two", "1", "1.2.3.4"):
        with pytest.raises(UnknownReleaseError):
            r(bad)


def test_the_newest_release_has_everything_synrepl_knows() -> None:
    facts = facts_for(NEWEST)
    assert facts.known
    assert facts.streams == frozenset(STREAM_NAMES)
    assert facts.commands == frozenset(COMMAND_TYPES)
    assert facts.endpoints == frozenset(ENDPOINTS)
    assert facts.device_lists_fields == DEVICE_LISTS_FIELDS[-1][1]
    assert facts.writer_keys == STREAM_WRITER_KEYS
    assert all(facts.path_name(name) == name for name in ENDPOINTS)


def test_each_fact_turns_at_its_release() -> None:
    for stream, since in STREAMS_SINCE.items():
        before = SynapseRelease(since.major, since.minor - 1)
        assert stream in facts_for(since).streams and stream not in facts_for(before).streams
    for command, since in COMMANDS_SINCE.items():
        before = SynapseRelease(since.major, since.minor - 1)
        assert command in facts_for(since).commands
        assert command not in facts_for(before).commands
    for endpoint, since in ENDPOINTS_SINCE.items():
        before = SynapseRelease(since.major, since.minor - 1)
        assert endpoint in facts_for(since).endpoints
        assert facts_for(before).lacks_endpoint(endpoint) == (
            f"{endpoint} is served from Synapse {since} on, not by {before}"
        )
    for endpoint, until in ENDPOINTS_UNTIL.items():
        before = SynapseRelease(until.major, until.minor - 1)
        assert endpoint in facts_for(before).endpoints
        assert "was removed in Synapse" in (facts_for(until).lacks_endpoint(endpoint) or "")
    for key, since in WRITER_KEYS_SINCE.items():
        before = SynapseRelease(since.major, since.minor - 1)
        assert key in facts_for(since).writer_keys and key not in facts_for(before).writer_keys
    for endpoint, (older, until) in ENDPOINT_PATH_NAMES_UNTIL.items():
        before = SynapseRelease(until.major, until.minor - 1)
        assert facts_for(before).path_name(endpoint) == older
        assert facts_for(until).path_name(endpoint) == endpoint
    assert facts_for(r("1.109.9")).device_lists_fields == ("entity", "is_signature")
    assert facts_for(r("1.110.0")).device_lists_fields[0] == "user_id"
    assert not facts_for(r("1.97.0")).known and not facts_for(r("1.164.0")).known


def check_against(facts: ReleaseFacts, source: WheelFacts) -> None:
    """synrepl's facts of a release are what its source defines."""
    assert facts.streams == frozenset(source.streams)
    assert facts.commands == source.commands
    # synrepl's table holds the endpoints of NEWEST (and those removed since
    # OLDEST_KNOWN); an endpoint it never had a stub for is reported here.
    assert facts.endpoints == source.endpoints
    assert facts.device_lists_fields == source.streams["device_lists"]
    assert facts.writer_keys == source.writer_keys
    # Each endpoint synrepl has a stub for is declared by the class synrepl
    # names, under the name its path starts with in that release (which a
    # class declaring another endpoint's name gives away).
    for name, endpoint in ENDPOINTS.items():
        path_name = facts.path_name(name)
        if name in facts.endpoints or path_name != name:
            assert source.endpoint_classes.get(endpoint.synapse_class) == path_name, name


def test_the_installed_synapse_is_what_the_facts_say() -> None:
    import importlib.metadata

    installed = r(importlib.metadata.version("matrix-synapse"))
    check_against(facts_for(installed), read_installed())


#: Each fact's first release and the one before it, the oldest and the newest.
BOUNDARIES = sorted(
    {
        OLDEST_KNOWN,
        NEWEST,
        *(
            release
            for since in (
                *STREAMS_SINCE.values(),
                *COMMANDS_SINCE.values(),
                *ENDPOINTS_SINCE.values(),
                *ENDPOINTS_UNTIL.values(),
                *(since for since, _ in DEVICE_LISTS_FIELDS[1:]),
                *WRITER_KEYS_SINCE.values(),
                *(until for _, until in ENDPOINT_PATH_NAMES_UNTIL.values()),
            )
            for release in (since, SynapseRelease(since.major, since.minor - 1))
        ),
    }
)


@pytest.mark.releases
@pytest.mark.parametrize("release", BOUNDARIES, ids=str)
def test_each_boundary_release_is_what_the_facts_say(release: SynapseRelease) -> None:
    wheels = Path(os.environ.get("SYNREPL_WHEELS", Path.home() / ".cache" / "synrepl-wheels"))
    check_against(facts_for(release), read_wheel(download_wheel(str(release), wheels)))


def test_both_device_lists_shapes_parse_to_their_own_row_type() -> None:
    """Before 1.110 a device_lists row had two fields (entity, is_signature),
    since then three: each parses to its own row type, by its length, so a
    cluster half upgraded is read whole."""
    from synrepl.streams import DeviceListsEntityRow, DeviceListsRow, parse_row

    assert DeviceListsEntityRow.FIELDS == DEVICE_LISTS_FIELDS[0][1]
    assert DeviceListsRow.FIELDS == DEVICE_LISTS_FIELDS[-1][1]
    assert parse_row("device_lists", ["remote.example", True]) == DeviceListsEntityRow(
        "remote.example", True
    )
    assert parse_row("device_lists", ["@u:x", False, True]) == DeviceListsRow("@u:x", False, True)


def test_support_says_how_far_synrepl_vouches_for_a_release() -> None:
    """What ``synrepl doctor`` reports per instance: the interop suite's
    series is supported; a release whose facts were read is known, with what
    it lacks; anything outside that is named as such."""
    from synrepl.releases import INTEROP_TESTED, support_of

    assert support_of(r("1.163.0")).level == "tested"
    known = support_of(r("1.109.0"))
    assert known.level == "known"
    tested = ", ".join(map(str, INTEROP_TESTED))  # the interop matrix, as it is
    assert known.text == (
        "Synapse 1.109.0: its wire is known (no profile_updates, quarantined_media, "
        "sticky_events, thread_subscriptions streams; 11 endpoints missing; the older "
        f"device_lists row), but end to end synrepl is tested with {tested} only"
    )
    assert "no profile_updates stream;" in support_of(r("1.158.0")).text
    assert support_of(r("1.97.0")).level == "older"
    assert support_of(r("1.164.0")).level == "newer"


@pytest.mark.releases
def test_the_admin_api_fetches_events_from_the_release_the_facts_say() -> None:
    """AdminApiEventSource needs ``GET /_synapse/admin/v1/fetch_event``: its
    servlet is in ADMIN_FETCH_EVENT_SINCE's wheel and not in the one before."""
    import zipfile

    from synrepl.releases import ADMIN_FETCH_EVENT_SINCE

    wheels = Path(os.environ.get("SYNREPL_WHEELS", Path.home() / ".cache" / "synrepl-wheels"))
    before = SynapseRelease(ADMIN_FETCH_EVENT_SINCE.major, ADMIN_FETCH_EVENT_SINCE.minor - 1)

    def serves_fetch_event(release: SynapseRelease) -> bool:
        with zipfile.ZipFile(download_wheel(str(release), wheels)) as wheel:
            names = set(wheel.namelist())
            admin = "synapse/rest/admin/events.py"
            return admin in names and "/fetch_event/" in wheel.read(admin).decode()

    assert serves_fetch_event(ADMIN_FETCH_EVENT_SINCE)
    assert not serves_fetch_event(before)
