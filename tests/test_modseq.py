"""The modseq journal of the file backends (twistmail.storage._modseq): bounds and crashes."""

from __future__ import annotations

import os

from twistmail.storage import _modseq
from twistmail.storage._modseq import ModSeqs


def record(modseqs: ModSeqs, added=(), changed=(), removed=(), uidNext=1, uidValidity=7,
           own=()) -> None:
    modseqs.apply(modseqs.record(uidValidity, added, changed, removed, uidNext, own))


def test_tombstonesAreBoundedAndTheFloorSaysWhatWasForgotten(tmp_path, monkeypatch):
    monkeypatch.setattr(_modseq, "MAX_TOMBSTONES", 3)
    modseqs = ModSeqs(str(tmp_path / "j"))
    record(modseqs, uidNext=1)
    record(modseqs, added=range(1, 11), uidNext=11)
    mark = modseqs.highest
    for uid in range(1, 6):
        record(modseqs, removed=[uid], uidNext=11)
    assert len(modseqs.tombstones) == 3
    assert modseqs.vanishedSince(mark) is None  # 1 and 2 were forgotten
    assert modseqs.vanishedSince(modseqs.floor) == [3, 4, 5]
    assert modseqs.vanishedSince(modseqs.highest - 1) == [5]


def test_legacyFolderStartsAtOneAndTornLineIsIgnored(tmp_path):
    path = str(tmp_path / "j")
    modseqs = ModSeqs(path)
    record(modseqs, added=[1, 2, 3], uidNext=4)  # a folder from before the journal
    assert modseqs.highest == 1 and modseqs.of(2) == 1
    record(modseqs, changed=[2], uidNext=4)
    assert modseqs.of(2) == 2
    with open(path, "a") as f:
        f.write("3 1")  # a crash in the middle of an append
    again = ModSeqs(path)
    record(again, added=[1, 2, 3], uidNext=4)
    assert (again.highest, again.of(2), again.of(1)) == (2, 2, 1)
    record(again, changed=[1], uidNext=4)
    assert again.of(1) == 3
    third = ModSeqs(path)
    record(third, added=[1, 2, 3], uidNext=4)
    assert (third.highest, third.of(1)) == (3, 3)  # the append after the torn line was kept


def test_compactionKeepsEverythingAndShrinksTheJournal(tmp_path, monkeypatch):
    monkeypatch.setattr(_modseq, "COMPACT_AFTER", 10)
    path = str(tmp_path / "j")
    modseqs = ModSeqs(path)
    record(modseqs, added=[1, 2], uidNext=3)
    for _ in range(20):
        record(modseqs, changed=[1, 2], uidNext=3)
    record(modseqs, removed=[2], uidNext=3)
    assert modseqs.needsCompaction()
    before = (modseqs.highest, dict(modseqs.byUid), list(modseqs.tombstones))
    size = os.path.getsize(path)
    modseqs.apply(modseqs.compact([(m, u) for u, m in modseqs.byUid.items()],
                                  list(modseqs.tombstones)))
    assert os.path.getsize(path) < size / 5
    again = ModSeqs(path)
    record(again, added=[1], uidNext=3)
    assert (again.highest, dict(again.byUid), list(again.tombstones)) == before


def test_newUidValidityRestartsTheJournal(tmp_path):
    modseqs = ModSeqs(str(tmp_path / "j"))
    record(modseqs, added=[1], uidNext=2)
    record(modseqs, changed=[1], uidNext=2)
    assert modseqs.highest == 2
    again = ModSeqs(str(tmp_path / "j"))
    record(again, added=[1], uidNext=2, uidValidity=8)
    assert again.highest == 1 and again.byUid == {}
    # One folder object that finds a new UIDVALIDITY (its uidlist was lost) starts over too.
    same = ModSeqs(str(tmp_path / "k"))
    record(same, added=[1], uidNext=2)
    record(same, changed=[1], own=[1], uidNext=2)
    record(same, added=[1], uidNext=2, uidValidity=9)
    assert same.highest == 1 and same.byUid == {} and same.uidValidity == 9


def test_ownChangesAreRecordedAndObservedOnesAdopted(tmp_path, monkeypatch):
    """Two processes on one journal.  What B's refresh finds that A recorded keeps A's
    modseq; B's own change to a message A just changed gets a new one, above A's, also
    when B rereads the whole journal after A compacted it."""
    monkeypatch.setattr(_modseq, "COMPACT_AFTER", 2)
    path = str(tmp_path / "j")
    a, b = ModSeqs(path), ModSeqs(path)
    record(a, uidNext=3)
    record(b, uidNext=3)
    record(a, changed=[1], own=[1], uidNext=3)
    record(b, changed=[1], uidNext=3)  # B's refresh saw A's change
    assert b.of(1) == a.of(1) == a.highest == b.highest
    record(a, changed=[2], own=[2], uidNext=3)
    record(b, changed=[2], own=[2], uidNext=3)  # B's STORE, before its refresh saw A's
    assert b.of(2) == a.highest + 1
    for _ in range(3):
        record(a, changed=[1, 2], own=[1, 2], uidNext=3)
    a.apply(a.compact([(m, u) for u, m in a.byUid.items()], list(a.tombstones)))
    record(b, changed=[2], own=[2], uidNext=3)
    assert b.of(2) == a.highest + 1 and b.highest == a.highest + 1
    record(a, uidNext=3)
    assert a.of(2) == b.of(2)
