"""TCP settings shared by the servers."""

from __future__ import annotations


def sendAtOnce(transport) -> None:
    """TCP_NODELAY, where the transport is TCP (also under TLS).

    With Nagle's algorithm the small last segment of a large response (an IMAP
    FETCH of 100,000 flags, a POP3 RETR, SMTP replies to pipelined commands made
    in separate reactor turns) waits for the client's delayed ACK, 40 ms on
    Linux.  Twisted already writes a connection's output once per reactor turn,
    so there are no small writes for Nagle to save."""
    setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setTcpNoDelay is not None:
        setTcpNoDelay(True)
