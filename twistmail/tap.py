# -*- test-case-name: tests.test_tap -*-
"""``twistd twistmail``: command-line options and makeService, the composition root.

Options only parse; makeService builds every object and hands each its
collaborators, so nothing below here reaches for globals.
"""

from __future__ import annotations

import fcntl
import os

from twisted.application import internet, service
from twisted.cred.portal import Portal
from twisted.internet import endpoints, threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from twistmail import _pluginload
from twistmail import config as configmod
from twistmail.auth.accounts import Accounts
from twistmail.auth.checkers import PasswordChecker
from twistmail.auth.passwords import releaseHashMemory
from twistmail.auth.realm import MailRealm
from twistmail.delivery.local import LocalDelivery
from twistmail.interfaces import IMailAccount, IMailStoreFactory
from twistmail.protocols.imap.server import IMAPFactory
from twistmail.protocols.limits import ConnectionLimiter
from twistmail.protocols.pop3 import POP3ServerFactory
from twistmail.protocols.smtp import SMTPFactory

log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("twistmail: SMTP, POP3 and IMAP4 mail server. Without --config it runs "
                "on an embedded default: ./twistmail-data, SMTP on 127.0.0.1:2525, POP3 on "
                "127.0.0.1:2110, IMAP on 127.0.0.1:2143. Listener options take Twisted endpoint strings and may be "
                "repeated; any given on the command line replace the config file's for that protocol.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/twistmail.toml)"],
        ["data-dir", "d", None, "data directory (overrides [server] data_dir)"],
        ["hostname", None, None, "host name for banners and Received: headers"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.listeners: dict[str, list[str]] = {p: [] for p in configmod.ALL_PROTOCOLS}

    def _listener(protocol: str):  # noqa: N805 - builds opt_ methods below
        def opt(self, endpoint: str) -> None:
            self.listeners[protocol].append(endpoint)
        opt.__doc__ = f"{protocol} listener, a Twisted endpoint string, e.g. tcp:{configmod.DEFAULT_PORTS[protocol]}:interface=127.0.0.1 (repeatable)"
        return opt

    opt_smtp = _listener("smtp")
    opt_pop3 = _listener("pop3")
    opt_imap = _listener("imap")
    opt_submission = _listener("submission")
    del _listener

    def postOptions(self) -> None:
        overrides: dict = {"server": {}, "listen": {}}
        if self["data-dir"]:
            overrides["server"]["data_dir"] = self["data-dir"]
        if self["hostname"]:
            overrides["server"]["hostname"] = self["hostname"]
        for protocol, endpoints_ in self.listeners.items():
            if endpoints_:
                overrides["listen"][protocol] = endpoints_
        try:
            self.config = configmod.load(self["config"], overrides)
        except configmod.ConfigError as e:
            raise usage.UsageError(str(e)) from None


class _DataDirLock(service.Service):
    """Refuse to run two servers on one data directory (they would race on uidlists)."""

    def __init__(self, dataDir: str) -> None:
        self.path = os.path.join(dataDir, "twistmail.lock")
        self._file = None

    def privilegedStartService(self) -> None:
        self._file = open(self.path, "a")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{self.path} is locked: another twistmail server uses this "
                             "data directory; stop it or choose another --data-dir") from None
        super().privilegedStartService()

    def stopService(self) -> None:
        if self._file is not None:
            self._file.close()
        return super().stopService()


class _ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class _Listener(internet.StreamServerEndpointService):
    """A listener whose bind failure stops twistd with one line saying what to do."""

    _raiseSynchronously = True

    def __init__(self, protocol: str, description: str, endpoint, factory) -> None:
        super().__init__(endpoint, factory)
        self.protocol = protocol
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            raise SystemExit(
                f"twistmail: cannot listen for {self.protocol} on {e.interface or '*'}:{e.port} "
                f"({self.description}): {reason}. "
                f"Fix: stop the program using that address, or change [listen] {self.protocol} "
                f"(or --{self.protocol})") from None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        log.info("twistmail {protocol} listening on {endpoint}", protocol=self.protocol,
                 endpoint=self.description)
        return port


def makeStore(config: configmod.Config):
    """The store of the backend plugin named by ``[storage] backend``, with its options.

    @raise configmod.ConfigError: unknown backend, broken plugin or bad options.
    """
    name = config["storage"]["backend"]
    try:
        factory = _pluginload.find(IMailStoreFactory, name, "[storage] backend", "backend")
        return factory.makeStore(config.storageOptions(), config.dataDir)
    except configmod.ConfigError as e:
        raise configmod.ConfigError(f"{config.path}: {e}") from None


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    config = options.config
    dataDir = config.dataDir
    os.makedirs(dataDir, mode=0o700, exist_ok=True)
    top = service.MultiService()
    _DataDirLock(dataDir).setServiceParent(top)

    try:
        store = makeStore(config)
    except configmod.ConfigError as e:
        raise usage.UsageError(str(e)) from None
    accounts = Accounts(dataDir, reloadInterval=config["accounts"]["reload_interval"])
    limiter = ConnectionLimiter(config["server"]["max_connections"],
                                config["server"]["max_connections_per_ip"])
    realm = MailRealm(store)
    releaseHashMemory()
    # Password hashing gets its own two threads: a login storm must not take the
    # whole reactor pool (the disk's) nor hash on ten threads at once.
    kdfPool = ThreadPool(minthreads=0, maxthreads=2, name="twistmail-kdf")
    _ThreadPoolService(kdfPool).setServiceParent(top)
    portal = Portal(realm, [PasswordChecker(
        accounts, lambda f, *args: threads.deferToThreadPool(reactor, kdfPool, f, *args))])

    factories = {
        "smtp": SMTPFactory(config["smtp"], config.hostname, accounts, LocalDelivery(store),
                            os.path.join(dataDir, "spool"), limiter),
    }
    pop3Factory = POP3ServerFactory(config["pop3"], portal, limiter)
    realm.register(pop3.IMailbox, pop3Factory.avatar)
    factories["pop3"] = pop3Factory
    imapFactory = IMAPFactory(config["imap"], portal, os.path.join(dataDir, "spool"), limiter)
    realm.register(IMailAccount, imapFactory.avatar)
    factories["imap"] = imapFactory

    for protocol, factory in factories.items():
        for description in config.listeners(protocol):
            try:
                endpoint = endpoints.serverFromString(reactor, description)
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(
                    f"{config.path}: [listen] {protocol}: bad endpoint {description!r} ({e}). "
                    f"Fix: use e.g. tcp:{configmod.DEFAULT_PORTS[protocol]}:interface=127.0.0.1") from None
            listener = _Listener(protocol, description, endpoint, factory)
            listener.setName(f"{protocol} {description}")
            listener.setServiceParent(top)
    return top
