"""QuotaTracker's usage cache: one computation per account per USAGE_TTL, shared by
concurrent askers, bounded, and kept current by what this process adds (no sockets)."""

from __future__ import annotations

from twisted.internet import defer

from twistmail.delivery import quota
from twistmail.model import StoredMessage


class FakeAccount:
    def __init__(self, store, sizes: dict) -> None:
        self.store = store
        self.sizes = sizes

    def listFolders(self):
        self.store.scans += 1
        d = defer.Deferred()
        self.store.pending.append((d, list(self.sizes)))
        return d

    def openFolder(self, name):
        sizes = self.sizes[name]
        mailbox = type("Box", (), {"messages": lambda self: [StoredMessage(i + 1, "", frozenset(), s, 0)
                                                              for i, s in enumerate(sizes)]})()
        return defer.succeed(mailbox)


class FakeStore:
    """Every listFolders waits until the test fires it: computations can overlap."""

    def __init__(self, folders: dict) -> None:
        self.folders = folders
        self.scans = 0
        self.pending: list = []

    def account(self, name):
        return FakeAccount(self, self.folders)

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        for d, names in pending:
            d.callback(names)


class Accounts:
    def quota(self, account):
        return {"storage": 1000, "messages": 10}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def tracker(store, clock) -> quota.QuotaTracker:
    return quota.QuotaTracker(store, Accounts(), quota.Quota(), clock=clock)


def usage(t, account="a@example.test") -> list:
    out = []
    defer.Deferred.fromCoroutine(t.usage(account)).addBoth(out.append)
    return out


def test_one_scan_shared_then_cached_until_the_ttl():
    store, clock = FakeStore({"INBOX": [100, 200], "Sent": [50]}), Clock()
    t = tracker(store, clock)
    first, second = usage(t), usage(t)
    assert store.scans == 1 and first == second == []
    store.finish()
    assert first == second == [quota.Usage(350, 3)]
    for _ in range(100):
        assert usage(t) == [quota.Usage(350, 3)]
    assert store.scans == 1, "not a scan per command"
    t.added("A@example.test", 10, 1)
    assert usage(t) == [quota.Usage(360, 4)]
    clock.now += quota.USAGE_TTL + 1
    later = usage(t)
    assert store.scans == 2
    store.finish()
    assert later == [quota.Usage(350, 3)]
    t.forget("a@example.test")
    usage(t)
    assert store.scans == 3


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(quota, "MAX_ACCOUNTS", 3)
    store, clock = FakeStore({"INBOX": [1]}), Clock()
    t = tracker(store, clock)
    for n in range(10):
        usage(t, f"u{n}@example.test")
        store.finish()
    assert len(t._cache) == 3
