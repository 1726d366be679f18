"""Writing to a Twisted file descriptor in the call, not at the reactor's next poll."""

from __future__ import annotations

from collections.abc import Callable


def writeThrough(descriptor, send: Callable[[bytes], int], data: bytes) -> None:
    """C{send(data)} now when C{descriptor} (a Twisted C{FileDescriptor}: a TCP
    connection, a child process's stdin) has nothing buffered, no producer and is not
    closing; what C{send} does not take, or all of it otherwise, goes to
    C{descriptor.write}, in order.

    Twisted's write buffers the data and asks the reactor to watch the descriptor
    (an ``epoll_ctl``), writes it when the reactor next polls, and stops watching
    (another ``epoll_ctl``): on a busy event loop the write then also waits for every
    other descriptor that was ready in the same poll.
    """
    if descriptor.dataBuffer or getattr(descriptor, "_tempDataBuffer", True) \
            or descriptor.producer is not None or descriptor.disconnecting:
        descriptor.write(data)
        return
    try:
        sent = send(data)
    except OSError:
        sent = 0  # EAGAIN, or an error the reactor will find and report as it always does
    if sent < len(data):
        descriptor.write(data[sent:])
