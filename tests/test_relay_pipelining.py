"""The relay's SMTP client pipelines (RFC 2920) when the server offers PIPELINING.

Unit tests over StringTransport and a memory reactor: the test plays the
server, line by line, and sees exactly what the client wrote before each
reply arrived.
"""

from __future__ import annotations

import io

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import failure

from twistmail.relay.mx import Hop
from twistmail.relay.sender import DEFERRED, FAILED, SENT, RelaySender, SenderSettings

MESSAGE = b"Subject: hi\r\n\r\n.dot\r\nbody\r\n"
EHLO_PIPELINING = b"250-mx.remote.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-mx.remote.test\r\n250 8BITMIME\r\n"


class Peer:
    """One RelaySender whose connections the test answers by hand."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        settings = SenderSettings(heloName="relay.example.test", port=25, connectTimeout=5,
                                  commandTimeout=5)
        self.sender = RelaySender(self.reactor, settings, clock=self.reactor)
        self.connected = 0

    def send(self, recipients, message=MESSAGE, opened=io.BytesIO, **context) -> list:
        results = []
        self.sender.send([Hop("mx.remote.test", ("127.0.0.1",))], "a@example.test",
                         list(recipients), lambda: defer.succeed(opened(message)),
                         {"id": "T1", "domain": "remote.test", **context}
                         ).addCallback(results.append)
        return results

    def connect(self):
        """Accept the newest connection attempt; returns (protocol, transport)."""
        assert len(self.reactor.tcpClients) == self.connected + 1
        factory = self.reactor.tcpClients[self.connected][2]
        self.connected += 1
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def say(protocol, transport, *lines: bytes) -> bytes:
    """The server sends C{lines}; returns what the client wrote in answer."""
    transport.clear()
    for line in lines:
        protocol.dataReceived(line if line.endswith(b"\n") else line + b"\r\n")
        while transport.producer is not None:  # the message, as a real transport would pull it
            transport.producer.resumeProducing()
    return transport.value()


def greet(peer: Peer, ehlo: bytes = EHLO_PIPELINING):
    protocol, transport = peer.connect()
    assert say(protocol, transport, b"220 mx.remote.test ESMTP") == b"EHLO relay.example.test\r\n"
    return protocol, transport, say(protocol, transport, ehlo)


def deliverOne(peer: Peer, recipient: str = "r1@remote.test"):
    """A first message over a new connection, accepted; the connection is parked after it."""
    results = peer.send([recipient])
    protocol, transport, _ = greet(peer)
    say(protocol, transport, b"250 ok", b"250 ok", b"354 go")
    say(protocol, transport, b"250 2.0.0 queued")
    assert results[0][recipient].kind == SENT
    return protocol, transport


def lose(protocol) -> None:
    """The connection breaks (as the reactor reports it to protocol and factory)."""
    reason = failure.Failure(ConnectionError("reset by peer"))
    protocol.connectionLost(reason)
    protocol.factory.clientConnectionLost(None, reason)


def test_mail_rcpt_and_data_go_in_one_write_and_replies_are_matched_in_order():
    peer = Peer()
    results = peer.send(["r1@remote.test", "bad@remote.test", "r3@remote.test"])
    protocol, transport, written = greet(peer)
    # RFC 2920 §3.1: the whole group before any reply.
    assert written == (b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r1@remote.test>\r\n"
                       b"RCPT TO:<bad@remote.test>\r\nRCPT TO:<r3@remote.test>\r\nDATA\r\n")
    body = say(protocol, transport, b"250 2.1.0 ok", b"250 2.1.5 ok",
               b"550 5.1.1 no such user", b"250 2.1.5 ok", b"354 go ahead")
    # The message, dot-stuffed, with its end; no RSET (the reply to "." ends the
    # transaction, RFC 5321 §4.1.1.4).
    assert body == b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"
    assert say(protocol, transport, b"250 2.0.0 queued as X") == b""
    [got] = results
    assert got["r1@remote.test"].kind == SENT and got["r3@remote.test"].kind == SENT
    assert got["r1@remote.test"].reply == "250 2.0.0 queued as X"
    assert got["bad@remote.test"].kind == FAILED
    assert got["bad@remote.test"].reply == "550 5.1.1 no such user"


def test_without_pipelining_one_command_waits_for_the_reply_before():
    peer = Peer()
    results = peer.send(["r1@remote.test", "r2@remote.test"])
    protocol, transport, written = greet(peer, EHLO_PLAIN)
    assert written == b"MAIL FROM:<a@example.test>\r\n"
    assert say(protocol, transport, b"250 ok") == b"RCPT TO:<r1@remote.test>\r\n"
    assert say(protocol, transport, b"250 ok") == b"RCPT TO:<r2@remote.test>\r\n"
    assert say(protocol, transport, b"250 ok") == b"DATA\r\n"
    assert say(protocol, transport, b"354 go").endswith(b"body\r\n.\r\n")
    assert say(protocol, transport, b"250 2.0.0 queued") == b"RSET\r\n"
    say(protocol, transport, b"250 reset")
    assert {r.kind for r in results[0].values()} == {SENT}


def test_a_4xx_on_data_after_pipelined_rcpts_defers_the_accepted_and_sends_no_message():
    peer = Peer()
    results = peer.send(["r1@remote.test", "bad@remote.test"])
    protocol, transport, _ = greet(peer)
    written = say(protocol, transport, b"250 ok", b"250 ok", b"550 5.1.1 unknown",
                  b"451 4.3.0 try again later")
    assert written == b"RSET\r\n"  # the message itself is never sent
    say(protocol, transport, b"250 reset")
    [got] = results
    assert got["r1@remote.test"].kind == DEFERRED
    assert got["r1@remote.test"].reply == "451 4.3.0 try again later"
    assert got["bad@remote.test"].kind == FAILED and got["bad@remote.test"].reply.startswith("550")


def test_no_recipient_accepted_but_data_accepted_sends_a_lone_dot():
    """RFC 2920 §3.1: a server may accept DATA after refusing every RCPT; then only "."."""
    peer = Peer()
    results = peer.send(["bad@remote.test"])
    protocol, transport, _ = greet(peer)
    assert say(protocol, transport, b"250 ok", b"550 5.1.1 unknown", b"354 go") == b".\r\n"
    assert say(protocol, transport, b"554 5.5.1 no valid recipients") == b"RSET\r\n"
    say(protocol, transport, b"250 reset")
    [got] = results
    assert got["bad@remote.test"].kind == FAILED
    assert got["bad@remote.test"].reply == "550 5.1.1 unknown"


def test_a_refused_mail_from_is_every_recipients_reply():
    peer = Peer()
    results = peer.send(["r1@remote.test", "r2@remote.test"])
    protocol, transport, _ = greet(peer)
    assert say(protocol, transport, b"550 5.7.1 sender rejected", b"503 5.5.1 need MAIL",
               b"503 5.5.1 need MAIL", b"503 5.5.1 need MAIL") == b"RSET\r\n"
    say(protocol, transport, b"250 reset")
    [got] = results
    assert {r.reply for r in got.values()} == {"550 5.7.1 sender rejected"}
    assert {r.kind for r in got.values()} == {FAILED}


def brokenOff(*replies: bytes) -> tuple[Peer, dict]:
    """Two recipients over a new connection; the server sends C{replies}, then it is gone."""
    peer = Peer()
    results = peer.send(["r1@remote.test", "r2@remote.test"])
    protocol, transport, _ = greet(peer)
    say(protocol, transport, *replies)
    lose(protocol)
    [got] = results
    assert {r.kind for r in got.values()} == {DEFERRED}
    return peer, got


def test_connection_lost_mid_pipeline_defers_and_sends_nothing():
    peer, _ = brokenOff(b"250 ok", b"250 ok")
    assert len(peer.reactor.tcpClients) == 1  # a fresh connection could not tell: no retry now


def test_a_reused_connection_lost_mid_pipeline_retries_on_a_fresh_one():
    peer = Peer()
    protocol, transport = deliverOne(peer)
    second = peer.send(["r2@remote.test"])  # over the parked connection
    assert transport.value() == b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r2@remote.test>\r\nDATA\r\n"
    say(protocol, transport, b"250 ok")
    lose(protocol)
    assert second == []  # not given up: retried at once on a new connection
    protocol, transport, written = greet(peer)
    assert written.startswith(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r2@remote.test>\r\n")
    say(protocol, transport, b"250 ok", b"250 ok", b"354 go")
    say(protocol, transport, b"250 2.0.0 queued")
    assert second[0]["r2@remote.test"].kind == SENT


def test_after_the_final_250_a_lost_connection_does_not_resend():
    """The reply to "." arrived, then the connection broke: the message is delivered, once."""
    peer = Peer()
    results = peer.send(["r1@remote.test"])
    protocol, transport, _ = greet(peer)
    say(protocol, transport, b"250 ok", b"250 ok", b"354 go")
    say(protocol, transport, b"250 2.0.0 queued")
    lose(protocol)
    assert results[0]["r1@remote.test"].kind == SENT
    assert len(peer.reactor.tcpClients) == 1


def test_a_refusal_after_the_pipelined_data_is_each_accepted_recipients_reply():
    """The reply to "." on a reused connection: 452 defers the message; the connection stays."""
    peer = Peer()
    protocol, transport = deliverOne(peer)
    second = peer.send(["r2@remote.test", "r3@remote.test"])
    say(protocol, transport, b"250 ok", b"250 ok", b"250 ok", b"354 go")
    say(protocol, transport, b"452 4.3.1 insufficient storage")
    [got] = second
    assert {r.reply for r in got.values()} == {"452 4.3.1 insufficient storage"}
    assert {r.kind for r in got.values()} == {DEFERRED}
    assert len(peer.reactor.tcpClients) == 1


def test_a_small_message_goes_out_with_its_end_at_once():
    peer = Peer()
    peer.send(["r1@remote.test"])
    protocol, transport, _ = greet(peer)
    transport.clear()
    for line in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        protocol.dataReceived(line)
    # Without waiting for the transport to pull it (FileSender): one turn of the reactor.
    assert transport.producer is None
    assert transport.value() == b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"


def test_a_large_message_is_streamed_and_dot_stuffed_across_reads():
    chunk = 16384  # FileSender's read size
    message = b"Subject: big\r\n\r\n" + b"x" * (chunk - 18) + b"\r\n.at a boundary\r\n" * 3
    peer = Peer()
    results = peer.send(["r1@remote.test"], message)
    protocol, transport, _ = greet(peer)
    written = say(protocol, transport, b"250 ok", b"250 ok", b"354 go")
    assert written == message.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    say(protocol, transport, b"250 2.0.0 queued")
    assert results[0]["r1@remote.test"].kind == SENT


def sentFresh(peer, second) -> None:
    """The message pipelined behind a lost one goes, once, on a second connection."""
    protocol, transport, written = greet(peer)
    assert written == b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r2@remote.test>\r\nDATA\r\n"
    say(protocol, transport, b"250 ok", b"250 ok", b"354 go")
    say(protocol, transport, b"250 2.0.0 queued")
    assert second[0]["r2@remote.test"].kind == SENT
    assert len(peer.reactor.tcpClients) == 2


def test_a_421_in_the_middle_of_the_group_is_every_recipients_reply():
    """RFC 5321 §3.8: the server is closing; the replies still due will never come."""
    _, got = brokenOff(b"250 ok", b"421 4.3.2 shutting down")
    assert {r.reply for r in got.values()} == {"421 4.3.2 shutting down"}


class Unreadable(io.BytesIO):
    def read(self, size=-1):
        raise OSError(5, "Input/output error")


def test_a_message_that_cannot_be_read_drops_the_connection_and_defers():
    """Never a partial message the server could take for a whole one."""
    peer = Peer()
    results = peer.send(["r1@remote.test"], opened=Unreadable)
    protocol, transport, _ = greet(peer)
    assert say(protocol, transport, b"250 ok", b"250 ok", b"354 go") == b""
    assert transport.disconnecting
    lose(protocol)
    assert results[0]["r1@remote.test"].kind == DEFERRED


# -- pipelining across messages: the next message follows the final "." ------------------

BODY = b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"


def dataSent(peer: Peer, recipient: str = "r1@remote.test", **context):
    """A first message whose data went out; no reply to it yet."""
    results = peer.send([recipient], **context)
    protocol, transport, _ = greet(peer)
    assert say(protocol, transport, b"250 ok", b"250 ok", b"354 go") == BODY
    transport.clear()
    return results, protocol, transport


def test_the_next_message_follows_the_final_dot_before_its_reply():
    """RFC 2920 §3.1: one round trip per message on a busy connection, not two."""
    peer = Peer()
    handed = []
    first, protocol, transport = dataSent(peer, handOff=lambda: handed.append(True))
    assert handed == [True]  # the runner may give the slot to the next message now
    second = peer.send(["r2@remote.test"])
    assert transport.value() == b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r2@remote.test>\r\nDATA\r\n"
    assert first == []  # its result comes with the reply to its "."
    written = say(protocol, transport, b"250 2.0.0 first queued", b"250 ok", b"250 ok",
                  b"354 go")
    assert first[0]["r1@remote.test"].kind == SENT
    assert first[0]["r1@remote.test"].reply == "250 2.0.0 first queued"
    assert written == BODY  # no RSET between the two transactions either
    say(protocol, transport, b"250 2.0.0 second queued")
    assert second[0]["r2@remote.test"].reply == "250 2.0.0 second queued"
    assert len(peer.reactor.tcpClients) == 1


def test_a_connection_lost_before_the_reply_to_dot_defers_it_and_retries_the_next_fresh():
    """The server may have the first message: deferred, never resent now.  The second
    cannot have been taken: sent again at once on a new connection, and only there."""
    peer = Peer()
    first, protocol, transport = dataSent(peer)
    second = peer.send(["r2@remote.test"])
    lose(protocol)
    assert first[0]["r1@remote.test"].kind == DEFERRED
    assert "lost connection" in first[0]["r1@remote.test"].reply
    assert second == []
    protocol, transport, written = greet(peer)
    assert written == b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r2@remote.test>\r\nDATA\r\n"
    say(protocol, transport, b"250 ok", b"250 ok", b"354 go")
    say(protocol, transport, b"250 2.0.0 queued")
    assert second[0]["r2@remote.test"].kind == SENT
    assert len(peer.reactor.tcpClients) == 2  # nothing else was retried


def test_a_refused_dot_is_that_messages_reply_and_the_next_goes_on():
    peer = Peer()
    first, protocol, transport = dataSent(peer)
    second = peer.send(["r2@remote.test"])
    written = say(protocol, transport, b"554 5.7.1 spam", b"250 ok", b"250 ok", b"354 go")
    assert first[0]["r1@remote.test"].kind == FAILED
    assert first[0]["r1@remote.test"].reply == "554 5.7.1 spam"
    assert written == BODY
    say(protocol, transport, b"250 2.0.0 queued")
    assert second[0]["r2@remote.test"].kind == SENT


def test_a_421_in_reply_to_dot_defers_it_and_the_pipelined_message_goes_fresh():
    """RFC 5321 §3.8: the server is closing.  The first message is deferred (never resent
    now); the second, pipelined behind it, cannot have been taken: sent again at once on
    a new connection, and only there."""
    peer = Peer()
    first, protocol, transport = dataSent(peer)
    second = peer.send(["r2@remote.test"])
    assert say(protocol, transport, b"421 4.3.2 shutting down") == b"QUIT\r\n"
    lose(protocol)
    assert first[0]["r1@remote.test"].kind == DEFERRED
    assert first[0]["r1@remote.test"].reply == "421 4.3.2 shutting down"
    assert second == []
    sentFresh(peer, second)


def test_a_refusal_of_the_pipelined_mail_after_the_final_250_sends_the_first_once():
    """The first message's 250 came, then the server refused the next MAIL and closed:
    the first is delivered (never sent again), the second goes fresh."""
    peer = Peer()
    first, protocol, transport = dataSent(peer)
    second = peer.send(["r2@remote.test"])
    say(protocol, transport, b"250 2.0.0 queued", b"421 4.3.2 closing")
    lose(protocol)
    assert first[0]["r1@remote.test"].kind == SENT
    assert second == []
    sentFresh(peer, second)


def test_a_connection_lost_after_the_final_250_with_the_next_pipelined_sends_each_once():
    peer = Peer()
    first, protocol, transport = dataSent(peer)
    second = peer.send(["r2@remote.test"])
    say(protocol, transport, b"250 2.0.0 queued")
    lose(protocol)
    assert first[0]["r1@remote.test"].kind == SENT
    assert second == []
    protocol, transport, written = greet(peer)
    assert b"r1@remote.test" not in written
    say(protocol, transport, b"250 ok", b"250 ok", b"354 go")
    say(protocol, transport, b"250 2.0.0 queued")
    assert second[0]["r2@remote.test"].kind == SENT
    assert len(peer.reactor.tcpClients) == 2


def test_a_connections_last_message_is_followed_by_rset_and_quit():
    """maxPerConnection reached: nothing is pipelined behind it; RSET, then QUIT."""
    peer = Peer()
    peer.sender.settings = SenderSettings(heloName="relay.example.test", port=25,
                                          connectTimeout=5, commandTimeout=5,
                                          maxPerConnection=1)
    results = peer.send(["r1@remote.test"])
    protocol, transport, _ = greet(peer)
    written = say(protocol, transport, b"250 ok", b"250 ok", b"354 go")
    assert written == b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nRSET\r\n"
    assert say(protocol, transport, b"250 2.0.0 queued", b"250 reset") == b"QUIT\r\n"
    assert results[0]["r1@remote.test"].kind == SENT


def test_a_message_that_may_be_refused_before_mail_waits_for_the_replies_due():
    """An SMTPUTF8 message to a server without SMTPUTF8 is downgraded or refused before
    MAIL, and a refusal drops the connection: it is not pipelined behind a "."."""
    peer = Peer()
    first, protocol, transport = dataSent(peer)
    second = peer.send(["r2@remote.test"], smtputf8=True)
    assert transport.value() == b""
    written = say(protocol, transport, b"250 2.0.0 queued")
    assert written == b"MAIL FROM:<a@example.test>\r\nRCPT TO:<r2@remote.test>\r\nDATA\r\n"
    assert first[0]["r1@remote.test"].kind == SENT and second == []


def test_closing_the_cache_waits_for_the_replies_due():
    peer = Peer()
    first, protocol, transport = dataSent(peer)
    peer.sender.closeIdle()  # shutting down
    assert transport.value() == b""
    assert say(protocol, transport, b"250 2.0.0 queued") == b"QUIT\r\n"
    assert first[0]["r1@remote.test"].kind == SENT
