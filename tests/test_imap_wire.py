"""IMAP command framing and argument parsing (unit tests, no network)."""

from __future__ import annotations

import calendar

import pytest

from twistmail.protocols.imap.parser import Arguments, ParseError, SequenceSet
from twistmail.protocols.imap.wire import Command, CommandReader, Continue, Literal, Refused


def reader(**limits) -> CommandReader:
    values = {"maxLine": 200, "maxLiteral": 100, "maxMessage": 10_000, "maxCommand": 1000}
    values.update(limits)
    return CommandReader(**values)


def events(r: CommandReader, data: bytes) -> list:
    r.feed(data)
    out = []
    while (event := r.next()) is not None:
        out.append(event)
    return out


def texts(command: Command) -> list:
    return [p if isinstance(p, bytes) else p.bytes() for p in command.parts]


def test_simple_commands_pipelined():
    out = events(reader(), b"a1 NOOP\r\na2 CAPABILITY\r\na3 LOGOUT\n")
    assert [texts(c) for c in out] == [[b"a1 NOOP"], [b"a2 CAPABILITY"], [b"a3 LOGOUT"]]


def test_command_split_across_reads():
    r = reader()
    assert events(r, b"a1 NO") == []
    assert r.pending
    [command] = events(r, b"OP\r\n")
    assert texts(command) == [b"a1 NOOP"]
    assert not r.pending


def test_synchronizing_literal_asks_for_continuation():
    r = reader()
    out = events(r, b"a1 LOGIN {5}\r\n")
    assert out == [Continue(5)]
    assert events(r, b"alice {6}\r\n") == [Continue(6)]
    [command] = events(r, b"secret\r\n")
    assert texts(command) == [b"a1 LOGIN ", b"alice", b" ", b"secret", b""]
    assert command.tag == b"a1"


def test_non_synchronizing_literal_needs_no_continuation():
    [command] = events(reader(), b"a1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n")
    assert texts(command) == [b"a1 LOGIN ", b"alice", b" ", b"secret", b""]


def test_literal_may_contain_crlf_and_braces():
    [command] = events(reader(), b"a1 X {9+}\r\n{1}\r\na\r\nb\r\n")
    assert texts(command) == [b"a1 X ", b"{1}\r\na\r\nb", b""]


def test_empty_literal():
    continuation, command = events(reader(), b"a1 LOGIN {0+}\r\n {0}\r\n\r\n")
    assert continuation == Continue(0)  # even an empty synchronizing literal waits for "+"
    assert texts(command) == [b"a1 LOGIN ", b"", b" ", b"", b""]


def test_oversized_sync_literal_refused_before_any_byte_is_buffered():
    r = reader()
    out = events(r, b"a1 LOGIN {101}\r\n")
    assert out == [Refused(b"a1", b"BAD Literal too large: at most 100 octets here")]
    # The client sends nothing more for that command; the next one works.
    [command] = events(r, b"a2 NOOP\r\n")
    assert texts(command) == [b"a2 NOOP"]


def test_oversized_non_sync_literal_is_fatal():
    [refused] = events(reader(), b"a1 LOGIN {101+}\r\n")
    assert refused.fatal and refused.tag == b"a1"


def test_append_message_may_be_large_and_is_limited_by_message_size():
    r = reader(maxMessage=5000)
    assert events(r, b"a1 APPEND INBOX {4000}\r\n") == [Continue(4000)]
    [command] = events(r, b"x" * 4000 + b"\r\n")
    literal = command.parts[1]
    assert isinstance(literal, Literal) and literal.size == 4000
    [refused] = events(r, b"a2 APPEND INBOX (\\Seen) {5001}\r\n")
    assert refused == Refused(b"a2", b"NO [TOOBIG] Message too large: at most 5000 octets")
    [refused] = events(r, b"a3 APPEND INBOX {5001+}\r\n")
    assert refused.fatal


def test_only_one_big_literal_per_append_by_default():
    r = reader()
    assert events(r, b"a1 APPEND INBOX {500}\r\n") == [Continue(500)]
    [refused] = events(r, b"x" * 500 + b" {500}\r\n")
    assert refused.tag == b"a1" and refused.response.startswith(b"NO [LIMIT]")


def test_multiappend_messages_bounded_in_count_and_total_octets():
    """RFC 3502: several messages in one APPEND, each may be big; the count and the
    total are bounded before a byte of the one over the limit is buffered."""
    r = reader(maxMessages=3, maxAppend=1500)
    assert events(r, b"a1 APPEND INBOX {500}\r\n") == [Continue(500)]
    assert events(r, b"x" * 500 + b" {500}\r\n") == [Continue(500)]
    [refused] = events(r, b"x" * 500 + b" {501}\r\n")
    assert refused == Refused(b"a1", b"NO [LIMIT] At most 3 messages and 1500 octets in one APPEND")
    assert events(r, b"a2 APPEND INBOX {500}\r\n") == [Continue(500)]
    for _ in range(2):
        assert events(r, b"x" * 500 + b" {500}\r\n") == [Continue(500)]
    [command] = events(r, b"x" * 500 + b"\r\n")
    assert [p.size for p in command.parts if isinstance(p, Literal)] == [500, 500, 500]
    r = reader(maxMessages=2, maxAppend=10_000)
    events(r, b"a3 APPEND INBOX {500}\r\n")
    events(r, b"x" * 500 + b" {500}\r\n")
    [refused] = events(r, b"x" * 500 + b" {500}\r\n")
    assert refused.response.startswith(b"NO [LIMIT]")


def test_big_append_literal_spools_to_disk(tmp_path):
    r = reader(maxMessage=3 * 1024 * 1024, spoolDir=str(tmp_path))
    events(r, b"a1 APPEND INBOX {2097152+}\r\n")
    for _ in range(32):
        r.feed(b"y" * 65536)
    [command] = events(r, b"\r\n")
    literal = command.parts[1]
    assert literal.size == 2 * 1024 * 1024
    assert len(list(tmp_path.iterdir())) == 1, "past 1 MiB the message is in a spool file"
    command.discard()


def test_overlong_line_is_refused_and_dropped_as_it_arrives():
    r = reader()
    [refused] = events(r, b"a1 NOOP " + b"x" * 300)
    assert refused == Refused(b"a1", b"BAD Command line too long")
    assert events(r, b"y" * 10_000) == []
    assert len(r._buf) == 0, "the endless line is not kept"
    [command] = events(r, b"\r\na2 NOOP\r\n")
    assert texts(command) == [b"a2 NOOP"]


def test_overlong_line_ending_in_non_sync_literal_is_fatal():
    r = reader()
    events(r, b"a1 X " + b"x" * 300)
    [refused] = events(r, b"{5+}\r\n")
    assert refused.fatal


def test_command_size_bounded_across_literals():
    r = reader(maxCommand=300)
    for _ in range(2):
        assert events(r, b"a1 X {100}\r\n") != []
        r.feed(b"z" * 100)
    out = events(r, b" {100}\r\n")
    assert isinstance(out[-1], Refused)


def test_discard_removes_spool_files(tmp_path):
    r = reader(maxMessage=3 * 1024 * 1024, spoolDir=str(tmp_path))
    events(r, b"a1 APPEND INBOX {2097152+}\r\n" + b"y" * (1024 * 1024 + 10))
    assert len(list(tmp_path.iterdir())) == 1
    r.discard()
    assert list(tmp_path.iterdir()) == []


# -- parser --------------------------------------------------------------------


def args(*parts) -> Arguments:
    return Arguments([p if isinstance(p, bytes) else p for p in parts])


def lit(data: bytes) -> Literal:
    from twistmail.delivery.spool import MessageSource

    return Literal(MessageSource.fromBytes(data))


def test_astring_forms():
    a = args(b'alice "se\\"cr\\\\et" ', lit(b"x y"), b" plain]ok")
    assert a.astring() == b"alice"
    a.sp()
    assert a.quoted() == b'se"cr\\et'
    a.sp()
    assert a.astring() == b"x y"
    a.sp()
    assert a.astring() == b"plain]ok"
    a.end()


@pytest.mark.parametrize("bad", [b'"unterminated', b'"bad \\x escape"', b"(", b""])
def test_astring_errors(bad):
    with pytest.raises(ParseError):
        args(bad).astring()


def test_nested_lists_and_flags():
    a = args(b"(\\Seen $Forwarded \\*) rest")
    assert a.flagList() == [b"\\Seen", b"$Forwarded", b"\\*"]
    a.sp()
    assert a.atom() == b"rest"


@pytest.mark.parametrize("text, largest, expected", [
    (b"1", 10, [(1, 1)]),
    (b"1:3,5,7:*", 10, [(1, 3), (5, 5), (7, 10)]),
    (b"*:4", 10, [(4, 10)]),
    (b"5:2,3", 10, [(2, 5)]),
    (b"*", 0, [(0, 0)]),
    (b"4294967295", 1, [(4294967295, 4294967295)]),
])
def test_sequence_sets(text, largest, expected):
    assert args(text).sequenceSet().resolve(largest) == expected


@pytest.mark.parametrize("bad", [b"0", b"1:0", b"4294967296", b"1::2", b"1,", b",1", b"a", b"1:2:3"])
def test_bad_sequence_sets(bad):
    with pytest.raises(ParseError):
        a = args(bad)
        a.sequenceSet()
        a.end()


def test_dates():
    assert args(b"1-Feb-2024").date() == (2024, 2, 1)
    assert args(b'"29-feb-2024"').date() == (2024, 2, 29)
    for bad in (b"30-Feb-2024", b"1-Foo-2024", b"1-2-2024"):
        with pytest.raises(ParseError):
            args(bad).date()
    when = args(b'"01-Feb-2024 13:05:00 +0100"').dateTime()
    assert when == calendar.timegm((2024, 2, 1, 12, 5, 0, 0, 0, 0))
    assert args(b'" 1-Feb-2024 13:05:00 -0000"').dateTime() == calendar.timegm(
        (2024, 2, 1, 13, 5, 0, 0, 0, 0))
    with pytest.raises(ParseError):
        args(b'"01-Feb-2024 25:05:00 +0100"').dateTime()


def test_sequence_set_uses_star():
    assert SequenceSet(((1, None),)).usesStar()
    assert not SequenceSet(((1, 2),)).usesStar()
