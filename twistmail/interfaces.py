# -*- test-case-name: tests.test_store_conformance -*-
"""Every zope Interface twistmail defines.

Protocol adapters (SMTP, POP3, IMAP4) talk only to these interfaces, never to
a concrete backend, so a backend that passes the conformance suite in
``twistmail.testing`` serves every protocol unchanged.

Conventions shared by all storage methods:

* Folder names are ``str`` with ``/`` as the hierarchy separator; ``INBOX`` is
  case-insensitive and always exists.
* Flags are ``str``: the IMAP system flags (``\\Seen``, ``\\Answered``,
  ``\\Flagged``, ``\\Deleted``, ``\\Draft``) and keywords (atoms without a
  backslash).
* Anything that touches the disk returns a ``Deferred`` and does its blocking
  work off the reactor thread; methods documented as synchronous only read
  in-memory state.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface


class IStoredMessage(Interface):
    """One message in a folder snapshot.  Immutable: a flag change yields a new snapshot."""

    uid = Attribute("int: IMAP UID, strictly ascending within the folder and never reused")
    uniqueId = Attribute(
        "str: backend-wide stable id (POP3 UIDL); unlike uid it survives a UIDVALIDITY reset"
    )
    flags = Attribute("frozenset[str] of system flags and keywords")
    size = Attribute("int: exact size in octets of the bytes open() returns (RFC822.SIZE)")
    internalDate = Attribute("int: POSIX time (whole seconds) the message was received or appended")
    modseq = Attribute(
        "int: RFC 7162 mod-sequence of the message's last change (1 if the backend keeps none)")


class IMailbox(Interface):
    """An open folder: a UID-ordered snapshot plus the operations IMAP and POP3 need.

    RFC 3501 §2.3.1.1: UIDs are strictly ascending and never reused while
    ``uidValidity`` is unchanged; a backend that cannot keep that promise must
    change ``uidValidity``.
    """

    name = Attribute("str: folder name as the account lists it")
    uidValidity = Attribute("int: changes only when previously issued UIDs become invalid")
    uidNext = Attribute("int: the UID the next message added to the folder will get")
    maxKeywords = Attribute("int or None: how many distinct keywords the folder can hold")

    def messages() -> list:
        """The current snapshot: ``IStoredMessage`` providers sorted by uid (synchronous)."""

    def flagColumn() -> list:
        """Each message's flags (frozensets of str), in messages() order (synchronous;
        may be shared: do not modify it).

        Separate from messages() so a backend can answer without building the
        snapshot: SELECT's ``[UNSEEN n]`` and ``UID FETCH 1:* (FLAGS)`` of a
        100,000-message folder need only this column.  A backend with no cheaper
        way returns ``twistmail.storage.flagColumnOf(self.messages())``."""

    def uids():
        """The current uids, ascending (synchronous; a shared sequence: do not modify it).

        Cheaper than messages() for a large folder: IMAP sessions keep this as
        their sequence-number map.
        """

    def message(uid: int):
        """The ``IStoredMessage`` with this uid now, or None (synchronous)."""

    def keywords() -> list:
        """Keywords (flags without a backslash) in use or defined in this folder (synchronous)."""

    def refresh():
        """Pick up changes made by deliveries, other sessions and external writers.

        @return: Deferred firing with a L{FolderChanges} once the snapshot is current.
        """

    def openMessage(uid: int):
        """@return: Deferred firing with a readable binary file of the message's exact bytes.

        For streaming large messages; the caller closes the file.
        """

    def readMessages(uids):
        """@return: Deferred firing with the list of the messages' exact bytes, in C{uids} order.

        One trip to a worker thread for all of them, instead of two per message
        (open, then read): for messages whose C{size} the caller is willing to
        hold in memory, and for read-ahead.  Fails with L{NoSuchMessage} if any
        uid is unknown.
        """

    def setFlags(uids, flags, mode: str):
        """Change flags of the messages whose uid is in C{uids}.

        @param mode: ``"set"``, ``"add"`` or ``"remove"``.
        @return: Deferred firing with the updated ``IStoredMessage`` list.
        """

    def append(source, flags=(), internalDate: float | None = None):
        """Store a message durably (fsynced) in this folder.

        @param source: bytes, or a L{twistmail.delivery.spool.MessageSource}
            (an IMAP APPEND spooled to disk).
        @return: Deferred firing with the new message's uid.
        """

    def copyMessages(uids, target):
        """Copy messages, with their flags and internal dates, into C{target} (an IMailbox
        of the same backend), all or none (RFC 3501 §6.4.7).

        @return: Deferred firing with [(uid here, uid in target)] in C{uids} order.
        """

    def remove(uids):
        """Delete the given messages for good (POP3 QUIT, IMAP EXPUNGE).

        @return: Deferred firing with the list of uids actually removed.
        """

    def addListener(listener) -> None:
        """Call C{listener(changes)} on the reactor thread after each change to this folder.

        C{changes} is a L{FolderChanges}; for removals, give its C{expunged} (the
        messages as they were) where you can: IMAP sessions not yet told of an
        expunge answer FETCH for those messages from it (RFC 2180 §4.1.2).
        """

    def removeListener(listener) -> None:
        """Stop notifying C{listener}; unknown listeners are ignored."""


class IModSeqMailbox(IMailbox):
    """Optional: a folder that keeps RFC 7162 mod-sequences, for IMAP CONDSTORE and QRESYNC.

    Every change (a message added, its flags changed, it expunged) gets a
    mod-sequence above every one handed out before in this folder, by any
    session or process, and they survive restarts (RFC 7162 §3.1.1).  A folder
    without this interface is still served: SELECT answers ``OK [NOMODSEQ]``
    (RFC 7162 §3.1.2.2) and CONDSTORE commands are refused for it.
    """

    highestModSeq = Attribute("int: the highest mod-sequence of the folder (at least 1)")

    def changedSince(modseq: int) -> list:
        """UIDs of the messages whose C{modseq} is above C{modseq}, in any order
        (synchronous; cheap when few changed, whatever the folder's size)."""

    def vanishedSince(modseq: int):
        """UIDs expunged after C{modseq}, ascending, or None if the folder no longer
        remembers that far back (synchronous; RFC 7162 §3.2.5.2: the caller falls back
        to the UIDs the client knows)."""

    def setFlagsUnchangedSince(uids, flags, mode: str, modseq: int):
        """L{IMailbox.setFlags} for the messages whose modseq is at most C{modseq}, checked
        and changed atomically (RFC 7162 §3.1.3 UNCHANGEDSINCE).

        @return: Deferred firing with (the updated ``IStoredMessage`` list, the sorted
            uids left alone because their modseq was above C{modseq}).
        """


class IImportableMailbox(IMailbox):
    """Optional: a folder that can take messages with the POP3 unique ids they had elsewhere.

    ``twistmail migrate`` uses it, when the target backend offers it, so POP3
    clients that leave mail on the server do not fetch everything again.
    """

    def importMessages(messages):
        """Store messages durably, in order, like L{IMailbox.append}.

        @param messages: (source, flags, internalDate, uniqueId) tuples; a
            uniqueId the backend cannot store, or that the folder already
            has, is replaced by a new one.
        @return: Deferred firing with the new uids, in order.
        """


class IAccountStore(Interface):
    """Domains, users (argon2id hashes, quotas) and aliases (file or postgresql backend).

    Lookups are synchronous and read memory (they run on the reactor thread for every
    RCPT and AUTH); a backend that cannot vouch for its copy (its database unreachable)
    raises L{twistmail.errors.AccountsUnavailable}, which clients see as a temporary error.
    """

    domains = Attribute("set[str]: the local domains")
    users = Attribute("dict[str, dict]: address -> {'password': hash, 'quota': dict (optional)}")
    aliases = Attribute("dict[str, list[str]]: alias -> target addresses")

    def isLocalDomain(domain: str) -> bool:
        """Whether mail for C{domain} is ours."""

    def passwordHash(address: str):
        """The user's password hash, or None when there is no such user."""

    def route(address: str, delimiter: str = "+") -> list:
        """The accounts mail for C{address} goes to; NotLocal or UnknownUser otherwise."""

    def quota(address: str):
        """The user's own quota dict, or None (the configured default applies)."""

    def reload() -> None:
        """Read the accounts again now (blocking: the CLI, a worker thread)."""

    def maybeReload() -> None:
        """Bring the copy up to date if the backend says it changed (cheap, non-blocking);
        raise AccountsUnavailable when it cannot be vouched for."""

    def editing():
        """Context manager: lock, reload, let the caller edit, save; for the CLI."""

    def editor():
        """A fresh store of the same backend, for L{editing} in a worker thread."""

    def edited(editor) -> None:
        """C{editor} (from L{editor}) has just saved a change: show it from now on (the
        web admin's next page must not show the accounts as they were)."""


class IMailAccount(Interface):
    """One user's folders."""

    name = Attribute("str: canonical account address, e.g. alice@example.org")

    def listFolders():
        """@return: Deferred firing with a sorted list of folder names, INBOX included."""

    def createFolder(name: str):
        """Create C{name} and any missing parents.  Fails with L{FolderExists} / L{InvalidFolderName}."""

    def deleteFolder(name: str):
        """Delete C{name} and its messages.  INBOX cannot be deleted."""

    def renameFolder(old: str, new: str):
        """Rename C{old} (and its children) to C{new}.

        RFC 3501 §6.3.5: renaming INBOX moves its messages to C{new} and leaves
        INBOX empty.
        """

    def openFolder(name: str):
        """@return: Deferred firing with a refreshed L{IMailbox}; L{NoSuchFolder} if absent."""

    def subscriptions():
        """@return: Deferred firing with the sorted list of subscribed folder names."""

    def setSubscribed(name: str, subscribed: bool):
        """Subscribe or unsubscribe C{name}; persisted."""


class IMailStore(Interface):
    """A mail storage backend: the single seam between protocols and disk."""

    def account(name: str) -> IMailAccount:
        """The account C{name} (synchronous; folders are created lazily on disk)."""

    def deliver(account: str, folder: str, source, flags=()):
        """Deliver one message durably: fsynced file and directory before firing.

        @param source: a L{twistmail.delivery.spool.MessageSource} (prefix + body).
        @return: Deferred firing with the backend's unique id for the new message.
            Fails with L{StorageError} on a disk or permission error, leaving no
            partial message visible.
        """

    def removeAccount(name: str):
        """Delete every folder of C{name} (admin CLI ``user remove --purge``)."""


class IMailStoreFactory(IPlugin):
    """A storage backend offered as a Twisted plugin (``[storage] backend = name``).

    Provide it from a module in a ``twistmail/plugins/`` directory; see
    README.rst, "Writing a storage backend".
    """

    name = Attribute("str: the value of [storage] backend that selects this backend")
    description = Attribute("str: one line for ``twistmail check-config``")

    def makeStore(options: dict, dataDir: str) -> IMailStore:
        """Validate C{options} (from ``[storage.<name>]``) and build the store.

        No side effects (``twistmail check-config`` calls it too): create
        directories on first use, not here.  Raise L{twistmail.config.ConfigError}
        naming the key and the fix for bad options, so ``twistd`` fails at start.
        """


class IMXResolver(Interface):
    """DNS for outbound mail, off the reactor thread.

    Failures are L{twistmail.relay.mx.DNSFailure}: ``temporary`` for SERVFAIL
    and timeouts (retry later), permanent for NXDOMAIN (bounce now).
    """

    def lookupMX(domain: str):
        """@return: Deferred firing with the MX records as [(preference, exchange)], unsorted;
            ``[]`` when the domain exists but has no MX records (RFC 5321 §5.1 implicit MX).
            A null MX (RFC 7505) is returned as ``(0, "")``.
        """

    def lookupAddresses(host: str):
        """@return: Deferred firing with the IPv6 and IPv4 addresses of C{host} as strings,
            IPv6 first; ``[]`` if the name does not exist or has neither.
        """

    def lookupTXT(name: str):
        """@return: Deferred firing with the TXT records of C{name}, each record's strings
            joined into one str (``[]`` for NODATA); NXDOMAIN is a permanent DNSFailure.
        """


class IDeliveryTarget(Interface):
    """Where an accepted message goes: local mailboxes and/or the relay queue.

    The SMTP transaction hands every accepted message to one of these; a test
    hands it a recording target instead (L{twistmail.testing}).
    """

    def deliver(envelope, source):
        """Store the message durably for every recipient of C{envelope}.

        @param envelope: a L{twistmail.model.Envelope}; local recipients are
            filed into C{envelope.folder}.
        @param source: a L{twistmail.delivery.spool.MessageSource}.
        @return: Deferred firing once every copy is fsynced; fails with
            L{twistmail.errors.StorageError} (the client is told 451 and retries).
        """


class IMessageFilter(Interface):
    """One step of SMTP policy: called at each stage of a session, in configured order.

    Every hook returns a L{twistmail.model.Verdict}, None (the same as
    ``Verdict.accept()``) or a Deferred of either.  The first verdict other
    than accept ends the stage: later filters are not called for it.  A hook
    must not block the reactor: DNS, disk and CPU-heavy work (DKIM hashing of
    a large body) go to a thread or an asynchronous API.

    ``session`` is a L{twistmail.model.SessionInfo} snapshot: what is known
    about the connection and the transaction at that point.  Subclass
    L{twistmail.filters.base.Filter} to implement only the hooks you need.
    """

    name = Attribute("str: the name this filter is enabled under in [filters]")

    def connect(session):
        """A client connected (before the greeting)."""

    def helo(session):
        """HELO or EHLO; C{session.helo} holds the name given."""

    def mailFrom(session):
        """MAIL FROM; C{session.sender} holds the reverse-path (``""`` for ``<>``)."""

    def rcptTo(session, recipient: str):
        """One RCPT TO, after our own routing accepted it; C{session.recipients} holds
        the ones accepted before this one."""

    def endOfData(session, message):
        """The whole message has arrived and is on disk, not yet acknowledged.

        @param message: a L{twistmail.model.FilterMessage}: the parsed header
            section, and C{open()} for the full bytes as they would be stored,
            including the headers that filters before this one added.
        """


class IMessageFilterFactory(IPlugin):
    """A filter offered as a Twisted plugin, enabled by name in ``[filters]``.

    Provide it from a module in a ``twistmail/plugins/`` directory, like a
    storage backend; see README.rst, "Writing a filter".
    """

    name = Attribute("str: the name used in [filters] inbound / submission")
    description = Attribute("str: one line for ``twistmail check-config``")

    def makeFilter(options: dict, context):
        """Validate C{options} (the ``[filters.<name>]`` table, without the keys the
        pipeline itself reads: ``timeout`` and ``on_failure``) and build the filter.

        @param context: a L{twistmail.model.FilterContext}: host name, data
            directory, the shared DNS resolver, the reactor.
        @return: an L{IMessageFilter} provider.
        @raise twistmail.config.ConfigError: bad options, naming the key and the fix.
        """


class IRelayQueue(Interface):
    """Mail waiting for relay delivery (L{twistmail.relay.queue.RelayQueue} on disk,
    L{twistmail.relay.pgqueue.PostgresRelayQueue} shared by several nodes).

    Entries are L{twistmail.relay.queue.QueueEntry}.  Every method returns a
    Deferred and does its work off the reactor thread; a missing entry fails with
    L{twistmail.relay.queue.QueueError}, anything else with StorageError (SMTP 451).
    """

    path = Attribute("str: <data_dir>/queue, where this node's control requests live")

    def addListener(listener) -> None:
        """Call C{listener(entry)} after each message this object enqueued is durable."""

    def watch(found) -> None:
        """Call C{found([(id, next attempt, lane)])} for messages other nodes queued or
        gave up (a shared queue polls); a queue of one node never calls it."""

    def enqueue(sender: str, recipients, chunks, *, origin: str, id=None, client: str = "",
                helo: str = "", extra=None):
        """Store a message durably; fires with its QueueEntry (C{chunks()} runs in a worker)."""

    def load(id: str):
        """The QueueEntry of C{id}."""

    def loadWithMessage(id: str):
        """(entry, open message file) for a delivery attempt: in a shared queue this claims
        the message for this node (QueueError if another node holds it) until L{save},
        L{remove} or L{release}."""

    def save(entry):
        """Record the entry's new state (and end this node's claim)."""

    def recordSent(id: str, sent):
        """Recipients of the message this node holds were delivered, [(address, reply,
        remote host)], before the attempt ends: a shared queue writes it at once (a node
        that takes over never sends to them again); the disk queue waits for L{save}."""

    def release(id: str):
        """End this node's claim without a change (nothing was due)."""

    def remove(id: str):
        """Remove the message: delivered, bounced or deleted by the admin."""

    def headers(id: str):
        """The message's header section (bytes, at most 64 KiB)."""

    def message(id: str):
        """The whole message as bytes (only for small ones: RET=FULL reports)."""

    def openMessage(id: str):
        """A new binary file object of the message, positioned at its start."""

    def source(id: str):
        """The message as a MessageSource (C{chunks()}, read in a worker thread)."""

    def run(f, *args):
        """C{f(*args)} off the reactor thread."""

    def scan():
        """Fires with [(id, next attempt, lane)] of every message with work left."""

    def entries():
        """Fires with every QueueEntry, oldest first (``queue list``, the web admin)."""
