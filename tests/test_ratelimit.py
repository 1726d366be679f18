"""Outbound rate limits per authenticated user and per sending domain: the sliding
window, reservations under concurrency, bounded memory, and the published state file."""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet import defer, task

from twistmail.ratelimit import (
    BUCKET,
    WINDOW,
    LimitReached,
    Limits,
    RateLimitPublisher,
    SendLimits,
    StateError,
    readState,
    statePath,
    totals,
)

ALICE = "alice@example.test"
CAROL = "carol@example.test"


def limits(clock, user=(3, 5), domain=(0, 0), **kw) -> SendLimits:
    return SendLimits(Limits(*user), Limits(*domain), clock=clock.seconds, **kw)


def send(sl: SendLimits, account: str, recipients: int = 1) -> None:
    r = sl.begin(account)
    for _ in range(recipients):
        r.addRecipient()
    r.commit()


def test_messages_per_hour_refused_past_the_limit_then_window_slides():
    clock = task.Clock()
    clock.advance(1_000_000)
    sl = limits(clock)
    for _ in range(3):
        send(sl, ALICE)
        clock.advance(600)  # one message every 10 minutes
    with pytest.raises(LimitReached) as info:
        sl.begin(ALICE)
    assert (info.value.scope, info.value.what, info.value.limit) == ("user", "messages", 3)
    assert info.value.key == "max_messages_per_hour"
    assert "4.7.1" in info.value.reply() and "messages per hour" in info.value.reply()
    # The first message leaves the window an hour after it was sent, not at a fixed hour.
    clock.advance(WINDOW - 3 * 600 + BUCKET)
    sl.begin(ALICE).release()
    assert sl.counts("user", ALICE) == (2, 2)


def test_recipients_per_hour_counted_per_accepted_recipient():
    clock = task.Clock()
    sl = limits(clock, user=(0, 5))
    send(sl, ALICE, recipients=4)
    r = sl.begin(ALICE)
    r.addRecipient()
    with pytest.raises(LimitReached) as info:
        r.addRecipient()
    assert (info.value.what, info.value.key) == ("recipients", "max_recipients_per_hour")
    r.commit()
    assert sl.counts("user", ALICE) == (2, 5)


def test_reservations_hold_under_concurrency_and_are_released_on_failure():
    """Several sessions of one account: what they reserved counts before any 250."""
    clock = task.Clock()
    sl = limits(clock, user=(2, 100))
    first, second = sl.begin(ALICE), sl.begin(ALICE)
    with pytest.raises(LimitReached):
        sl.begin(ALICE)
    second.release()  # RSET, a failed DATA, a dropped connection
    second.release()  # twice is harmless
    third = sl.begin(ALICE)
    first.commit()
    third.commit()
    assert sl.counts("user", ALICE) == (2, 0)
    with pytest.raises(LimitReached):
        sl.begin(ALICE)


def test_domain_limit_covers_every_user_of_the_domain():
    clock = task.Clock()
    sl = limits(clock, user=(10, 100), domain=(2, 100))
    send(sl, ALICE)
    send(sl, CAROL)
    with pytest.raises(LimitReached) as info:
        sl.begin("dave@example.test")
    assert (info.value.scope, info.value.name, info.value.key) == (
        "domain", "example.test", "domain_max_messages_per_hour")
    sl.begin("erin@other.test").commit()  # another domain is not affected
    # A refused reservation took nothing from the user's own limit either.
    assert sl.counts("user", "dave@example.test") == (0, 0)


def test_zero_is_unlimited_but_still_counted():
    clock = task.Clock()
    sl = limits(clock, user=(0, 0), domain=(0, 0))
    for _ in range(50):
        send(sl, ALICE, 3)
    assert sl.counts("user", ALICE) == (50, 150)
    assert sl.counts("domain", "example.test") == (50, 150)


def test_tracked_accounts_are_bounded_least_recent_forgotten():
    clock = task.Clock()
    sl = limits(clock, user=(1, 10), maxTracked=3)
    for n in range(5):
        send(sl, f"u{n}@example.test")
    assert len(sl._tables["user"]) == 3
    assert sl.counts("user", "u0@example.test") == (0, 0)  # forgotten
    assert sl.counts("user", "u4@example.test") == (1, 1)


def test_snapshot_round_trip_keeps_the_window_across_a_restart():
    clock = task.Clock()
    clock.advance(1_000_000)
    sl = limits(clock)
    send(sl, ALICE, 2)
    clock.advance(WINDOW - 120)
    send(sl, ALICE, 1)
    data = json.loads(json.dumps(sl.snapshot()))
    assert data["version"] == 1 and data["limits"]["user"] == {"messages": 3, "recipients": 5}

    restarted = limits(clock)
    restarted.restore(data)
    assert restarted.counts("user", ALICE) == (2, 3)
    assert totals(data["users"][ALICE], clock.seconds()) == (2, 3)
    clock.advance(3 * BUCKET)  # the first message has left the window
    assert restarted.counts("user", ALICE) == (1, 1)
    assert totals(data["users"][ALICE], clock.seconds()) == (1, 1)


@pytest.mark.parametrize("junk", [b"{", b"[]", b'{"version": 99}', b'{"version": 1, "users": 5}'])
def test_a_damaged_state_file_is_a_clear_error(tmp_path, junk):
    path = tmp_path / "ratelimits.json"
    path.write_bytes(junk)
    with pytest.raises(StateError) as info:
        readState(str(path))
    assert str(path) in str(info.value)


def test_restore_ignores_malformed_entries():
    clock = task.Clock()
    sl = limits(clock)
    sl.restore({"version": 1, "users": {ALICE: [[0, "x", 1], "bad"], CAROL: [[0, 1, 1]]},
                "domains": []})
    assert sl.counts("user", CAROL) == (1, 1) and sl.counts("user", ALICE) == (0, 0)


class _Writes:
    """Stands in for deferToThread: runs the write at once, records it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, f, *args):
        self.calls += 1
        return defer.maybeDeferred(f, *args)


def test_publisher_writes_periodically_only_when_changed_at_stop_and_reloads(tmp_path):
    clock = task.Clock()
    dataDir = str(tmp_path)
    sl = limits(clock)
    writes = _Writes()
    pub = RateLimitPublisher(sl, dataDir, clock, writes, interval=10)
    pub.startService()
    clock.advance(10)
    assert writes.calls == 0  # nothing sent, nothing written
    send(sl, ALICE, 2)
    clock.advance(10)
    assert writes.calls == 1
    assert readState(statePath(dataDir))["users"][ALICE][0][1:] == [1, 2]
    clock.advance(10)
    assert writes.calls == 1
    send(sl, ALICE, 1)
    pub.stopService()
    assert writes.calls == 2
    assert totals(readState(statePath(dataDir))["users"][ALICE], clock.seconds()) == (2, 3)
    assert oct(os.stat(statePath(dataDir)).st_mode & 0o777) == "0o600"

    again = limits(clock)
    RateLimitPublisher(again, dataDir, clock, _Writes(), interval=10).startService()
    assert again.counts("user", ALICE) == (2, 3)


def test_publisher_starts_empty_over_a_damaged_file(tmp_path):
    os.makedirs(tmp_path / "state")
    with open(statePath(str(tmp_path)), "w") as f:
        f.write("{not json")
    clock = task.Clock()
    sl = limits(clock)
    RateLimitPublisher(sl, str(tmp_path), clock, _Writes(), interval=10).startService()
    assert sl.counts("user", ALICE) == (0, 0)


def test_each_snapshot_copies_only_what_changed_but_holds_every_recent_sender():
    clock = task.Clock()
    clock.advance(1_000_000)
    sl = limits(clock)
    send(sl, ALICE)
    assert list(sl.snapshot()["users"]) == [ALICE]
    assert not sl.changed
    send(sl, CAROL)
    assert sorted(sl.snapshot()["users"]) == [ALICE, CAROL]  # alice kept, not copied again
    clock.advance(WINDOW + BUCKET)
    send(sl, "bob@example.test")
    data = sl.snapshot()
    assert list(data["users"]) == ["bob@example.test"]  # the others left the window
    assert data["domains"] == {"example.test": [[int(clock.seconds() // BUCKET), 1, 1]]}


def test_a_failed_write_is_logged_and_tried_again(tmp_path):
    from twisted.logger import globalLogPublisher

    clock = task.Clock()
    sl = limits(clock)
    outcomes = [defer.fail(OSError(28, "No space left on device"))]

    def inThread(f, *args):
        return outcomes.pop() if outcomes else defer.maybeDeferred(f, *args)

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        pub = RateLimitPublisher(sl, str(tmp_path), clock, inThread, interval=10)
        pub.startService()
        send(sl, ALICE)
        clock.advance(10)
        assert not os.path.exists(statePath(str(tmp_path)))
        clock.advance(10)  # nothing new was sent, but the failed write is retried
        assert readState(statePath(str(tmp_path)))["users"][ALICE][0][1:] == [1, 1]
        pub.stopService()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert any("not written" in e.get("log_format", "") for e in seen)


def test_a_clock_stepped_back_does_not_hand_out_a_fresh_hour():
    now = [1_000_000.0]
    sl = SendLimits(Limits(2, 0), Limits(0, 0), clock=lambda: now[0])
    send(sl, ALICE)
    send(sl, ALICE)
    now[0] -= 1800  # NTP, or an operator, sets the clock half an hour back
    with pytest.raises(LimitReached):
        sl.begin(ALICE)
    assert totals(sl.snapshot()["users"][ALICE], now[0]) == (2, 2)
