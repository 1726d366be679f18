# -*- test-case-name: tests.test_tap -*-
"""``twistd twistmail``: command-line options and makeService, the composition root.

Options only parse; makeService builds every object and hands each its
collaborators, so nothing below here reaches for globals.
"""

from __future__ import annotations

import fcntl
import gc
import os
import random
import signal

from twisted.application import internet, service
from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints, threads
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from twistmail import __version__, _gcpause, _pluginload, autocert, ownership, reuseport
from twistmail import config as configmod
from twistmail.acmechallenges import ALPNCertificates, ChallengeTokens
from twistmail.auth.accounts import AccountError
from twistmail.auth.backends import openAccounts
from twistmail.auth.checkers import PasswordChecker
from twistmail.auth.passwords import releaseHashMemory
from twistmail.auth.realm import MailRealm
from twistmail.auth.throttle import AuthThrottle
from twistmail.cli import queue as queuecli
from twistmail.delivery.local import LocalDelivery
from twistmail.delivery.pipeline import DeliveryPipeline
from twistmail.delivery.quota import QuotaTracker
from twistmail.delivery.routing import RelayPolicy, Router
from twistmail.dkimkeys import KeyRing
from twistmail.dkimsigner import Signer
from twistmail.filters.load import makeFilters as loadFilters
from twistmail.interfaces import IAccountStore, IMailAccount, IMailStoreFactory, IRelayQueue
from twistmail.metrics import Metrics
from twistmail.model import FilterContext
from twistmail.protocols import proxyheader
from twistmail.protocols.imap.server import IMAPFactory
from twistmail.protocols.limits import ConnectionLimiter
from twistmail.protocols.pop3 import POP3ServerFactory
from twistmail.protocols.security import Security
from twistmail.protocols.smtp import SMTPFactory
from twistmail.ratelimit import Limits, RateLimitPublisher, SendLimits
from twistmail.relay.mx import (
    DestinationCache,
    DnsPythonMXResolver,
    applyPolicy,
    resolveHops,
    resolveSmarthost,
)
from twistmail.relay.pickup import ControlPoller
from twistmail.relay.queue import RelayQueue
from twistmail.relay.runner import QueueRunner, RunnerSettings
from twistmail.relay.sender import RelaySender, SenderSettings, trustRootFromFile
from twistmail.relay.stspolicy import PolicyFetcher, PolicySource
from twistmail.relay.tlsrpt import TLSReports
from twistmail.relay.tlsrptservice import ReportMailer, TLSReportService
from twistmail.tls import ServerTLS, TLSConfigError
from twistmail.traffic import TrafficHistory
from twistmail.web import admin, autoconfig, metricsite
from twistmail.web.site import Site, WebFactory, buildRoot

log = Logger()

#: Connections at once to the metrics listener: a scraper or two, kept apart from the
#: mail limits so that a connection flood cannot hide itself from monitoring.
METRICS_CONNECTIONS = 16


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("twistmail: SMTP, submission, POP3 and IMAP4 mail server. Without --config it "
                "runs on an embedded default: ./twistmail-data and loopback listeners: SMTP "
                "2525, submission 2587 (STARTTLS) and 2465 (TLS), POP3 2110 and 2995 (TLS), "
                "IMAP 2143 and 2993 (TLS), with a self-signed certificate. Listener options "
                "take Twisted endpoint strings and may be repeated; any given on the command "
                "line replace the config file's for that protocol, and 'none' turns it off. "
                "Without --config, listeners given on the command line are the only ones: "
                "the embedded default's other ports are not bound. Prefix an endpoint with "
                "'haproxy:' behind a load balancer that sends the PROXY protocol.")
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
        opt.__doc__ = (f"{protocol} listener, a Twisted endpoint string, e.g. "
                       f"tcp:{configmod.DEFAULT_PORTS[protocol]}:interface=127.0.0.1 "
                       "(repeatable); none turns it off")
        return opt

    opt_smtp = _listener("smtp")
    opt_submission = _listener("submission")
    opt_submissions = _listener("submissions")
    opt_pop3 = _listener("pop3")
    opt_pop3s = _listener("pop3s")
    opt_imap = _listener("imap")
    opt_imaps = _listener("imaps")
    del _listener

    def postOptions(self) -> None:
        overrides: dict = {"server": {}, "listen": {}}
        if self["data-dir"]:
            overrides["server"]["data_dir"] = self["data-dir"]
        if self["hostname"]:
            overrides["server"]["hostname"] = self["hostname"]
        named = any(e != "none" for given in self.listeners.values() for e in given)
        for protocol, endpoints_ in self.listeners.items():
            if endpoints_:
                overrides["listen"][protocol] = endpoints_
            elif named and not self["config"]:
                # `--smtp tcp:2525` alone means just that: the embedded default's other
                # ports stay unbound.  A config file's listeners are deliberate and stay.
                overrides["listen"][protocol] = []
        try:
            self.config = configmod.load(self["config"], overrides)
        except configmod.ConfigError as e:
            raise usage.UsageError(str(e)) from None


def startupError(message: str) -> SystemExit:
    """A problem found while building the service: twistd prints a SystemExit's message
    as one line, but a traceback for anything else raised from makeService."""
    return SystemExit(f"twistmail: {message}")


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


class _DataDirOwner(service.Service):
    """The data directory belongs to the user twistd runs the server as (twistmail.ownership)."""

    def __init__(self, dataDir: str, uid: int | None, gid: int | None) -> None:
        self.dataDir = dataDir
        self.uid, self.gid = uid, gid

    def privilegedStartService(self) -> None:
        # Still root here: twistd drops to --uid/--gid after every privilegedStartService.
        if self.uid is not None and os.geteuid() == 0:
            changed = ownership.adopt(self.dataDir, self.uid, self.gid)
            log.info("data directory {path} belongs to {owner} (twistd --uid/--gid): "
                     "{changed} entries given to it", path=self.dataDir,
                     owner=ownership.describeUser(self.uid, self.gid), changed=changed)
        super().privilegedStartService()

    def startService(self) -> None:
        problem = ownership.checkWritable(self.dataDir)
        if problem is not None:
            raise startupError(problem)
        super().startService()


class _ReloadOnHangup(service.Service):
    """SIGHUP reloads the TLS certificate (connections already up keep theirs)."""

    def __init__(self, tls: ServerTLS) -> None:
        self.tls = tls
        self._previous = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        try:
            self._previous = signal.signal(
                signal.SIGHUP, lambda signum, frame: reactor.callFromThread(self.tls.reload))
        except ValueError:
            self._previous = None  # not the main thread (tests run the reactor in another)

    def stopService(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()


class _ServerGC(service.Service):
    """The collector's thresholds for a server while it runs (L{_gcpause.SERVER_YOUNG})."""

    _before: tuple[int, ...] | None = None

    def startService(self) -> None:
        super().startService()
        self._before = _gcpause.raiseForServer()

    def stopService(self):
        if self._before is not None:
            gc.set_threshold(*self._before)
            self._before = None
        return super().stopService()


class _StopOnce(service.Service):
    """A second SIGTERM or SIGINT while stopping is noted, not a critical traceback.

    The reactor answers each of them with C{reactor.stop()}, and a second call
    raises ReactorNotRunning, logged as an unhandled error (twisted/twisted#2265):
    an operator pressing Ctrl-C twice, or systemd's stop followed by a kill, got
    a traceback.  So, once the reactor has installed its handlers, each is
    wrapped to pass on only the first signal (twistd's exit status still names
    it).  Only handlers the reactor installed, and only from the main thread.
    They stay wrapped after stopService: that runs while the reactor stops, when
    a second signal is most likely."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._wrap)

    def stopService(self):
        self._stopping = True  # however the stop began (reactor.stop() from code, too)
        return super().stopService()

    def _wrap(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            handler = signal.getsignal(signum)
            if getattr(handler, "__self__", None) is not self._reactor:
                continue  # not the reactor's (a test's reactor, a debugger's SIGINT)
            try:
                signal.signal(signum, lambda n, frame, handler=handler: self._once(handler, n, frame))
            except ValueError:
                return  # not the main thread

    def _once(self, handler, signum: int, frame) -> None:
        if self._stopping:
            log.info("Received {signal} while already stopping; ignored",
                     signal=signal.Signals(signum).name)
            return
        self._stopping = True
        handler(signum, frame)


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


class _ThreadPoolService(service.Service):
    """A thread pool of its own, so slow work (DNS, password hashing) cannot starve the
    disk work in the reactor's."""

    def __init__(self, name: str, maxThreads: int) -> None:
        self.pool = ThreadPool(0, maxThreads, name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        return threads.deferToThread(self.pool.stop)  # joins; a lookup ends within dns_timeout


def _trustRoot(config: configmod.Config, key: str):
    """The CAs of the PEM file ``[relay] <key>`` names ('' = the system's); a start-up
    error naming the key if it cannot be used."""
    try:
        return trustRootFromFile(config["relay"][key])
    except (OSError, ValueError) as e:
        raise startupError(f"{config.path}: [relay] {key}: {e}. Fix: give a PEM file of CA "
                           "certificates") from None


def makeResolver(config: configmod.Config, run, metrics: Metrics | None = None
                 ) -> DnsPythonMXResolver:
    """The one DNS configuration (``[relay] nameservers``, ``dns_timeout``) that the relay
    and the filters share; C{run(f, *args)} runs its lookups off the reactor thread."""
    relay = config["relay"]
    return DnsPythonMXResolver([configmod.hostPort(ns, 53) for ns in relay["nameservers"]],
                               relay["dns_timeout"], run, metrics)


def makeDNS(config: configmod.Config, reactor, parent: service.MultiService,
            metrics: Metrics | None = None) -> DnsPythonMXResolver:
    """The shared resolver, with a thread pool of its own for its lookups."""
    pool = _ThreadPoolService("twistmail-dns", 10)
    pool.setServiceParent(parent)
    return makeResolver(config, lambda f, *args: threads.deferToThreadPool(reactor, pool.pool, f,
                                                                           *args), metrics)


def makeFilters(config: configmod.Config, reactor, resolver) -> dict:
    """{role: configured filters} with the shared resolver in their context.

    @raise configmod.ConfigError: see L{twistmail.filters.load.makeFilters}.
    """
    context = FilterContext(config.hostname, config.dataDir, resolver, reactor, config)
    try:
        return loadFilters(config, context)
    except configmod.ConfigError as e:
        raise configmod.ConfigError(f"{config.path}: {e}") from None


def makeRelay(config: configmod.Config, reactor, queue: RelayQueue, router: Router,
              local: LocalDelivery, parent: service.MultiService,
              metrics: Metrics | None = None, resolver: DnsPythonMXResolver | None = None
              ) -> QueueRunner:
    """The outbound side: the SMTP client, the queue runner and the CLI's control channel.

    @param resolver: the shared one (L{makeDNS}); made here if not given."""
    metrics = metrics or Metrics()
    relay = config["relay"]
    if resolver is None:
        resolver = makeDNS(config, reactor, parent, metrics)
    reports = TLSReports(config.hostname, reactor.seconds)  # RFC 8460, for MX deliveries
    common = {"heloName": config.hostname, "connectTimeout": relay["connect_timeout"],
              "commandTimeout": relay["command_timeout"],
              "connectionReuse": relay["connection_reuse"],
              "cacheTime": relay["connection_cache_time"],
              "maxPerConnection": relay["max_messages_per_connection"]}
    if relay["smarthost"]:
        host, port = configmod.hostPort(relay["smarthost"], 25)
        trustRoot = _trustRoot(config, "smarthost_ca_file")
        sender = RelaySender(reactor, SenderSettings(
            port=port, tls=relay["smarthost_tls"], username=relay["smarthost_username"],
            password=relay["smarthost_password"], trustRoot=trustRoot, **common),
            metrics=metrics)

        def destination(domain: str):
            return resolveSmarthost(resolver, host)
    else:
        rng = random.SystemRandom()
        # The CAs MTA-STS trusts: for mta-sts.<domain> and for MX hosts under a policy.
        stsTrust = _trustRoot(config, "mta_sts_ca_file")
        sender = RelaySender(reactor, SenderSettings(port=relay["smtp_port"], trustRoot=stsTrust,
                                                     **common), tlsReport=reports,
                             metrics=metrics)
        policies = PolicySource(
            resolver, PolicyFetcher(reactor, resolver, relay["mta_sts_port"], stsTrust,
                                    relay["mta_sts_timeout"]),
            os.path.join(config.dataDir, "mta-sts"), threads.deferToThread) \
            if relay["mta_sts"] else None

        @defer.inlineCallbacks
        def destination(domain: str):
            hops = yield resolveHops(resolver, domain, rng)
            if policies is None:
                return hops
            # RFC 8461 §5: only MX hosts the policy lists, each with the policy attached.
            return applyPolicy(hops, (yield policies.policyFor(domain)), domain)

    destination = DestinationCache(destination, reactor.seconds, random.SystemRandom())
    # Bounces and TLS reports are DKIM-signed like submitted mail (twistmail dkim).
    sign = Signer(KeyRing(config.dataDir)).signLater
    runner = QueueRunner(queue, router, local, destination, sender,
                         RunnerSettings.fromConfig(config.hostname, relay), reactor, metrics,
                         sign=sign)
    metrics.watch(runner=runner)
    reactor.addSystemEventTrigger("before", "shutdown", sender.closeIdle)  # QUIT parked ones
    runner.setServiceParent(parent)
    ControlPoller(runner, queue.path, relay["pickup_interval"]).setServiceParent(parent)
    directory = os.path.join(config.dataDir, "tlsrpt")
    mailer = ReportMailer(directory, config.hostname, resolver, queue,
                          maxPerDay=relay["tlsrpt_max_mails_per_day"],
                          sign=sign) if relay["tlsrpt_mail"] else None
    TLSReportService(reports, directory, clock=reactor, mailer=mailer).setServiceParent(parent)
    return runner


def knownDomains(accounts: IAccountStore) -> set[str]:
    """The local domains; L{AccountsUnavailable} while a postgresql store has not read
    them yet (at start), rather than an empty set a certificate would be ordered for."""
    accounts.maybeReload()
    return accounts.domains


def makeAcme(config: configmod.Config, reactor, tls: ServerTLS, accounts: IAccountStore,
             parent: service.MultiService) -> ChallengeTokens | None:
    """``[tls] acme``: the certificate kept current from the CA; returns the HTTP-01
    tokens the web listeners answer (None with TLS-ALPN-01, which ServerTLS answers)."""
    from twistmail.acmeissuer import AcmeIssuer

    section = config["tls"]
    directory = os.path.join(config.dataDir, "acme")
    pair = autocert.startingPair(directory, tls.certPath, tls.keyPath)
    if pair != (tls.certPath, tls.keyPath):
        tls.use(*pair)
    if autocert.challengeType(config) == "http-01":
        responder = tokens = ChallengeTokens()
    else:
        responder, tokens = ALPNCertificates(), None
        tls.answerALPN(responder.select)
    issuer = AcmeIssuer(section["acme_directory"], section["acme_email"], section["acme_ca_file"],
                        directory, responder, userAgent=f"twistmail/{__version__}")
    autocert.CertificateKeeper(
        tls, lambda names: autocert.inDaemonThread(reactor, issuer.issue, names),
        lambda: autocert.namesFromConfig(config, knownDomains(accounts)), directory,
        autocert.Schedule.fromConfig(section), reactor).setServiceParent(parent)
    return tokens


def makeQueue(config: configmod.Config, store, parent: service.MultiService) -> IRelayQueue:
    """The relay queue ``[relay] queue`` names; a postgresql one shares the store's
    database pool when the store is in PostgreSQL too, else opens its own from
    ``[storage.postgresql]``."""
    relay = config["relay"]
    if relay["queue"] == "disk":
        return RelayQueue(config.dataDir)
    from twistmail.relay.pgqueue import PostgresRelayQueue, configuredStore
    from twistmail.storage.postgresql import PostgresStore

    if not isinstance(store, PostgresStore):
        store = configuredStore(config)
        store.setServiceParent(parent)
    queue = PostgresRelayQueue(store, config.dataDir, relay["queue_lease_time"],
                               relay["pickup_interval"])
    queue.setServiceParent(parent)
    return queue


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
    _DataDirOwner(dataDir, *ownership.serviceIds(options)).setServiceParent(top)
    _StopOnce(reactor).setServiceParent(top)
    _ServerGC().setServiceParent(top)

    try:
        store = makeStore(config)
    except configmod.ConfigError as e:
        raise startupError(str(e)) from None
    if service.IService.providedBy(store):  # a backend with connections to close (postgresql)
        store.setServiceParent(top)
    try:
        accounts = openAccounts(config, follow=True)
    except AccountError as e:
        raise startupError(str(e)) from None
    if service.IService.providedBy(accounts):  # postgresql: follows the tables in a thread
        accounts.setServiceParent(top)
    metrics = Metrics()  # counted whether or not [listen] metrics serves them
    limiter = ConnectionLimiter(config["server"]["max_connections"],
                                config["server"]["max_connections_per_ip"], metrics)
    metrics.watch(limiter=limiter)
    realm = MailRealm(store)
    releaseHashMemory()
    # Password hashing gets its own two threads: a login storm must not take the
    # whole reactor pool (the disk's) nor hash on ten threads at once.
    kdf = _ThreadPoolService("twistmail-kdf", 2)
    kdf.setServiceParent(top)
    auth = config["auth"]
    throttle = AuthThrottle(auth["failure_delay"], auth["max_delay"], auth["max_failures"],
                            auth["failure_window"], auth["block_time"], metrics=metrics)
    def onKdfPool(f, *args):
        return threads.deferToThreadPool(reactor, kdf.pool, f, *args)

    checker = PasswordChecker(accounts, onKdfPool, throttle, reactor, metrics)
    portal = Portal(realm, [checker])
    try:
        tls = ServerTLS.fromConfig(config["tls"], config.hostname, dataDir)
    except TLSConfigError as e:
        raise startupError(f"{config.path}: [tls]: {e}") from None
    _ReloadOnHangup(tls).setServiceParent(top)
    challenges = makeAcme(config, reactor, tls, accounts, top) if config["tls"]["acme"] else None
    served = metrics.countHandshakes(tls)  # every listener's TLS and STARTTLS
    security = Security(served, auth["plaintext_networks"])

    router = Router(accounts, RelayPolicy(config["relay"]["trusted_networks"]),
                    config["smtp"]["recipient_delimiter"])
    quota = QuotaTracker.fromConfig(config, store, accounts)
    local = LocalDelivery(store, quota)
    try:
        queue = makeQueue(config, store, top)
    except configmod.ConfigError as e:
        raise startupError(str(e)) from None
    resolver = makeDNS(config, reactor, top, metrics)
    runner = makeRelay(config, reactor, queue, router, local, top, metrics, resolver)
    try:
        filters = makeFilters(config, reactor, resolver)
    except configmod.ConfigError as e:
        raise startupError(str(e)) from None
    for role, enabled in filters.items():
        if enabled:
            log.info("twistmail {role} filters: {names}", role=role,
                     names=", ".join(f.name for f in enabled))
    spool = os.path.join(dataDir, "spool")
    pipeline = DeliveryPipeline(local, queue, runner.reports)
    submission = config["submission"]
    sendLimits = SendLimits(Limits.fromConfig(submission, "user"),
                            Limits.fromConfig(submission, "domain"))
    # Before the listeners: it reads the last run's counts at start, writes them at stop.
    RateLimitPublisher(sendLimits, dataDir, reactor, threads.deferToThread).setServiceParent(top)
    factories = {
        "smtp": SMTPFactory(config["smtp"], config.hostname, router, pipeline, spool, limiter,
                            security, portal, sendLimits=sendLimits, metrics=metrics,
                            filters=filters["inbound"], clock=reactor,
                            showClient=submission["received_client_address"], quota=quota),
        "submission": SMTPFactory(config["smtp"], config.hostname, router, pipeline, spool,
                                  limiter, security, portal, submission=True,
                                  checkSender=submission["require_own_sender"],
                                  sendLimits=sendLimits, metrics=metrics,
                                  filters=filters["submission"], clock=reactor,
                                  showClient=submission["received_client_address"], quota=quota),
    }
    pop3Factory = POP3ServerFactory(config["pop3"], portal, limiter, security)
    realm.register(pop3.IMailbox, pop3Factory.avatar)
    factories["pop3"] = pop3Factory
    imapFactory = IMAPFactory(config["imap"], portal, spool, limiter, security=security,
                              quota=quota)
    realm.register(IMailAccount, imapFactory.avatar)
    factories["imap"] = imapFactory
    webAdmin = None
    if config["admin"]["enabled"]:
        traffic = TrafficHistory(metrics, dataDir, reactor, threads.deferToThread)
        traffic.setServiceParent(top)
        webAdmin = admin.AdminResource(
            dataDir, accounts, checker,
            config["admin"]["admins"], admin.Sessions(config["admin"]["session_idle"]),
            onKdfPool, traffic, queuecli.openQueue(config))
    factories["http"] = WebFactory(Site(buildRoot(config["mta_sts"], accounts.isLocalDomain,
                                                  autoconfig.fromConfig(config), challenges,
                                                  webAdmin)),
                                   limiter, reactor)
    factories["metrics"] = WebFactory(
        Site(metricsite.buildRoot(metrics)),
        ConnectionLimiter(METRICS_CONNECTIONS, METRICS_CONNECTIONS, metrics), reactor)
    for implicit, plain in {**configmod.IMPLICIT_TLS, "https": "http"}.items():
        # RFC 8314: the same service, with TLS from the first byte.
        factories[implicit] = TLSMemoryBIOFactory(served, False, factories[plain])

    for protocol, factory in factories.items():
        for description in config.listeners(protocol):
            marked, bare = proxyheader.splitMarked(description)
            endpoint = endpoints.serverFromString(reactor, bare)  # checked by config
            if config["server"]["reuse_port"]:
                endpoint = reuseport.sharing(reactor, endpoint)
            if marked:
                # Not Twisted's own haproxy: endpoint: it would build the protocol (limits,
                # greeting) for the balancer's address before the header names the client.
                factory_ = proxyheader.ProxyHeaderFactory(
                    factory, config["server"]["proxy_networks"], reactor)
            else:
                factory_ = factory
            listener = _Listener(protocol, description, endpoint,
                                 metrics.countConnections(protocol, factory_))
            listener.setName(f"{protocol} {description}")
            listener.setServiceParent(top)
    return top
