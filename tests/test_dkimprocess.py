"""DKIM verification in child processes (twistmail.filters.dkimprocess).

The children are real processes of this interpreter, started by the real
reactor; key records come from the test's own dict, so no DNS is involved.
"""

from __future__ import annotations

import operator
import pickle
import sys

import pytest
from mailauth import Ed25519Key, RSAKey, message, sign
from support import onReactor
from twisted.internet import defer, error, reactor

from twistmail.filters import dkimprocess, dkimverify

RSA = RSAKey()
ED = Ed25519Key()
KEYS = {"rsa._domainkey.good.example": [f"v=DKIM1; k=rsa; p={RSA.p}".encode()],
        "ed._domainkey.good.example": [f"v=DKIM1; k=ed25519; p={ED.p}".encode()]}
SIGNED = sign(sign(message(), RSA, "good.example", "rsa"), ED, "good.example", "ed")


class _Records:
    """Lookups from a dict, as verifyAll reads them in the parent."""

    def __init__(self, keys) -> None:
        self._keys = keys

    def records(self, name, rdtype):
        return [dkimprocess._TXT(text) for text in self._keys.get(name, [])]


def test_key_names_are_those_verify_all_looks_up():
    raw = sign(SIGNED, RSA, "Other.Example.", "s1")
    assert dkimverify.keyNames(raw, 5) == ["s1._domainkey.Other.Example", "ed._domainkey.good.example",
                                           "rsa._domainkey.good.example"]
    assert dkimverify.keyNames(raw, 1) == ["s1._domainkey.Other.Example"]
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; b=\r\n" + SIGNED
    assert dkimverify.keyNames(broken, 5)[-2:] == ["ed._domainkey.good.example",
                                                   "rsa._domainkey.good.example"]
    assert dkimverify.keyNames(message().replace(b"Subject", b"DKIM-Signature"), 5) == []


def test_the_child_answers_as_verify_all_does_in_the_parent():
    answer = pickle.loads(dkimprocess.answer(pickle.dumps((dkimprocess.verifyThen, (SIGNED, KEYS, 5, 1024, None)))))
    assert [r.result for r in answer] == ["pass", "pass"]
    assert answer == dkimverify.verifyAll(SIGNED, _Records(KEYS), 5, 1024)
    tampered = SIGNED.replace(b"Hello.", b"Hullo.")
    answer = pickle.loads(dkimprocess.answer(pickle.dumps((dkimprocess.verifyThen, (tampered, KEYS, 5, 1024, None)))))
    assert [r.reason[:18] for r in answer] == ["body hash mismatch"] * 2
    assert answer == dkimverify.verifyAll(tampered, _Records(KEYS), 5, 1024)


def test_a_key_not_sent_is_reported_missed_never_looked_up():
    keys = {"ed._domainkey.good.example": KEYS["ed._domainkey.good.example"]}
    assert pickle.loads(dkimprocess.answer(pickle.dumps((dkimprocess.verifyThen, (SIGNED, keys, 5, 1024, None))))) \
        == dkimprocess.MISSED


def _verify(processes, raw=SIGNED, keys=KEYS):
    return onReactor(lambda: processes.verify(raw, keys, 5, 1024))


def test_children_verify_concurrent_requests_in_order():
    processes = dkimprocess.DKIMProcesses(reactor, 2, 30)
    try:
        tampered = SIGNED.replace(b"Hello.", b"Hullo.")
        answers = onReactor(lambda: defer.gatherResults(
            [processes.verify(raw, KEYS, 5, 1024) for raw in [SIGNED, tampered] * 5]))
        assert [[r.result for r in a] for a in answers] \
            == [["pass", "pass"], ["permerror", "permerror"]] * 5
    finally:
        onReactor(processes.stop)


def test_a_child_that_dies_is_replaced_after_the_restart_delay():
    """Until then its requests are answered MISSED (the filter's pool takes them): a
    message that kills its child costs one process start per RESTART_DELAY at most."""
    processes = dkimprocess.DKIMProcesses(reactor, 1, 30)
    try:
        assert [r.result for r in _verify(processes)] == ["pass", "pass"]
        first = processes._slots[0].child
        onReactor(lambda: first.transport.signalProcess("KILL"))
        onReactor(lambda: _closed(first))
        assert _verify(processes) == dkimprocess.MISSED
        processes._slots[0].down -= dkimprocess.RESTART_DELAY
        assert [r.result for r in _verify(processes)] == ["pass", "pass"]
        assert processes._slots[0].child not in (None, first)
    finally:
        onReactor(processes.stop)


def _closed(child) -> defer.Deferred:
    """Fires once C{child}'s pipes are closed (its pending requests failed)."""
    d = defer.Deferred()

    def check():
        if child.closed:
            d.callback(None)
        else:
            reactor.callLater(0.01, check)

    check()
    return d


def test_a_child_over_its_deadline_is_killed_and_its_request_fails():
    hanging = (sys.executable, "-c", "import time; time.sleep(60)")
    processes = dkimprocess.DKIMProcesses(reactor, 1, 0.5, argv=hanging)
    with pytest.raises(error.ProcessTerminated):
        _verify(processes)
    assert processes._slots[0].child.closed


def test_a_child_that_cannot_start_fails_the_request_and_is_tried_again_later():
    processes = dkimprocess.DKIMProcesses(reactor, 1, 5, argv=("/nonexistent/python",))
    with pytest.raises(OSError):
        _verify(processes)
    assert _verify(processes) == dkimprocess.MISSED  # not tried again at once


def test_a_message_too_large_to_send_is_missed():
    processes = dkimprocess.DKIMProcesses(reactor, 1, 5, argv=("/nonexistent/python",))
    huge = SIGNED + b"x" * dkimprocess.MAX_REQUEST
    assert _verify(processes, huge) == dkimprocess.MISSED


def test_a_function_named_in_the_request_makes_the_answer_of_the_results():
    processes = dkimprocess.DKIMProcesses(reactor, 1, 30)
    try:
        answer = onReactor(lambda: processes.verify(SIGNED, KEYS, 5, 1024,
                                                    (operator.add, (["and more"],))))
        assert [r.result for r in answer[:2]] == ["pass", "pass"] and answer[2] == "and more"
    finally:
        onReactor(processes.stop)


def test_requests_larger_than_the_pipe_holds_arrive_whole_and_in_order():
    """A request the pipe does not take at once is finished by the transport, and
    what is sent meanwhile queues behind it."""
    large = sign(sign(message(body=("y" * 70 + "\r\n") * 4000), RSA, "good.example", "rsa"),
                 ED, "good.example", "ed")
    assert len(large) > 4 * 65536
    processes = dkimprocess.DKIMProcesses(reactor, 1, 30)
    try:
        answers = onReactor(lambda: defer.gatherResults(
            [processes.verify(raw, KEYS, 5, 1024, (operator.add, ([len(raw)],)))
             for raw in [large, SIGNED, large, SIGNED]]))
        assert [a[-1] for a in answers] == [len(large), len(SIGNED)] * 2
        assert all([r.result for r in a[:-1]] == ["pass", "pass"] for a in answers)
    finally:
        onReactor(processes.stop)


def test_a_request_whose_write_raises_fails_once():
    """The request fails (the filter then does the work itself) and nothing is left
    pending to fail again."""
    processes = dkimprocess.DKIMProcesses(reactor, 1, 30)
    try:
        _verify(processes)
        child = processes._slots[0].child

        def brokenPipe(data):
            raise BrokenPipeError()

        child.send = brokenPipe
        with pytest.raises(BrokenPipeError):
            _verify(processes)
        assert not child.pending
    finally:
        onReactor(processes.stop)


def test_a_child_gone_meanwhile_fails_the_request_it_is_sent():
    """The pipe is broken before the child's end is noticed: what the pipe refuses goes
    through the transport, which finds the broken pipe; the request fails once."""
    processes = dkimprocess.DKIMProcesses(reactor, 1, 30)
    try:
        _verify(processes)
        child = processes._slots[0].child

        def killedThenSent():  # in one reactor turn: the end cannot be noticed between
            child.transport.signalProcess("KILL")
            return processes.verify(SIGNED, KEYS, 5, 1024)

        with pytest.raises(error.ProcessTerminated):
            onReactor(killedThenSent)
        assert not child.pending
    finally:
        onReactor(processes.stop)
