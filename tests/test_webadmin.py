"""The web admin (/admin/) over loopback HTTP with http.client, and its throttle over task.Clock."""

from __future__ import annotations

import http.client
import json
import os
import re
from http.cookies import SimpleCookie
from urllib.parse import urlencode

import pytest
from support import addUser, freePort, startServer
from test_tls import insecure
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.web.test.requesthelper import DummyRequest

from twistmail.auth.accounts import Accounts
from twistmail.auth.checkers import PasswordChecker
from twistmail.auth.throttle import AuthThrottle
from twistmail.web import admin

ADMIN = "postmaster@example.test"


@pytest.fixture
def web(dataDir):
    addUser(dataDir, ADMIN, "adminpw")
    addUser(dataDir, "alice@example.test", "alicepw")
    port = freePort()
    srv = startServer(dataDir, listen={"http": [f"tcp:{port}:interface=127.0.0.1"]},
                      admin={"enabled": True, "admins": [ADMIN]})
    srv.port = port
    srv.dataDir = dataDir
    yield srv
    srv.stop()


class Browser:
    """http.client with a cookie jar: just enough of a browser for these tests."""

    def __init__(self, port: int, tls: bool = False) -> None:
        self.port = port
        self.tls = tls
        self.cookies: dict[str, str] = {}
        self.setCookies: list[str] = []

    def request(self, method: str, path: str, form: dict | None = None,
                body: bytes | None = None) -> tuple[int, dict, str]:
        if self.tls:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=15,
                                               context=insecure())
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        headers = {}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if form is not None:
            body = urlencode(form).encode()
        if method == "POST":
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            self.setCookies = response.headers.get_all("Set-Cookie") or []
            for header in self.setCookies:
                for name, morsel in SimpleCookie(header).items():
                    if morsel["max-age"] == "0":
                        self.cookies.pop(name, None)
                    else:
                        self.cookies[name] = morsel.value
            return (response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read().decode("utf-8", "replace"))
        finally:
            conn.close()

    def token(self, page: str) -> str:
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)

    def login(self, address: str, password: str) -> tuple[int, dict, str]:
        _, _, page = self.request("GET", "/admin/login")
        return self.request("POST", "/admin/login", {"csrf": self.token(page), "address": address,
                                                     "password": password})


class FormRequest(DummyRequest):
    """A DummyRequest from a remote address, with the cookie calls admin uses."""

    def __init__(self, path: bytes, secure: bool, cookies: dict | None = None) -> None:
        super().__init__([path])
        self.client = IPv4Address("TCP", "192.0.2.7", 40000)
        self.secure = secure
        self.received_cookies = cookies or {}
        self.cookiesSet: list = []

    def isSecure(self) -> bool:
        return self.secure

    def getCookie(self, name: bytes) -> bytes | None:
        return self.received_cookies.get(name)

    def addCookie(self, name, value, **attributes) -> None:
        self.cookiesSet.append((name, value, attributes))


def asAdmin(web) -> tuple[Browser, str]:
    """A browser logged in as the admin, and the dashboard it sees."""
    browser = Browser(web.port)
    browser.login(ADMIN, "adminpw")
    _, _, page = browser.request("GET", "/admin/")
    return browser, page


def users(dataDir: str) -> dict:
    with open(os.path.join(dataDir, "accounts.json")) as f:
        return json.load(f)["users"]


def test_no_page_without_a_session(web):
    browser = Browser(web.port)
    for path in ("/admin/", "/admin/password", "/admin/user/add"):
        status, headers, _ = browser.request("GET", path)
        assert (status, headers["location"]) == (303, "/admin/login"), path
    status, headers, _ = browser.request("POST", "/admin/user/add",
                                         {"address": "eve@example.test", "password": "x"})
    assert (status, headers["location"]) == (303, "/admin/login")
    assert "eve@example.test" not in users(web.dataDir)


def test_login_sets_a_strict_httponly_session_cookie_and_lists_accounts(web):
    browser = Browser(web.port)
    status, headers, _ = browser.login(ADMIN, "adminpw")
    assert (status, headers["location"]) == (303, "/admin/")
    cookie = next(c for c in browser.setCookies if c.startswith("twistmail_admin="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
    assert len(browser.cookies["twistmail_admin"]) >= 43  # 256 bits, base64
    status, headers, page = browser.request("GET", "/admin/")
    assert status == 200
    assert "alice@example.test" in page and "example.test" in page
    assert "script-src" not in headers["content-security-policy"]  # default-src 'none': no script


def test_wrong_password_refused(web):
    browser = Browser(web.port)
    status, _, page = browser.login(ADMIN, "wrong")
    assert status == 401 and "wrong address or password" in page
    assert "twistmail_admin" not in browser.cookies


def test_admin_adds_a_user_through_the_accounts_code(web):
    browser, page = asAdmin(web)
    status, _, page = browser.request("POST", "/admin/user/add", {
        "csrf": browser.token(page), "address": "Bob@Example.test", "password": "bobpw"})
    assert status == 200 and "user bob@example.test added" in page
    assert "bob@example.test" in users(web.dataDir)
    # The CLI's validation and text: a user in a domain that is not ours.
    status, _, page = browser.request("POST", "/admin/user/add", {
        "csrf": browser.token(page), "address": "carol@elsewhere.test", "password": "x"})
    assert status == 400
    assert "domain elsewhere.test is not local: run &#39;twistmail domain add elsewhere.test&#39; " \
           "first" in page


def test_csrf_missing_or_wrong_is_403(web):
    browser = Browser(web.port)
    browser.login(ADMIN, "adminpw")
    for body in (b"domain=evil.test", b"csrf=forged&domain=evil.test",
                 b"csrf=%ff%fe&domain=evil.test", b"csrf=&domain=evil.test"):
        status, _, _ = browser.request("POST", "/admin/domain/add", body=body)
        assert status == 403, body
    status, _, _ = browser.request("POST", "/admin/logout", {})
    assert status == 403
    assert "evil.test" not in Accounts(web.dataDir).domains


def test_login_form_needs_its_csrf_token(web):
    browser = Browser(web.port)
    status, _, _ = browser.request("POST", "/admin/login", {"address": ADMIN, "password": "adminpw"})
    assert status == 403
    browser.request("GET", "/admin/login")
    status, _, _ = browser.request("POST", "/admin/login", {"csrf": "forged", "address": ADMIN,
                                                            "password": "adminpw"})
    assert status == 403
    assert "twistmail_admin" not in browser.cookies


def test_script_in_input_is_shown_as_text(web):
    browser, page = asAdmin(web)
    status, _, page = browser.request("POST", "/admin/user/add", {
        "csrf": browser.token(page), "address": "<script>alert(1)</script>@example.test",
        "password": "x"})
    assert status == 400
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@example.test" in page


def test_logout_ends_the_session_on_the_server(web):
    browser, page = asAdmin(web)
    stolen = dict(browser.cookies)
    status, headers, _ = browser.request("POST", "/admin/logout", {"csrf": browser.token(page)})
    assert (status, headers["location"]) == (303, "/admin/login")
    browser.cookies = stolen  # the old cookie, replayed
    status, headers, _ = browser.request("GET", "/admin/")
    assert (status, headers["location"]) == (303, "/admin/login")


def test_user_changes_own_password_but_cannot_administer(web):
    browser = Browser(web.port)
    status, headers, _ = browser.login("alice@example.test", "alicepw")
    assert (status, headers["location"]) == (303, "/admin/password")
    status, headers, _ = browser.request("GET", "/admin/")
    assert (status, headers["location"]) == (303, "/admin/password")
    _, _, page = browser.request("GET", "/admin/password")
    status, headers, _ = browser.request("POST", "/admin/user/remove", {
        "csrf": browser.token(page), "address": ADMIN})
    assert status == 303 and ADMIN in users(web.dataDir)
    old = users(web.dataDir)["alice@example.test"]["password"]
    status, _, page = browser.request("POST", "/admin/password", {
        "csrf": browser.token(page), "password": "newalicepw"})
    assert status == 200 and "password of alice@example.test changed" in page
    assert users(web.dataDir)["alice@example.test"]["password"] != old
    assert Browser(web.port).login("alice@example.test", "newalicepw")[0] == 303


def test_request_body_over_the_limit_is_cut_off(web):
    browser = Browser(web.port)
    browser.login(ADMIN, "adminpw")
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        browser.request("POST", "/admin/domain/add", body=b"domain=" + b"a" * 10000)


def test_plain_http_only_from_loopback(dataDir):
    request = FormRequest(b"", secure=False)
    resource = admin.AdminResource(dataDir, Accounts(dataDir), None, [], admin.Sessions(60))
    body = resource.render(request)
    assert request.responseCode == 403 and b"https" in body


def test_sessions_expire_when_idle_and_are_bounded():
    clock = task.Clock()
    sessions = admin.Sessions(idle=60, clock=clock.seconds, limit=2)
    first, _ = sessions.create("a@example.test", True)
    clock.advance(59)
    assert sessions.get(first) is not None  # used: idle time starts again
    clock.advance(61)
    assert sessions.get(first) is None
    ids = [sessions.create(f"u{n}@example.test", False)[0] for n in range(3)]
    assert sessions.get(ids[0]) is None and sessions.get(ids[2]) is not None


def test_login_goes_through_the_auth_throttle(dataDir):
    """A remote address that keeps failing is blocked; then even the right password is refused
    without being checked, as for IMAP or POP3."""
    addUser(dataDir, ADMIN, "adminpw")
    clock = task.Clock()
    throttle = AuthThrottle(1, 4, 3, 600, 600, clock=clock.seconds)
    checked = []

    def inline(f, *args):
        checked.append(args)
        return defer.maybeDeferred(f, *args)

    accounts = Accounts(dataDir)
    resource = admin.AdminResource(dataDir, accounts, PasswordChecker(accounts, inline, throttle,
                                                                      clock),
                                   [ADMIN], admin.Sessions(60), inline)

    def attempt(password: str) -> FormRequest:
        request = FormRequest(b"login", secure=True, cookies={admin.LOGIN_COOKIE: b"t"})
        request.method = b"POST"
        request.args = {b"csrf": [b"t"], b"address": [ADMIN.encode()],
                        b"password": [password.encode()]}
        resource.render(request)
        while clock.getDelayedCalls():  # the throttle's delays, before and after the check
            clock.advance(max(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
        return request

    for n in range(3):
        assert attempt(f"wrong{n}").responseCode == 401
    assert len(checked) == 3
    request = attempt("adminpw")
    assert request.responseCode == 401  # blocked: refused unchecked
    assert len(checked) == 3
    clock.advance(600)
    assert attempt("adminpw").responseCode == 303


def test_over_https_the_session_cookie_is_secure(dataDir):
    addUser(dataDir, ADMIN, "adminpw")
    port = freePort()
    srv = startServer(dataDir, listen={"https": [f"tcp:{port}:interface=127.0.0.1"]},
                      admin={"enabled": True, "admins": [ADMIN]})
    try:
        browser = Browser(port, tls=True)
        status, _, _ = browser.login(ADMIN, "adminpw")
        assert status == 303
        cookie = next(c for c in browser.setCookies if c.startswith("twistmail_admin="))
        assert "Secure" in cookie and "HttpOnly" in cookie
        assert browser.request("GET", "/admin/")[0] == 200
    finally:
        srv.stop()


def test_a_removed_user_s_session_ends(web):
    alice = Browser(web.port)
    alice.login("alice@example.test", "alicepw")
    assert alice.request("GET", "/admin/password")[0] == 200
    browser, page = asAdmin(web)
    status, _, _ = browser.request("POST", "/admin/user/remove", {
        "csrf": browser.token(page), "address": "alice@example.test"})
    assert status == 200
    status, headers, _ = alice.request("GET", "/admin/password")
    assert (status, headers["location"]) == (303, "/admin/login")


def test_passwords_are_taken_as_typed(web):
    browser = Browser(web.port)
    browser.login("alice@example.test", "alicepw")
    _, _, page = browser.request("GET", "/admin/password")
    browser.request("POST", "/admin/password", {"csrf": browser.token(page),
                                                "password": " spaced out "})
    assert Browser(web.port).login("alice@example.test", " spaced out ")[0] == 303
    assert Browser(web.port).login("alice@example.test", "spaced out")[0] == 401


def test_one_change_at_a_time_per_session(dataDir):
    """A user cannot queue up password hashes (the mail logins' threads) by posting in a loop:
    while one change of a session is under way, the next is 429."""
    addUser(dataDir, "alice@example.test", "alicepw")
    pending: list[defer.Deferred] = []

    def parked(f, *args):
        pending.append(defer.Deferred().addCallback(lambda _: f(*args)))
        return pending[-1]

    sessions = admin.Sessions(60)
    resource = admin.AdminResource(dataDir, Accounts(dataDir), None, [], sessions, parked)
    sid, session = sessions.create("alice@example.test", False)

    def post() -> FormRequest:
        request = FormRequest(b"password", secure=True, cookies={admin.COOKIE: sid.encode()})
        request.method = b"POST"
        request.args = {b"csrf": [session.csrf.encode()], b"password": [b"newpw"]}
        resource.render(request)
        return request

    first = post()
    assert post().responseCode == 429
    pending[0].callback(None)
    assert first.responseCode == 200 and first.finished
    assert post().responseCode is None  # accepted: under way again


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    from twistmail import config as configmod

    with pytest.raises(configmod.ConfigError) as caught:
        configmod.load(None, {"admin": {"enabled": True}})
    assert "[admin] enabled" in str(caught.value) and "[listen] https" in str(caught.value)
    with pytest.raises(configmod.ConfigError) as caught:
        configmod.load(None, {"admin": {"admins": ["postmaster"]}, "listen": {"https": ["tcp:443"]}})
    assert "[admin] admins" in str(caught.value) and "user@domain" in str(caught.value)


def test_admin_generates_lists_and_removes_dkim_keys_as_the_cli_does(web):
    """The DKIM keys section: the same code and texts as ``twistmail dkim``; the records to
    publish are shown; a bad domain is refused with the CLI's message."""
    from twistmail import dkimkeys

    browser, page = asAdmin(web)
    status, _, page = browser.request("POST", "/admin/dkim/generate",
                                      {"csrf": browser.token(page), "domain": "example.test",
                                       "selector": "s1"})
    assert status == 200, page
    assert "key set s1 for example.test made" in page
    [keys] = dkimkeys.listSets(web.dataDir, "example.test")
    assert keys.name == "s1"
    # Listed with its state and the TXT records to publish.
    _, _, page = browser.request("GET", "/admin/")
    assert 's1-ed25519._domainkey.example.test' in page and "s1-rsa._domainkey.example.test" in page
    assert "v=DKIM1; k=ed25519; p=" in page and "signing" in page
    status, _, page = browser.request("POST", "/admin/dkim/generate",
                                      {"csrf": browser.token(page), "domain": "../etc",
                                       "selector": ""})
    assert status == 400 and 'id="error"' in page
    assert not os.path.exists(os.path.join(web.dataDir, "etc"))
    status, _, page = browser.request("POST", "/admin/dkim/remove",
                                      {"csrf": browser.token(page), "domain": "example.test",
                                       "selector": "s1"})
    assert status == 200 and "key set s1 removed" in page
    assert dkimkeys.listSets(web.dataDir, "example.test") == []


def test_admin_sets_a_users_quota_as_the_cli_does(web):
    browser, page = asAdmin(web)
    status, _, page = browser.request("POST", "/admin/user/quota",
                                      {"csrf": browser.token(page), "address": "alice@example.test",
                                       "size": "10M"})
    assert status == 200, page
    assert "quota of alice@example.test: 10485760 octets, any number of messages" in page
    assert users(web.dataDir)["alice@example.test"]["quota"] == {"storage": 10 * 1024 * 1024}
    assert re.search(r"alice@example\.test</td><td>10 MiB", page)
    status, _, page = browser.request("POST", "/admin/user/quota",
                                      {"csrf": browser.token(page), "address": "alice@example.test",
                                       "size": "lots"})
    assert status == 400 and "write octets or a number with K, M, G or T" in page
    status, _, page = browser.request("POST", "/admin/user/quota",
                                      {"csrf": browser.token(page), "address": "alice@example.test",
                                       "size": "default"})
    assert "the default ([accounts] default_quota)" in page
    assert "quota" not in users(web.dataDir)["alice@example.test"]
