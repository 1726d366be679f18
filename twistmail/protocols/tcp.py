"""TCP settings shared by the servers and the relay's client."""

from __future__ import annotations

from twisted.internet import tcp


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
    """C{transport.write(data)}, but sent in this call when the socket takes it all.

    Twisted's write buffers the data and asks the reactor to watch the socket for
    writing (an ``epoll_ctl``), sends it when the reactor next polls, and stops
    watching (another ``epoll_ctl``).  On a busy event loop the send then waits
    for every other connection that was ready in the same poll.  Here, when the
    transport is plain TCP with nothing buffered, no producer and not closing, the
    data is sent at once; whatever the socket does not take (a full send buffer,
    an error) goes to C{transport.write}, in order, as before.  Anything else
    (TLS, also SMTPS's wrapper; a test's transport) is C{transport.write}.
    """
    # Exactly a TCP connection: a TLS wrapper (SMTPS) passes attribute reads on to
    # the TCP transport under it, whose socket must never see the plaintext.
    if not isinstance(transport, tcp.Connection) or transport.TLS or not transport.connected \
            or transport.disconnecting or transport.producer is not None \
            or transport.dataBuffer or getattr(transport, "_tempDataBuffer", True):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:
        sent = 0  # EAGAIN, or an error the reactor will find and report as it always does
    if sent < len(data):
        transport.write(data[sent:])
