"""TCP settings shared by the servers and the relay's client."""

from __future__ import annotations

from twisted.internet import tcp

from twistmail._writenow import writeThrough


def sendAtOnce(transport) -> None:
    """TCP_NODELAY, where the transport is TCP (also under TLS).

    With Nagle's algorithm a small segment written while earlier data is not
    yet acknowledged waits for the peer's delayed ACK, 40 ms on Linux: the last
    segment of a large response (an IMAP FETCH of 100,000 flags, a POP3 RETR),
    SMTP replies to pipelined commands made in separate reactor turns, the
    relay's next MAIL written after a message's final ".".  Twisted already
    writes a connection's output once per reactor turn, so there are no tiny
    writes for Nagle to save."""
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        setTcpNoDelay(True)


def writeNow(transport, data: bytes) -> None:
    """C{transport.write(data)}, but sent in this call when the socket takes it
    (L{twistmail._writenow.writeThrough}), when the transport is plain TCP.  Anything
    else (TLS, also SMTPS's wrapper; a test's transport) is C{transport.write}.
    """
    # Exactly a TCP connection: a TLS wrapper (SMTPS) passes attribute reads on to
    # the TCP transport under it, whose socket must never see the plaintext.
    if not isinstance(transport, tcp.Connection) or transport.TLS or not transport.connected:
        transport.write(data)
        return
    writeThrough(transport, transport.socket.send, data)
