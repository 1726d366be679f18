"""The greylist filter (RFC 6647): the first RCPT of an unknown client network, sender and
recipient is told 450 4.2.0; a retry after the delay passes.  Time is a task.Clock."""

from __future__ import annotations

import json
import os

import pytest
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from twistmail import config
from twistmail._pluginload import find
from twistmail.filters.greylist import Greylist, statePath
from twistmail.interfaces import IMessageFilter, IMessageFilterFactory
from twistmail.model import FilterContext, SessionInfo

DAY = 86400
ALICE, BOB = "alice@sender.example", "bob@example.org"


def setup(tmp_path, **antispam):
    """(filter, clock) with greylisting on and the given [antispam] settings."""
    clock = task.Clock()
    clock.advance(1_000_000)
    settings = config.load(None, {"antispam": {"greylist": True, **antispam},
                                  "relay": {"trusted_networks": ["203.0.113.0/24"]},
                                  "server": {"data_dir": str(tmp_path)}})
    factory = find(IMessageFilterFactory, "greylist", "[filters] inbound", "filter")
    filt = factory.makeFilter({}, FilterContext("mx.example.org", str(tmp_path), None, clock,
                                                settings))
    return filt, clock


def rcpt(filt, client="192.0.2.1", sender=ALICE, recipient=BOB, **fields):
    session = SessionInfo("inbound", client, sender=sender, **fields)
    return filt.rcptTo(session, recipient)


def greylisted(verdict) -> bool:
    if verdict is None:
        return False
    assert verdict.code == 450 and verdict.text.startswith("4.2.0 Greylisted"), verdict
    return True


def test_the_builtin_plugin_provides_the_interfaces(tmp_path):
    filt, _ = setup(tmp_path)
    assert verifyObject(IMessageFilter, filt)
    assert verifyObject(IMessageFilterFactory,
                        find(IMessageFilterFactory, "greylist", "[filters] inbound", "filter"))


def test_a_new_triplet_is_told_to_retry_and_passes_after_the_delay(tmp_path):
    filt, clock = setup(tmp_path)
    verdict = rcpt(filt)
    assert greylisted(verdict) and "300 seconds" in verdict.text
    clock.advance(299)
    assert greylisted(rcpt(filt))  # too early: still the same first-seen time
    clock.advance(1)
    assert rcpt(filt) is None
    clock.advance(10 * DAY)
    assert rcpt(filt) is None  # passed triplets stay passed


def test_the_key_is_the_client_slash_24_or_slash_64_sender_and_recipient(tmp_path):
    filt, clock = setup(tmp_path, greylist_auto_allow=0)
    for client in ("192.0.2.1", "2001:db8:1:2::1"):
        assert greylisted(rcpt(filt, client))
    clock.advance(300)
    assert rcpt(filt, "192.0.2.200") is None  # the same /24 (a sending farm retries from another host)
    assert rcpt(filt, "2001:db8:1:2:ffff::9") is None  # the same /64
    assert greylisted(rcpt(filt, "192.0.3.1"))  # another /24
    assert greylisted(rcpt(filt, sender="carol@sender.example"))
    assert greylisted(rcpt(filt, recipient="dave@example.org"))
    assert rcpt(filt, sender=ALICE.upper(), recipient=BOB.upper()) is None  # case does not matter


def test_a_first_retry_after_the_retry_window_starts_over(tmp_path):
    filt, clock = setup(tmp_path)
    assert greylisted(rcpt(filt))
    clock.advance(2 * DAY + 1)  # postgrey's --retry-window: 2 days
    assert greylisted(rcpt(filt))
    clock.advance(300)
    assert rcpt(filt) is None


def test_a_passed_triplet_is_forgotten_after_max_age_unseen(tmp_path):
    filt, clock = setup(tmp_path)
    rcpt(filt)
    clock.advance(300)
    assert rcpt(filt) is None
    clock.advance(35 * DAY - 1)
    assert rcpt(filt) is None  # seen again: the 35 days start anew
    clock.advance(35 * DAY + 1)
    assert greylisted(rcpt(filt))


def test_a_client_network_that_retried_five_times_is_no_longer_greylisted(tmp_path):
    filt, clock = setup(tmp_path)
    recipients = [f"user{i}@example.org" for i in range(6)]
    for recipient in recipients[:5]:
        assert greylisted(rcpt(filt, recipient=recipient))
    clock.advance(300)
    for recipient in recipients[:4]:
        assert rcpt(filt, recipient=recipient) is None
    assert greylisted(rcpt(filt, "192.0.2.7", recipient=recipients[5]))  # 4 passes: not yet
    assert rcpt(filt, recipient=recipients[4]) is None  # the fifth
    assert rcpt(filt, "192.0.2.7", sender="new@other.example") is None  # auto-allowed /24
    assert greylisted(rcpt(filt, "192.0.3.7", sender="new@other.example"))


@pytest.mark.parametrize("client, fields, allow", [
    ("192.0.2.1", {"authenticated": "alice@example.org"}, []),
    ("203.0.113.9", {}, []),  # [relay] trusted_networks
    ("192.0.2.1", {}, ["192.0.2.0/28"]),
    ("192.0.2.1", {}, ["sender.example"]),  # the sender's domain
    ("192.0.2.1", {}, [ALICE]),
    ("192.0.2.1", {}, [BOB]),  # the recipient (postmaster@ stays reachable)
])
def test_allowed_trusted_and_authenticated_sessions_are_never_greylisted(tmp_path, client,
                                                                         fields, allow):
    filt, _ = setup(tmp_path, allow=allow)
    assert rcpt(filt, client, **fields) is None


def test_the_null_sender_is_greylisted_like_any_other_and_a_local_program_never(tmp_path):
    filt, clock = setup(tmp_path)
    assert greylisted(rcpt(filt, sender=""))
    clock.advance(300)
    assert rcpt(filt, sender="") is None
    assert rcpt(filt, client="") is None  # no address: nothing to key on


def test_off_by_default(tmp_path):
    filt, _ = setup(tmp_path, greylist=False)
    assert rcpt(filt) is None


def test_the_tables_are_bounded_oldest_first():
    clock = task.Clock()
    table = Greylist(300, 2 * DAY, 35 * DAY, 5, clock.seconds, maxTriplets=3, maxClients=2)
    for i in range(4):
        table.check("192.0.2.1", f"s{i}@example.net", BOB)
        clock.advance(1)
    assert len(table) == 3
    clock.advance(300)
    assert table.check("192.0.2.1", "s0@example.net", BOB) > 0  # forgotten: greylisted anew
    assert table.check("192.0.2.1", "s3@example.net", BOB) == 0


def test_state_is_written_in_batches_off_the_reactor_and_survives_a_restart(tmp_path):
    filt, clock = setup(tmp_path)
    writes = []

    def inThread(f, *args):
        writes.append(f)
        return defer.maybeDeferred(f, *args)

    publisher = filt.publisher
    publisher._inThread = inThread
    rcpt(filt)
    clock.advance(300)
    publisher.startService()
    assert rcpt(filt) is None
    for i in range(20):
        rcpt(filt, recipient=f"u{i}@example.org")
    assert writes == []  # nothing per message
    clock.advance(60)
    assert len(writes) == 1
    with open(statePath(str(tmp_path)), "rb") as f:
        text = f.read()
    assert b"alice" not in text and b"example.org" not in text  # triplets are hashed
    assert json.loads(text)["version"] == 1
    clock.advance(60)
    assert len(writes) == 1  # unchanged: not rewritten
    publisher.stopService()

    again, clock2 = setup(tmp_path)
    again.publisher._inThread = defer.maybeDeferred
    again.publisher.startService()
    clock2.advance(1)
    assert rcpt(again) is None  # the passed triplet came back
    assert greylisted(rcpt(again, recipient="u0@example.org"))  # greylisted, not passed yet
    again.publisher.stopService()


def test_an_unreadable_state_file_starts_empty(tmp_path):
    os.makedirs(os.path.dirname(statePath(str(tmp_path))))
    with open(statePath(str(tmp_path)), "w") as f:
        f.write("{not json")
    filt, clock = setup(tmp_path)
    filt.publisher._inThread = defer.maybeDeferred
    filt.publisher.startService()
    assert greylisted(rcpt(filt))
    filt.publisher.stopService()
    with open(statePath(str(tmp_path))) as f:
        assert json.load(f)["version"] == 1  # replaced by a good one


def test_bad_greylist_settings_name_the_key():
    with pytest.raises(config.ConfigError, match=r"\[antispam\] greylist_delay"):
        config.load(None, {"antispam": {"greylist_delay": 0}})
    with pytest.raises(config.ConfigError, match=r"\[antispam\] allow.*Fix"):
        config.load(None, {"antispam": {"allow": ["not an entry"]}})



def test_the_factory_reads_the_state_when_the_reactor_starts_and_writes_it_before_it_stops(tmp_path):
    from support import onReactor
    from twisted.internet.testing import MemoryReactorClock

    def run(hooks):
        for f, args, kwargs in hooks:
            onReactor(lambda f=f, args=args, kwargs=kwargs: defer.maybeDeferred(f, *args, **kwargs))

    def start():
        reactor = MemoryReactorClock()
        reactor.advance(1_000_000)
        # A delay shorter than the save interval: no write comes from the clock (it would run
        # deferToThread off the reactor thread).
        settings = config.load(None, {"antispam": {"greylist": True, "greylist_delay": 30}})
        factory = find(IMessageFilterFactory, "greylist", "[filters] inbound", "filter")
        filt = factory.makeFilter({}, FilterContext("mx.example.org", str(tmp_path), None,
                                                    reactor, settings))
        run([(f, a, k) for f, a, k in reactor.whenRunningHooks])
        return filt, reactor

    filt, reactor = start()
    assert greylisted(rcpt(filt))
    reactor.advance(30)
    assert rcpt(filt) is None
    assert not os.path.exists(statePath(str(tmp_path)))  # not per message
    run(reactor.triggers["before"]["shutdown"])
    assert os.path.exists(statePath(str(tmp_path)))

    again, _ = start()
    assert rcpt(again) is None
