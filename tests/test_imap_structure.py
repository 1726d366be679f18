"""MIME structure, sections, BODYSTRUCTURE, ENVELOPE and response encoding (no network)."""

from __future__ import annotations

import time

import pytest

from twistmail.protocols.imap import response, structure
from twistmail.protocols.imap.fetch import Item, Parsed, parseItems, render
from twistmail.protocols.imap.parser import Arguments, ParseError


def bs(message: bytes, extended: bool = True) -> bytes:
    return response.encode(structure.bodyStructure(structure.parse(message), extended))


def env(message: bytes) -> bytes:
    return response.encode(structure.envelope(structure.parse(message)))


def test_plain_message_without_content_type_defaults():
    message = b"Subject: x\r\n\r\nline one\r\nline two\r\n"
    assert bs(message) == (b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 20 2'
                           b" NIL NIL NIL NIL)")
    assert bs(message, extended=False) == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 20 2)'


def test_header_only_message_and_lf_line_ends():
    assert structure.section(structure.parse(b"Subject: only a header\r\n"), (), "TEXT") == b""
    lf = b"Subject: lf\n\nbody\n"
    root = structure.parse(lf)
    assert root.header == b"Subject: lf\n\n" and root.body == b"body\n"


def test_multipart_without_boundary_is_shown_as_text():
    message = b"Content-Type: multipart/mixed\r\n\r\nno boundary here\r\n"
    assert bs(message).startswith(b'("TEXT" "PLAIN"')


def test_unterminated_multipart_runs_to_the_end():
    message = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\none\r\n"
               b"--b\r\nContent-Type: text/html\r\n\r\ntwo, never closed\r\n")
    root = structure.parse(message)
    assert [c.body for c in root.children] == [b"one", b"two, never closed\r\n"]


def test_digest_parts_default_to_message_rfc822():
    message = (b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
               b"Subject: inner\r\n\r\nhi\r\n--d--\r\n")
    root = structure.parse(message)
    assert (root.children[0].mainType, root.children[0].subType) == ("message", "rfc822")
    assert structure.section(root, (1,), "HEADER") == b"Subject: inner\r\n\r\n"


def test_boundary_prefix_of_a_longer_line_is_not_a_delimiter():
    message = (b"Content-Type: multipart/mixed; boundary=ab\r\n\r\n--ab\r\n\r\n"
               b"--abc is text\r\n--ab--\r\n")
    assert [c.body for c in structure.parse(message).children] == [b"--abc is text"]


def test_rfc2231_parameters_are_collapsed():
    message = (b"Content-Type: application/pdf;\r\n name*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n"
               b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n\r\nx")
    encoded = bs(message)
    assert encoded.startswith(b'("APPLICATION" "PDF" ("NAME" {12}\r\nr\xc3\xa9sum\xc3\xa9.pdf)')
    assert b'("ATTACHMENT" ("FILENAME" {12}\r\nr\xc3\xa9sum\xc3\xa9.pdf))' in encoded


def test_hostile_nesting_is_bounded():
    depth = 5000
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                       for i in range(depth))
    message = opening + b"\r\ninnermost\r\n"
    started = time.process_time()  # CPU time: parallel tests must not make it fail
    encoded = bs(message)
    assert time.process_time() - started < 2
    assert encoded.count(b"(") <= 4 * structure.MAX_DEPTH + 10


def test_sections_of_a_single_part_message():
    message = b"Subject: s\r\nContent-Type: text/plain\r\n\r\nbody\r\n"
    root = structure.parse(message)
    assert structure.section(root, (1,), None) == b"body\r\n"
    assert structure.section(root, (1,), "MIME") == root.header
    with pytest.raises(structure.NoSuchPart):
        structure.section(root, (2,), None)
    with pytest.raises(structure.NoSuchPart):
        structure.section(root, (1,), "TEXT")  # part 1 is not a message/rfc822


def test_header_fields_keep_folded_lines_and_match_case_insensitively():
    message = b"Subject: a\r\n long subject\r\nX-A: 1\r\nsubject: again\r\nTo: t\r\n\r\nbody"
    root = structure.parse(message)
    assert structure.section(root, (), "HEADER.FIELDS", ("SUBJECT",)) == \
        b"Subject: a\r\n long subject\r\nsubject: again\r\n\r\n"
    assert structure.section(root, (), "HEADER.FIELDS.NOT", ("subject",)) == b"X-A: 1\r\nTo: t\r\n\r\n"
    assert structure.section(root, (), "HEADER.FIELDS", ("Nope",)) == b"\r\n"


def test_envelope_addresses_groups_and_defaults():
    message = (b"From: \"Doe, Jane\" <jane@example.org>\r\nTo: undisclosed-recipients:;\r\n"
               b"Cc: a@x.org, (comment) b@y.org\r\nSubject: s\r\n\r\n")
    assert env(message) == (
        b'(NIL "s" (("Doe, Jane" NIL "jane" "example.org")) (("Doe, Jane" NIL "jane"'
        b' "example.org")) (("Doe, Jane" NIL "jane" "example.org")) ((NIL NIL'
        b' "undisclosed-recipients" NIL) (NIL NIL NIL NIL)) ((NIL NIL "a" "x.org") ("comment" NIL'
        b' "b" "y.org")) NIL NIL NIL)')  # a comment stands for the name, as in "b@y.org (Bee)"
    assert env(b"Subject: nobody\r\n\r\n") == b'(NIL "nobody" NIL NIL NIL NIL NIL NIL NIL NIL)'
    raw = env(b"Subject: caf\xc3\xa9\r\nFrom: local-only\r\n\r\n")
    assert b"{5}\r\ncaf\xc3\xa9" in raw  # 8-bit goes out as the same octets, in a literal
    assert b'((NIL NIL "local-only" NIL))' in raw


@pytest.mark.parametrize("value, expected", [
    (b"plain", b'"plain"'), (b'quo"te\\', b'"quo\\"te\\\\"'), (b"", b'""'),
    (b"a\r\nb", b"{4}\r\na\r\nb"), ("é", b"{2}\r\n\xc3\xa9"), (None, b"NIL"), (7, b"7"),
    ([b"a", None, [1]], b'("a" NIL (1))'), (response.Atom(b"\\Seen"), b"\\Seen"),
])
def test_response_encoding(value, expected):
    assert response.encode(value) == expected


def test_internal_date_is_english_whatever_the_locale():
    assert response.internalDate(0).decode()[4:12] in {"Jan-1970", "Dec-1969"}


# -- FETCH items ----------------------------------------------------------------------


def items(text: bytes) -> list[Item]:
    args = Arguments([text])
    out = parseItems(args)
    args.end()
    return out


def test_fetch_item_parsing():
    assert [i.name for i in items(b"FAST")] == [b"FLAGS", b"INTERNALDATE", b"RFC822.SIZE"]
    [item] = items(b"BODY.PEEK[1.2.HEADER.FIELDS.NOT (Subject \"X-Y\")]<10.20>")
    assert item.peek and item.parts == (1, 2) and item.text == "HEADER.FIELDS.NOT"
    assert item.fields == ("Subject", "X-Y") and item.partial == (10, 20)
    assert item.sectionLabel() == b"BODY[1.2.HEADER.FIELDS.NOT (Subject X-Y)]<10>"
    assert [i.name for i in items(b"(UID BODY[] FLAGS)")] == [b"UID", b"BODY[]", b"FLAGS"]
    for bad in (b"BODY[MIME]", b"BODY[0]", b"BODY[1.X]", b"BODY[]<1.0>", b"()", b"NOPE",
                b"BODY[HEADER.FIELDS ()]", b"(FLAGS"):
        with pytest.raises(ParseError):
            items(bad)


def test_render_sets_literals_for_message_data():
    class Message:
        uid, size, internalDate, flags = 5, 10, 0, frozenset({"\\Seen"})

    parsed = Parsed(b"Subject: x\r\n\r\nhello")
    [item] = items(b"BODY[TEXT]<1.3>")
    assert render(item, Message, parsed, Message.flags) == b"BODY[TEXT]<1> {3}\r\nell"
    [item] = items(b"RFC822.TEXT")
    assert render(item, Message, parsed, Message.flags) == b"RFC822.TEXT {5}\r\nhello"
    [item] = items(b"BODY[]<100.5>")
    assert render(item, Message, parsed, Message.flags) == b"BODY[]<100> {0}\r\n"


# -- structures the email package misreads, answered as the bytes say ----------------------

_ONE_PART = b"\r\n--b\r\n\r\nx\r\n--b--\r\n"


@pytest.mark.parametrize("header", [
    # A line that is not a header field does not end the header (as Dovecot reads it).
    b"Subject: a\r\nnot a header line\r\nContent-Type: multipart/mixed; boundary=b\r\n",
    # RFC 822 §3.1.2 (obs-fields, RFC 5322 §4.5): white space before the colon.
    b"Content-Type : multipart/mixed; boundary=b\r\n",
    # RFC 2045 §5.1: comments may stand anywhere white space may.
    b"Content-Type: multipart/mixed (comment); boundary=b\r\n",
    b"Content-Type: multipart/mixed; (comment) boundary=\"b\"\r\n",
    b"Content-Type: multipart/mixed; boundary=b (comment)\r\n",
])
def test_multipart_headers_the_email_package_misreads(header):
    encoded = bs(header + _ONE_PART)
    assert encoded == (b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1 1 NIL NIL NIL NIL)'
                       b' "MIXED" ("BOUNDARY" "b") NIL NIL NIL)')


def test_quoted_boundary_with_spaces_preamble_and_epilogue():
    message = (b'Content-Type: multipart/mixed; boundary="a b c"\r\n\r\npreamble\r\n--a b c\r\n'
               b"Content-Type: text/plain\r\n\r\none\r\n--a b c\r\n\r\ntwo\r\n--a b c--\r\n"
               b"epilogue\r\n--a b c\r\n\r\nnot a part\r\n")
    root = structure.parse(message)
    assert [structure.section(root, (n,), None) for n in (1, 2)] == [b"one", b"two"]
    assert structure.section(root, (1,), "MIME") == b"Content-Type: text/plain\r\n\r\n"
    with pytest.raises(structure.NoSuchPart):
        structure.section(root, (3,), None)


_INNER = (b"Subject: inner\r\nContent-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\n"
          b"Content-Type: text/plain\r\n\r\nplain\r\n--in\r\nContent-Type: text/html\r\n\r\n"
          b"<p>html</p>\r\n--in--\r\n")


def test_nested_message_rfc822_part_numbering():
    """RFC 3501 §6.4.5: 2 is the message/rfc822 part, 2.HEADER/2.TEXT its message, 2.1 and
    2.2 the parts of that message's body, 2.1.MIME their own header."""
    message = (b"Subject: outer\r\nContent-Type: multipart/mixed; boundary=out\r\n\r\n--out\r\n\r\n"
               b"body\r\n--out\r\nContent-Type: message/rfc822\r\n\r\n" + _INNER + b"\r\n--out--\r\n")
    root = structure.parse(message)
    assert structure.section(root, (2,), None) == _INNER
    assert structure.section(root, (2,), "MIME") == b"Content-Type: message/rfc822\r\n\r\n"
    assert structure.section(root, (2,), "HEADER") == _INNER[:_INNER.index(b"\r\n\r\n") + 4]
    assert structure.section(root, (2,), "TEXT") == _INNER[_INNER.index(b"\r\n\r\n") + 4:]
    assert structure.section(root, (2, 1), None) == b"plain"
    assert structure.section(root, (2, 2), None) == b"<p>html</p>"
    assert structure.section(root, (2, 2), "MIME") == b"Content-Type: text/html\r\n\r\n"


def test_top_level_message_rfc822_is_part_1():
    """A message whose own type is message/rfc822 has a part 1 (its body, the encapsulated
    message) whose parts are 1.1, 1.2 (RFC 3501 §6.4.5), not 1 and 2."""
    message = b"Content-Type: message/rfc822\r\n\r\n" + _INNER
    root = structure.parse(message)
    assert structure.section(root, (1,), None) == _INNER
    assert structure.section(root, (1,), "HEADER") == _INNER[:_INNER.index(b"\r\n\r\n") + 4]
    assert structure.section(root, (1, 1), None) == b"plain"
    assert structure.section(root, (1, 2), None) == b"<p>html</p>"
    with pytest.raises(structure.NoSuchPart):
        structure.section(root, (2,), None)


def test_envelope_keeps_source_routes():
    """RFC 3501 §7.4.2: the adl field holds the at-domain-list of a route-addr (RFC 5322 §4.4)."""
    message = (b"From: Relay User <@relay.example,@hop.example:user@host.example>\r\n"
               b"To: <@r.example:a@b.example>, plain@c.example\r\nSubject: s\r\n\r\n")
    encoded = env(message)
    assert b'(("Relay User" "@relay.example,@hop.example" "user" "host.example"))' in encoded
    assert b'((NIL "@r.example" "a" "b.example") (NIL NIL "plain" "c.example"))' in encoded


def test_comment_in_content_transfer_encoding_is_skipped():
    message = (b"Content-Type: text/plain; charset=utf-8 (the usual)\r\n"
               b"Content-Transfer-Encoding: base64 (it is)\r\n\r\naGk=\r\n")
    assert bs(message, extended=False) == b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "BASE64" 6 1)'
