"""Downgrading UTF-8 header fields for legacy IMAP and POP3 clients (RFC 6857's way)."""

from __future__ import annotations

from email import message_from_bytes, policy

import pytest

from twistmail.protocols import downgrade


def raw(text: str) -> str:
    """A header value as the compat32 parser gives it: raw octets as surrogate escapes."""
    return text.encode().decode("utf-8", "surrogateescape")


@pytest.mark.parametrize("block", [b"Subject: plain\r\nTo: a@b.example\r\n\r\n", b"", b"\r\n",
                                   b"Subject: =?utf-8?q?caf=C3=A9?=\n\n"])
def test_ascii_is_left_alone(block):
    assert downgrade.header(block) is block
    assert downgrade.message(block + b"\xff body", len(block)) == block + b"\xff body"


def test_fields_are_encoded_and_line_endings_kept():
    block = "Subject: ünï\nX-Mailer: ok\nComments: 日本\n folded\n\n".encode()
    out = downgrade.header(block)
    assert out.isascii() and b"\r" not in out and out.endswith(b"X-Mailer: ok\n" + out.split(
        b"X-Mailer: ok\n")[1])
    parsed = message_from_bytes(out, policy=policy.default)
    assert parsed["Subject"] == "ünï"
    assert parsed["Comments"] == "日本 folded"  # unfolded as RFC 5322 §2.2.3 says: CRLF removed
    assert parsed["X-Mailer"] == "ok"


@pytest.mark.parametrize("value, expected", [
    ("Jörg <j@example.test>", "Jörg <j@example.test>"),
    ("a@bücher.example", "a@xn--bcher-kva.example"),
    ("ü@example.test", '"ü@example.test":;'),
    ("Ann <ann@x.example>, ü <ü@y.example>", 'Ann <ann@x.example>, "ü <ü@y.example>":;'),
    # What the stdlib's address parser cannot read whole is encoded as text (a reader
    # shows it as a display name without an address).
    ("undisclosed ü", '"undisclosed ü"'),
    ("ü:;", '"ü:;"'),
])
def test_address_fields(value, expected):
    out = downgrade.header(f"To: {value}\r\n\r\n".encode())
    assert out.isascii()
    assert str(message_from_bytes(out, policy=policy.default)["To"]) == expected


def test_a_field_with_a_non_ascii_name_is_dropped():
    assert downgrade.header("Subject: x\r\nX-Ü: y\r\n\r\n".encode()) == b"Subject: x\r\n\r\n"
    # A continuation line with nothing to continue is no field: dropped if it is 8-bit.
    assert downgrade.header(" ü\r\n ascii\r\nA: b\r\n\r\n".encode()) == b"A: b\r\n\r\n"
    assert downgrade.header(b" ascii\r\nA: \xc3\xbc\r\n\r\n") == b" ascii\r\nA: =?utf-8?b?w7w=?=\r\n\r\n"


def test_envelope():
    envelope = [raw("Fri, 4 Dec 2026"), raw("Grüße"),
                [[raw("Jörg"), None, "j", raw("bücher.example")]],
                [[None, None, raw("ü"), "x.example"]],
                [[None, None, "g", None], ["Ann", None, "ann", "x.example"], [None, None, None, None]],
                None, None, None, None, "<id@x>"]
    out = downgrade.envelope(envelope)
    assert out[0] == "Fri, 4 Dec 2026" and out[9] == "<id@x>"
    assert out[1] == "=?utf-8?b?R3LDvMOfZQ==?="
    assert out[2] == [["=?utf-8?b?SsO2cmc=?=", None, "j", "xn--bcher-kva.example"]]
    # No ASCII address: an empty group named after the original.
    assert out[3] == [[None, None, downgrade.word("ü@x.example"), None], [None, None, None, None]]
    assert out[4] == envelope[4]


def test_data():
    assert downgrade.data(["TEXT", "PLAIN", ["NAME", raw("ä.txt")], None, 5]) == [
        "TEXT", "PLAIN", ["NAME", "=?utf-8?b?w6QudHh0?="], None, 5]


def test_mime_parameters_become_rfc2231():
    block = ('Content-Type: text/plain; charset=utf-8; name="ü.txt"\r\n'
             'Content-Disposition: attachment;\r\n filename="日本 1.pdf"; size=3\r\n'
             "Content-Type: ü/x\r\n\r\n").encode()
    out = downgrade.header(block)
    assert out.isascii()
    assert b"Content-Disposition: attachment; filename*=utf-8''%E6%97%A5%E6%9C%AC%201.pdf; " \
           b'size="3"\r\n' in out
    parsed = message_from_bytes(out.split(b"Content-Type: =?")[0] + b"\r\n", policy=policy.default)
    assert parsed.get_filename() == "日本 1.pdf"
    assert parsed.get_param("name") == "ü.txt" and parsed.get_content_charset() == "utf-8"
    # A type that is not ASCII has no RFC 2231 form: encoded as text.
    assert b"\r\nContent-Type: =?utf-8?q?=C3=BC/x?=\r\n" in out


@pytest.mark.parametrize("block", [
    # the stdlib's address parser recurses once per comment level
    b"From: " + b"(" * 3000 + "ü@x.example\r\n\r\n".encode(),
    # Message.set_param and get_params are quadratic in the parameters (this took minutes)
    b"Content-Type: text/plain; " + b"; ".join(b"a%d=\xc3\xbc" % i for i in range(4000)) + b"\r\n\r\n",
    # seconds of address parsing
    b"To: " + ", ".join(f"ü{i}@x.example" for i in range(20000)).encode() + b"\r\n\r\n",
])
def test_hostile_fields_are_encoded_as_text(block):
    """Too deep or too long to parse: the field is kept as encoded-words, quickly."""
    out = downgrade.header(block)
    assert out.isascii()
    name, value = out.split(b":", 1)
    assert value.startswith(b" =?utf-8?") and block.startswith(name + b":")
