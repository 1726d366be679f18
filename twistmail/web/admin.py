# -*- test-case-name: tests.test_webadmin -*-
"""The web admin under /admin/: log in, manage domains, users and aliases, change one's password.

Every change goes through the CLI's own code (L{IAccountStore.editing} and its
methods, L{hashPassword}), so the web gets the same validation and the same
error texts as ``twistmail domain|user|alias``; a fresh store of the same backend
(L{IAccountStore.editor}) edits the file or the tables in a thread, and the
server's own copy notices the change as it notices the CLI's.

Hostile clients: pages need a server-side session (256-bit random id in an
``HttpOnly; SameSite=Strict`` cookie, ``Secure`` over https, forgotten after
``[admin] session_idle`` seconds idle); every POST carries the session's CSRF
token (the login form a double-submit cookie's); passwords are checked by the
mail logins' L{PasswordChecker}, so the auth throttle's delays and blocks
apply; only https, or plain http from loopback (a TLS-terminating proxy on
the same host), is served; the site's header and body limits apply.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from markupsafe import Markup
from twisted.cred import credentials, error
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server

from twistmail import dkimkeys
from twistmail._logtext import loggable
from twistmail._netaddr import isLoopback
from twistmail.auth.accounts import AccountBook, AccountError, describeQuota, parseQuota
from twistmail.auth.checkers import fromClient
from twistmail.auth.passwords import hashPassword
from twistmail.cli import dkim as dkimcli
from twistmail.cli import queue as queuecli
from twistmail.errors import AccountsUnavailable
from twistmail.interfaces import IRelayQueue
from twistmail.relay.queue import QueueError
from twistmail.traffic import TrafficHistory
from twistmail.web.admintemplates import ENVIRONMENT
from twistmail.web.chart import svgChart

log = Logger()

COOKIE = b"twistmail_admin"
LOGIN_COOKIE = b"twistmail_login"
#: Logged-in sessions kept at most; the least recently used is forgotten first.
MAX_SESSIONS = 1000
#: Longest password the forms take (argon2 hashes any length; the body limit bounds it too).
MAX_PASSWORD = 1024

#: What the dashboard's charts draw, from L{twistmail.traffic}: (series, legend, colour).
MESSAGE_SERIES = (("accepted", "accepted by SMTP", "#1f77b4"),
                  ("delivered", "relayed (recipients)", "#2ca02c"),
                  ("rejected", "SMTP 4xx/5xx replies", "#d62728"),
                  ("bounced", "bounced (recipients)", "#9467bd"))
QUEUE_SERIES = (("queue", "messages queued", "#ff7f0e"),)

#: What a form may be refused for, with the message shown on the page.
_REFUSALS = (AccountError, QueueError, dkimkeys.DKIMKeyError)

_HEADERS = {
    b"Content-Type": b"text/html; charset=utf-8",
    b"Cache-Control": b"no-store",
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    # No script at all; forms post only to us; never framed.
    b"Content-Security-Policy": b"default-src 'none'; style-src 'unsafe-inline'; "
                                b"form-action 'self'; frame-ancestors 'none'",
}


@dataclass
class Session:
    address: str
    admin: bool
    lastSeen: float
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    #: A change is under way (one at a time: each may cost a password hash).
    busy: bool = False


class Sessions:
    """Server-side sessions by random id, bounded, forgotten when idle."""

    def __init__(self, idle: float, clock: Callable[[], float] = time.monotonic,
                 limit: int = MAX_SESSIONS) -> None:
        self.idle = idle
        self._clock = clock
        self._limit = limit
        self._table: OrderedDict[str, Session] = OrderedDict()

    def create(self, address: str, admin: bool) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)  # 256 random bits
        session = self._table[sid] = Session(address, admin, self._clock())
        while len(self._table) > self._limit:
            self._table.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        session = self._table.get(sid) if sid else None
        if session is None:
            return None
        now = self._clock()
        if now - session.lastSeen > self.idle:
            del self._table[sid]
            return None
        session.lastSeen = now
        self._table.move_to_end(sid)
        return session

    def end(self, sid: str | None) -> None:
        self._table.pop(sid or "", None)


def _allowed(request) -> bool:
    """https, or http from loopback (a proxy on this host that terminates TLS)."""
    if request.isSecure():
        return True
    return isLoopback(getattr(request.getClientAddress(), "host", "") or "")


def _field(request, name: str, strip: bool = True) -> str:
    """A form field as text; missing is ''; a field sent twice or not UTF-8 is refused."""
    values = request.args.get(name.encode(), [])
    if len(values) > 1:
        raise AccountError(f"the form field {name} was sent more than once")
    try:
        text = values[0].decode("utf-8") if values else ""
    except UnicodeDecodeError:
        raise AccountError(f"the form field {name} is not UTF-8") from None
    return text.strip() if strip else text


def _password(request) -> str:
    """Taken as typed: spaces at either end are part of it (the CLI keeps them too)."""
    password = _field(request, "password", strip=False)
    if not password:
        raise AccountError("empty password; type one")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"a password of at most {MAX_PASSWORD} characters, please")
    return password


def _tokenMatches(request, expected: bytes) -> bool:
    """The form's one C{csrf} field equals C{expected} (constant time; empty never matches)."""
    sent = request.args.get(b"csrf", [])
    return bool(expected) and len(sent) == 1 and hmac.compare_digest(sent[0], expected)


class AdminResource(resource.Resource):
    """Everything under /admin/ (a leaf: it routes C{request.postpath} itself)."""

    isLeaf = True

    def __init__(self, dataDir: str, accounts: AccountBook, checker, admins: list[str],
                 sessions: Sessions, deferToThread=threads.deferToThread,
                 traffic: TrafficHistory | None = None, queue: IRelayQueue | None = None) -> None:
        """@param traffic: the last day's samples the dashboard charts; None draws none.
        @param queue: the relay queue as the CLI opens it (L{queuecli.openQueue}: its work
            done in the calling thread, which is one of C{deferToThread}'s); None: the
            disk queue of C{dataDir}."""
        super().__init__()
        self._queue = queue or queuecli.diskQueue(dataDir)
        self._traffic = traffic
        self._dataDir = dataDir
        self._accounts = accounts
        self._checker = checker
        self._admins = {a.lower() for a in admins}
        self.sessions = sessions
        self._deferToThread = deferToThread

    # -- plumbing -------------------------------------------------------------

    def render(self, request) -> bytes | int:
        try:
            return self._render(request)
        except AccountsUnavailable:
            return _unavailable(request)

    def _render(self, request) -> bytes | int:
        for name, value in _HEADERS.items():
            request.setHeader(name, value)
        if not _allowed(request):
            request.setResponseCode(403)
            return b"The admin pages are served over https only (or http from loopback).\n"
        path = b"/".join(request.postpath).decode("ascii", "replace")
        method = request.method
        if path == "login":
            if method == b"POST":
                return self._login(request)
            return self._page(request, "login", None, token=self._loginToken(request))
        sid = (request.getCookie(COOKIE) or b"").decode("ascii", "replace")
        session = self.sessions.get(sid)
        if session is not None and self._accounts.passwordHash(session.address) is None:
            self.sessions.end(sid)  # the user was removed meanwhile (here or with the CLI)
            session = None
        if session is None:
            return self._redirect(request, b"/admin/login")
        if method == b"POST":
            if not _tokenMatches(request, session.csrf.encode()):
                request.setResponseCode(403)
                log.warn("web admin user={user} client={client} result=refused: CSRF token "
                         "missing or wrong", user=loggable(session.address),
                         client=loggable(request.getClientAddress().host))
                return b"Forbidden: the form's CSRF token is missing or wrong; reload the page.\n"
        if path == "logout" and method == b"POST":
            self.sessions.end(sid)
            self._setCookie(request, COOKIE, b"", expire=True)
            return self._redirect(request, b"/admin/login")
        if path == "password":
            if method == b"POST":
                return self._edit(request, session, "password", self._ownPassword)
            return self._page(request, "password", session)
        if not session.admin:
            return self._redirect(request, b"/admin/password")
        if path == "" and method == b"GET":
            self._respond(request, session, "dashboard")
            return server.NOT_DONE_YET
        if path == "queue" and method == b"GET":
            self._respond(request, session, "queue")
            return server.NOT_DONE_YET
        action = self.ACTIONS.get(path)
        if action is None or method != b"POST":
            request.setResponseCode(404)
            return b"Not found\n"
        return self._edit(request, session, "queue" if path.startswith("queue/") else "dashboard",
                          action)

    def _page(self, request, name: str, session: Session | None, **values) -> bytes:
        if name == "dashboard":
            values.setdefault("rows", [])
            values.update(domains=sorted(self._accounts.domains),
                          users=[(u, quotaText(self._accounts.quota(u)))
                                 for u in sorted(self._accounts.users)],
                          aliases=sorted(self._accounts.aliases.items()),
                          charts=self._charts())
        values.setdefault("error", "")
        values.setdefault("done", "")
        html = ENVIRONMENT.get_template(name).render(
            session=session, title=name, **values,
            csrf=lambda: Markup('<input type="hidden" name="csrf" value="{}">').format(
                session.csrf if session else ""))
        return html.encode("utf-8")

    def _charts(self) -> list:
        """The dashboard's charts: messages per five minutes, and the queue."""
        if self._traffic is None:
            return []
        points, now = self._traffic.points(), self._traffic.now()
        return [("Messages per five minutes", svgChart(points, MESSAGE_SERIES, now)),
                ("Relay queue", svgChart(points, QUEUE_SERIES, now))]

    def _respond(self, request, session: Session, page: str, code: int = 200,
                 **values) -> defer.Deferred:
        """Finish C{request} with C{page}; the queue page reads the queue in a thread first."""
        if page == "queue":
            d = self._deferToThread(queuecli.listing, self._queue)
        elif page == "dashboard":
            d = self._deferToThread(dkimRows, self._dataDir)
        else:
            d = defer.succeed(None)

        def render(rows) -> None:
            request.setResponseCode(code)
            if rows is not None:
                values["rows"] = rows
            self._finish(request, self._page(request, page, session, **values))

        return d.addCallback(render).addErrback(self._failed, request)

    def _redirect(self, request, where: bytes) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"Location", where)
        return b""

    def _setCookie(self, request, name: bytes, value: bytes, expire: bool = False) -> None:
        request.addCookie(name, value, path=b"/admin", httpOnly=True, sameSite=b"strict",
                          secure=request.isSecure(),
                          max_age=b"0" if expire else None)

    def _loginToken(self, request) -> str:
        token = secrets.token_urlsafe(32)
        self._setCookie(request, LOGIN_COOKIE, token.encode())
        return token

    def _finish(self, request, body: bytes) -> None:
        if not getattr(request, "_disconnected", False) and not request.finished:
            request.write(body)
            request.finish()

    # -- login ------------------------------------------------------------------

    def _login(self, request) -> int | bytes:
        if not _tokenMatches(request, request.getCookie(LOGIN_COOKIE) or b""):
            request.setResponseCode(403)
            return b"Forbidden: the login form's CSRF token is missing or wrong; reload the page.\n"
        try:
            address = _field(request, "address").lower()
            password = _field(request, "password", strip=False)
        except AccountError:
            address = password = ""  # refused below like any wrong password
        client = request.getClientAddress().host
        creds = fromClient(credentials.UsernamePassword(address.encode(), password.encode()),
                           client, "web")
        d = defer.maybeDeferred(self._checker.requestAvatarId, creds)

        def ok(who: str) -> None:
            sid, session = self.sessions.create(who, who in self._admins)
            self._setCookie(request, COOKIE, sid.encode())
            self._setCookie(request, LOGIN_COOKIE, b"", expire=True)
            log.info("web admin login user={user} client={client} result=ok admin={admin}",
                     user=loggable(who), client=loggable(client), admin=session.admin)
            self._finish(request, self._redirect(
                request, b"/admin/" if session.admin else b"/admin/password"))

        def refused(failure) -> None:
            if failure.check(AccountsUnavailable):
                self._finish(request, _unavailable(request))
                return
            failure.trap(error.UnauthorizedLogin, error.UnhandledCredentials)
            log.info("web admin login user={user} client={client} result=refused",
                     user=loggable(address), client=loggable(client))
            request.setResponseCode(401)
            self._finish(request, self._page(request, "login", None,
                                             error="wrong address or password",
                                             token=self._loginToken(request)))

        d.addCallbacks(ok, refused).addErrback(self._failed, request)
        return server.NOT_DONE_YET

    def _failed(self, failure, request) -> None:
        if failure.check(AccountsUnavailable):
            self._finish(request, _unavailable(request))
            return
        log.failure("web admin request failed", failure)
        request.setResponseCode(500)
        self._finish(request, b"Internal error; see the server log.\n")

    # -- changes ------------------------------------------------------------------

    def _edit(self, request, session: Session, page: str, action) -> int:
        """Read the form with C{action}, then carry it out in a thread: an accounts change with
        the file locked (C{apply}), a queue request (C{queue}) or a CLI command (C{run})."""
        if session.busy:
            request.setResponseCode(429)
            return b"Too many requests: your previous change is still under way.\n"
        try:
            prepared = action(request, session)
        except _REFUSALS as e:
            self._respond(request, session, page, 400, error=str(e))
            return server.NOT_DONE_YET
        session.busy = True

        editors = []

        def inThread() -> str:
            if "queue" in prepared:
                return prepared["queue"](self._queue)
            if "run" in prepared:
                return prepared["run"](self._dataDir)
            hashed = hashPassword(prepared["password"]) if "password" in prepared else None
            accounts = self._accounts.editor()
            with accounts.editing():
                text = prepared["apply"](accounts, hashed)
            editors.append(accounts)
            return text

        def done(text: str) -> defer.Deferred:
            if editors:
                self._accounts.edited(editors[0])
            log.info("web admin user={user} result={done}", user=loggable(session.address),
                     done=loggable(text))
            return self._respond(request, session, page, done=text)

        def refused(failure) -> defer.Deferred:
            failure.trap(*_REFUSALS)
            return self._respond(request, session, page, 400, error=str(failure.value))

        def idle(result):
            session.busy = False
            return result

        self._deferToThread(inThread).addBoth(idle).addCallbacks(done, refused).addErrback(
            self._failed, request)
        return server.NOT_DONE_YET

    # Each action reads its form in the reactor thread and returns what the thread
    # applies: {"apply": f(accounts, hashedPassword) -> text, "password": to hash}.

    @staticmethod
    def _ownPassword(request, session: Session) -> dict:
        password = _password(request)
        return {"password": password,
                "apply": lambda a, hashed: f"password of {a.setPassword(session.address, hashed)} "
                                           "changed"}

    ACTIONS: dict = {}  # filled in below


def _accountAction(fields: tuple[str, ...], apply, password: bool = False):
    """An action reading C{fields} (and a password to hash) that calls
    C{apply(accounts, hashedPassword, *values)} in the thread."""

    def action(request, session: Session) -> dict:
        values = [_field(request, name) for name in fields]
        prepared = {"apply": lambda a, hashed: apply(a, hashed, *values)}
        if password:
            prepared["password"] = _password(request)
        return prepared

    return action


def _queueAction(verb: str):
    def action(request, session: Session) -> dict:
        id = _field(request, "id") or None
        return {"queue": lambda queue: queuecli.askServer(queue, id, verb)}

    return action


def _dkimAction(action: str, fields: tuple[str, ...]):
    """``twistmail dkim generate|remove``, run by the CLI's own code in the thread."""

    def prepare(request, session: Session) -> dict:
        args = SimpleNamespace(action=action, **{f: _field(request, f) or None for f in fields})
        return {"run": lambda dataDir: dkimcli.run(args, dataDir)}

    return prepare


def dkimRows(dataDir: str) -> list[tuple]:
    """(domain, key set, created, state, [(owner, TXT value)]) for the dashboard (in a thread)."""
    rows = []
    for domain in dkimkeys.listDomains(dataDir):
        for i, keys in enumerate(dkimkeys.listSets(dataDir, domain)):
            rows.append((domain, keys.name, time.strftime("%Y-%m-%d %H:%M",
                                                          time.gmtime(keys.created)),
                         "signing" if i == 0 else "next", keys.records()))
    return rows


_SIZES = (("TiB", 1024 ** 4), ("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024))


def quotaText(quota: dict | None) -> str:
    """A user's own quota for the users table: "default", "unlimited" or "10 MiB, 500 messages"."""
    if quota is None:
        return "default"
    parts = []
    if quota.get("storage"):
        size = quota["storage"]
        unit, n = next(((u, n) for u, n in _SIZES if size % n == 0), ("octets", 1))
        parts.append(f"{size // n} {unit}")
    if quota.get("messages"):
        parts.append(f"{quota['messages']} messages")
    return ", ".join(parts) or "unlimited"


def _quotaSet(a: AccountBook, _, address: str, size: str) -> str:
    quota = parseQuota(size)
    return describeQuota(a.setQuota(address, quota), quota)


def _aliasAdded(a: AccountBook, _, source: str, targets: str) -> str:
    done = a.addAlias(source, [t.strip() for t in targets.split(",") if t.strip()])
    return f"alias {done} -> {', '.join(a.aliases[done])}"


# The texts are the CLI's (twistmail.cli.main).
AdminResource.ACTIONS = {
    "domain/add": _accountAction(("domain",), lambda a, _, d: f"domain {a.addDomain(d)} added"),
    "domain/remove": _accountAction(("domain",),
                                    lambda a, _, d: f"domain {a.removeDomain(d)} removed"),
    "user/add": _accountAction(("address",), lambda a, hashed, u: f"user {a.addUser(u, hashed)} "
                               "added", password=True),
    "user/password": _accountAction(("address",), lambda a, hashed, u: "password of "
                                    f"{a.setPassword(u, hashed)} changed", password=True),
    "user/remove": _accountAction(("address",), lambda a, _, u: f"user {a.removeUser(u)} removed "
                                  "(its mail stays in the data directory)"),
    "alias/add": _accountAction(("source", "targets"), _aliasAdded),
    "alias/remove": _accountAction(("source",),
                                   lambda a, _, s: f"alias {a.removeAlias(s)} removed"),
    "user/quota": _accountAction(("address", "size"), _quotaSet),
    "dkim/generate": _dkimAction("generate", ("domain", "selector")),
    "dkim/remove": _dkimAction("remove", ("domain", "selector")),
    "queue/flush": _queueAction("flush"),
    "queue/delete": _queueAction("delete"),
}


def _unavailable(request) -> bytes:
    """The accounts database is away (postgresql backend): a temporary error, not a crash."""
    request.setResponseCode(503)
    request.setHeader(b"retry-after", b"5")
    return b"The accounts database is unreachable; try again in a moment.\n"
