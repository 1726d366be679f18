"""One session's view of its folder: what it reports of flag changes it already told itself."""

from __future__ import annotations

from twistmail.model import FolderChanges, StoredMessage
from twistmail.protocols.imap.view import SelectedFolder

SEEN, FLAGGED = frozenset({"\\Seen"}), frozenset({"\\Flagged"})


class Folder:
    """The few IMailbox calls a view makes, on messages 1-4 held in memory."""

    maxKeywords = None

    def __init__(self) -> None:
        self.flags = {uid: frozenset() for uid in range(1, 5)}
        self._uids = tuple(self.flags)
        self.listeners: list = []

    def uids(self) -> tuple:
        return self._uids

    def message(self, uid: int) -> StoredMessage | None:
        return StoredMessage(uid, str(uid), self.flags[uid], 10, 0) if uid in self.flags else None

    def keywords(self) -> list[str]:
        return []

    def addListener(self, listener) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener) -> None:
        self.listeners.remove(listener)

    def change(self, flags: frozenset, *uids: int) -> None:
        for uid in uids:
            self.flags[uid] = flags
        for listener in self.listeners:
            listener(FolderChanges(flagsChanged=uids))


def view() -> tuple[Folder, SelectedFolder]:
    folder = Folder()
    return folder, SelectedFolder(folder, False, lambda mailbox, uids: set())


def test_a_change_the_session_fetched_already_is_not_repeated():
    folder, selected = view()
    folder.change(SEEN, 2, 3)
    selected.toldMany((2, 3), [SEEN, frozenset()])  # 3 was fetched before its change
    assert selected.updates() == [b"* 3 FETCH (UID 3 FLAGS (\\Seen))"]


def test_the_latest_report_counts_whether_column_or_single():
    folder, selected = view()
    selected.toldMany((1, 2), [SEEN, SEEN])
    selected.told(2, FLAGGED)  # a STORE after the FETCH
    folder.change(FLAGGED, 1, 2)
    assert selected.updates() == [b"* 1 FETCH (UID 1 FLAGS (\\Flagged))"]
    selected.told(1, SEEN)
    selected.toldMany((1, 2), [FLAGGED, SEEN])  # a FETCH after the STORE
    folder.change(FLAGGED, 1, 2)
    assert selected.updates() == [b"* 2 FETCH (UID 2 FLAGS (\\Flagged))"]


def test_what_was_told_is_forgotten_at_each_update():
    folder, selected = view()
    selected.toldMany((1,), [SEEN])
    assert selected.updates() == []
    folder.change(SEEN, 1)
    assert selected.updates() == [b"* 1 FETCH (UID 1 FLAGS (\\Seen))"]


def test_spans_and_their_pairs():
    _, selected = view()
    assert selected.seqSpans([(1, 2), (4, 9)]) == [(0, 2), (3, 4)]
    assert selected.pairs(selected.seqSpans([(1, 2), (4, 9)])) == [(1, 1), (2, 2), (4, 4)]
    assert selected.uidSpans([(2, 3), (9, 12)]) == [(1, 3), (4, 4)]
    assert selected.byUid([(2, 3), (9, 12)]) == [(2, 2), (3, 3)]
