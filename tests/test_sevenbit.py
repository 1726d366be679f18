"""8-bit to 7-bit conversion for a next hop without 8BITMIME (RFC 6152 §3)."""

from __future__ import annotations

import email
import email.policy
import io

import pytest

from twistmail.relay.sevenbit import NotConvertible, to7bit


def convert(data: bytes):
    out = to7bit(io.BytesIO(data))
    assert out.isascii()
    return out, email.message_from_bytes(out, policy=email.policy.default)


def test_seven_bit_message_is_sent_as_it_is():
    data = b"Subject: x\r\nDKIM-Signature: v=1\r\n\r\nplain\r\n"
    assert to7bit(io.BytesIO(data)) == data


def test_non_mime_8bit_body_becomes_quoted_printable_unknown_8bit():
    out, message = convert(b"Subject: x\r\n\r\ncaf\xe9\r\n")
    assert message["MIME-Version"] == "1.0"
    assert message["Content-Transfer-Encoding"] == "quoted-printable"
    assert message.get_param("charset") == "unknown-8bit"
    assert b"caf=E9\r\n" in out


def test_binary_attachment_becomes_base64_and_text_parts_keep_their_bytes():
    binary = bytes(range(256))
    data = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nascii text\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
            b"\r\n" + binary.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n--b--\r\n")
    _, message = convert(data)
    text, attachment = message.iter_parts()
    assert text.get_content() == "ascii text"  # the CRLF before --b belongs to the boundary
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_content() == binary.replace(b"\r", b"").replace(b"\n", b"")


def test_8bit_headers_cannot_be_converted():
    with pytest.raises(NotConvertible):
        to7bit(io.BytesIO(b"Subject: caf\xe9\r\n\r\nbody\r\n"))
