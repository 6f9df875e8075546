"""Nothing but a ProtocolError ever escapes parse_line, whatever the input."""

from __future__ import annotations

from corpus_files import all_corpus_entries
from hypothesis import example, given
from hypothesis import strategies as st

from synrepl import COMMAND_TYPES, Command, ProtocolError, encode, parse_line

_REAL_LINES = [line for _, line in all_corpus_entries()[::50]]


def _parse_or_protocol_error(line: str) -> None:
    try:
        cmd = parse_line(line)
    except ProtocolError:
        return
    assert isinstance(cmd, Command)
    # Whatever parses must also encode (to a line that reads back the same).
    assert parse_line(encode(cmd)) == cmd


@given(st.text())
@example("")
@example("RDATA")
@example("RDATA a b c " + "[" * 100_000)
@example('USER_IP @a:x ["t","i","u",null,1e400]')
@example("POSITION a b -0 -0")
def test_arbitrary_text(line: str) -> None:
    """Arbitrary text (with any unicode, surrogates, newlines) raises only ProtocolError."""
    _parse_or_protocol_error(line)


@given(st.sampled_from(sorted(COMMAND_TYPES)), st.text())
def test_known_name_arbitrary_arguments(name: str, args: str) -> None:
    """A known command name followed by anything raises only ProtocolError."""
    _parse_or_protocol_error(f"{name} {args}")


@st.composite
def _mutated_real_lines(draw: st.DrawFn) -> str:
    line = draw(st.sampled_from(_REAL_LINES))
    for _ in range(draw(st.integers(1, 4))):
        if not line:
            break
        i = draw(st.integers(0, len(line) - 1))
        action = draw(st.sampled_from(["delete", "insert", "replace", "truncate", "dup"]))
        ch = draw(st.sampled_from([" ", "[", "]", '"', ",", "0", "x", "\\", "\n", "é", "{"]))
        if action == "delete":
            line = line[:i] + line[i + 1 :]
        elif action == "insert":
            line = line[:i] + ch + line[i:]
        elif action == "replace":
            line = line[:i] + ch + line[i + 1 :]
        elif action == "truncate":
            line = line[:i]
        else:
            j = draw(st.integers(i, len(line)))
            line = line[:j] + line[i:j] + line[j:]
    return line


@given(_mutated_real_lines())
def test_mutated_real_lines(line: str) -> None:
    """Real lines with characters deleted, inserted, replaced or duplicated raise only
    ProtocolError (or still parse, and then round-trip)."""
    _parse_or_protocol_error(line)
