"""SORT and THREAD=ORDEREDSUBJECT/REFERENCES (RFC 5256): base subjects, orders, thread
trees (no network), and the commands over loopback on every backend."""

from __future__ import annotations

import sys
import time

import pytest
from imapwire import loggedIn
from support import everyBackend  # noqa: F401 - the backend fixture: each test on every backend

from twistmail.protocols.imap import sort, thread
from twistmail.protocols.imap.basesubject import baseSubject
from twistmail.protocols.imap.parser import Arguments, ParseError


@pytest.mark.parametrize("subject, base, isReply", [
    ("Hello", "Hello", False),
    ("Re: hello", "hello", True),
    ("RE: [list] Fwd: Hello (fwd)", "Hello", True),
    ("[list] hello", "hello", False),
    ("[list]", "[list]", False),  # (4): a blob stays when nothing would be left
    ("[a] [b]", "[b]", False),
    ("[a][b] Re: x", "x", True),
    ("Re [x]: y", "y", True),
    ("Fw : y", "y", True),
    ("[Fwd: Re: thing]", "thing", True),  # (6), then (2)-(5) again
    ("  Fw:  spaced \t  out  ", "spaced out", True),
    ("x (fwd) (FWD) ", "x", True),
    ("Re:", "", True),
    ("Ré: x", "Ré: x", False),  # BLOBCHAR and "re" are ASCII
    ("Re: Re:  hello\r\n world", "hello world", True),
    ("Refund: due", "Refund: due", False),
])
def test_base_subject(subject, base, isReply):
    assert baseSubject(subject) == (base, isReply)


def test_base_subject_of_hostile_subjects_is_quick():
    started = time.monotonic()
    for subject in ("[a]" * 300000, "[fwd:" * 3000 + "x" + "]" * 3000, "Re: (fwd)" * 100000):
        baseSubject(subject)
    assert time.monotonic() - started < 2


def d(seq: int, subject: str = "", sent: float = 0, messageId: str | None = None,
      references: tuple = (), **kw) -> sort.Described:
    base, isReply = baseSubject(subject)
    return sort.Described(seq, seq * 10, kw.pop("arrival", 0), kw.pop("size", 0), sent=sent,
                          subject=base.casefold(), isReply=isReply, messageId=messageId,
                          references=list(references), **kw)


def criteria(text: bytes):
    return sort.parseCriteria(Arguments([text]))


def test_sort_keys_reverse_and_ties_in_mailbox_order():
    messages = [d(1, "b", sent=5, size=10, fromMailbox="zed"), d(2, "Re: a", sent=5, size=30),
                d(3, "A", sent=1, size=20, fromMailbox="amy"), d(4, "b", sent=9, size=20)]
    order = lambda text: [m.seq for m in sort.sortMessages(messages, criteria(text))]  # noqa: E731
    assert order(b"(SUBJECT)") == [2, 3, 1, 4]
    assert order(b"(SUBJECT DATE)") == [3, 2, 1, 4]
    assert order(b"(REVERSE DATE)") == [4, 1, 2, 3]  # 1 and 2 tie: mailbox order, not reversed
    assert order(b"(SIZE REVERSE SUBJECT)") == [1, 4, 3, 2]
    assert order(b"(FROM)") == [2, 4, 3, 1]  # no From sorts as ""
    for bad in (b"()", b"(REVERSE)", b"(DATE REVERSE)", b"(REVERSE REVERSE DATE)", b"(COLOR)"):
        with pytest.raises(ParseError):
            criteria(bad)


def test_ordered_subject():
    messages = [d(1, "b", sent=3), d(2, "Re: a", sent=1), d(3, "B", sent=2), d(4, "a", sent=4),
                d(5, "c", sent=9), d(6, "re: b", sent=5)]
    assert thread.render(thread.orderedSubject(messages), uid=False) == b"(2 4)(3 (1)(6))(5)"
    assert thread.render(thread.orderedSubject(messages), uid=True) == b"(20 40)(30 (10)(60))(50)"


def test_references_links_replies_and_keeps_missing_parents_as_dummies():
    messages = [
        d(1, "root", 1, "<r@x>"),
        d(2, "Re: root", 2, "<a@x>", ["<r@x>"]),
        d(3, "Re: root", 3, "<b@x>", ["<r@x>", "<a@x>"]),
        d(4, "Re: root", 4, "<c@x>", ["<r@x>"]),
        # Two replies to a message this folder does not have: a dummy parent holds them.
        d(5, "other", 5, "<o1@x>", ["<gone@x>"]),
        d(6, "other", 6, "<o2@x>", ["<gone@x>"]),
        # A reply whose parent is gone and has no sibling: the dummy is pruned away.
        d(7, "lonely", 7, "<l@x>", ["<gone2@x>"]),
    ]
    assert thread.render(thread.references(messages), uid=False) == b"(1 (2 3)(4))((5)(6))(7)"


def test_references_gathers_roots_by_base_subject():
    messages = [
        d(1, "Subject", 1, "<1@x>"),
        d(2, "Re: Subject", 2, "<2@x>"),  # no references: put under the original (5)(C)
        d(3, "Another", 3, "<3@x>"),
        d(4, "another", 4, "<4@x>"),  # neither a reply: both under a new dummy
        d(5, "", 5, "<5@x>"),  # an empty base subject is never gathered
        d(6, "", 6, "<6@x>"),
    ]
    assert thread.render(thread.references(messages), uid=False) == b"(1 2)((3)(4))(5)(6)"


def test_references_refuses_loops_and_duplicate_ids():
    messages = [
        d(1, "a", 1, "<a@x>", ["<b@x>"]),
        d(2, "b", 2, "<b@x>", ["<a@x>"]),  # would make a loop: b stays a root, a under it
        d(3, "c", 3, "<a@x>"),  # a repeated id: this one gets its own
        d(4, "d", 4, "<d@x>", ["<d@x>"]),  # refers to itself
        d(5, "e", 5, None, ["<d@x>", "<e1@x>", "<e1@x>"]),
    ]
    assert thread.render(thread.references(messages), uid=False) == b"(2 1)(3)(4 5)"


def test_deep_threads_need_no_recursion():
    depth = sys.getrecursionlimit() * 3
    messages = [d(1, "s", 0, "<0@x>")] + [
        d(n + 1, "Re: s", n, f"<{n}@x>", [f"<{n - 1}@x>"]) for n in range(1, depth)]
    started = time.monotonic()
    rendered = thread.render(thread.references(messages), uid=False)
    assert rendered == b"(" + b" ".join(b"%d" % n for n in range(1, depth + 1)) + b")"
    assert time.monotonic() - started < 5


# -- over loopback ------------------------------------------------------------------------

MESSAGES = [
    (b"From: Zed <zed@x.example>\r\nTo: b@y.example\r\nSubject: Plans\r\n"
     b"Date: Tue, 5 Mar 2024 09:00:00 +0000\r\nMessage-ID: <p1@x>\r\n\r\nfirst\r\n"),
    (b"From: amy@x.example\r\nSubject: =?utf-8?q?Re=3A_plans?=\r\nDate: Tue, 5 Mar 2024 08:00:00 -0300\r\n"
     b"Message-ID: <p2@x>\r\nIn-Reply-To: <p1@x>\r\n\r\nsecond, the longest one of them all\r\n"),
    (b"From: Bob <bob@x.example>\r\nSubject: [list] Alpha\r\nDate: Mon, 4 Mar 2024 10:00:00 +0000\r\n"
     b"Message-ID: <a1@x>\r\n\r\nthird\r\n"),
    (b"From: carl@x.example\r\nSubject: Re: Plans\r\nDate: Wed, 6 Mar 2024 10:00:00 +0000\r\n"
     b"Message-ID: <p3@x>\r\nReferences: <p1@x> <p2@x>\r\n\r\nfourth\r\n"),
]


def filled(port: int):
    client = loggedIn(port)
    for day, message in enumerate(MESSAGES, 1):
        client.append(message, date=f"0{day}-Jan-2024 10:00:00 +0000")
    client.ok("SELECT INBOX")
    return client


def test_capabilities_are_advertised(server):
    (capability,) = loggedIn(server.imapPort).ok("CAPABILITY")
    for name in (b"SORT", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES"):
        assert b" " + name + b" " in capability + b" "


def test_sort_command(server):
    client = filled(server.imapPort)
    # Message 2's Date is 11:00 UTC: after message 1.
    assert client.ok("SORT (DATE) UTF-8 ALL") == [b"* SORT 3 1 2 4"]
    assert client.ok("SORT (REVERSE ARRIVAL) US-ASCII ALL") == [b"* SORT 4 3 2 1"]
    assert client.ok("SORT (SUBJECT DATE) UTF-8 ALL") == [b"* SORT 3 1 2 4"]
    assert client.ok("SORT (FROM) UTF-8 NOT FROM bob") == [b"* SORT 2 4 1"]
    assert client.ok("SORT (REVERSE SIZE) UTF-8 1:3") == [b"* SORT 2 1 3"]
    assert client.ok("UID SORT (TO SUBJECT) UTF-8 ALL") == [b"* SORT 3 2 4 1"]
    client.ok("SEARCH RETURN (SAVE) 2:3")
    assert client.ok("SORT (SUBJECT) UTF-8 $") == [b"* SORT 3 2"]
    untagged, tagged = client.command("SORT (DATE) KOI8-R ALL")
    assert tagged.startswith(b"NO [BADCHARSET")
    for bad in ("SORT DATE UTF-8 ALL", "SORT (DATE) ALL", "SORT (NOPE) UTF-8 ALL", "SORT (DATE)"):
        assert client.command(bad)[1].startswith(b"BAD"), bad


def test_thread_command(server):
    client = filled(server.imapPort)
    assert client.ok("THREAD REFERENCES UTF-8 ALL") == [b"* THREAD (3)(1 2 4)"]
    assert client.ok("UID THREAD REFERENCES UTF-8 ALL") == [b"* THREAD (3)(1 2 4)"]
    assert client.ok("THREAD ORDEREDSUBJECT UTF-8 ALL") == [b"* THREAD (3)(1 (2)(4))"]
    assert client.ok("THREAD REFERENCES UTF-8 NOT 2") == [b"* THREAD (3)(1 4)"]
    assert client.ok("THREAD REFERENCES UTF-8 KEYWORD none") == [b"* THREAD "]
    assert client.command("THREAD JWZ UTF-8 ALL")[1].startswith(b"BAD")


def test_sort_and_thread_hold_expunges_back_but_uid_forms_do_not(server):
    """RFC 3501 §7.4.1 for SORT and THREAD as for SEARCH: no EXPUNGE while sequence numbers
    are being answered; UID SORT and UID THREAD may report it."""
    client = filled(server.imapPort)
    other = loggedIn(server.imapPort)
    other.ok("SELECT INBOX")
    other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    other.ok("EXPUNGE")
    assert client.ok("SORT (ARRIVAL) UTF-8 ALL") == [b"* SORT 1 2 3 4"]  # 1 still in the view
    assert client.ok("THREAD ORDEREDSUBJECT UTF-8 ALL")[-1].startswith(b"* THREAD")
    untagged = client.ok("UID SORT (ARRIVAL) UTF-8 ALL")
    assert untagged[0] == b"* SORT 1 2 3 4" and b"* 1 EXPUNGE" in untagged
    assert client.ok("SORT (ARRIVAL) UTF-8 ALL") == [b"* SORT 1 2 3"]
