"""Our MTA-STS policy (RFC 8461 §3.2/§3.3) served over HTTPS and HTTP, and nothing else."""

from __future__ import annotations

import http.client
import socket

import pytest
from support import addUser, cli, freePort, readAll, startServer
from test_tls import insecure

from twistmail import config as configmod
from twistmail.web import mtasts

POLICY = (b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\nmx: *.mx.example.test\r\n"
          b"max_age: 604800\r\n")
MTA_STS = {"mode": "enforce", "mx": ["mail.example.test", "*.mx.example.test"]}
PATH = "/.well-known/mta-sts.txt"


@pytest.fixture
def web(dataDir):
    addUser(dataDir, "alice@example.test")
    https, plain = freePort(), freePort()
    srv = startServer(dataDir, mta_sts=MTA_STS,
                      listen={"https": [f"tcp:{https}:interface=127.0.0.1"],
                              "http": [f"tcp:{plain}:interface=127.0.0.1"]})
    srv.https, srv.http = https, plain
    yield srv
    srv.stop()


def get(port: int, path: str = PATH, host: str | None = "mta-sts.example.test", tls: bool = True,
        method: str = "GET", body: bytes | None = None) -> tuple[int, dict, bytes]:
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=insecure())
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_policy_over_https_and_http(web):
    for port, tls in ((web.https, True), (web.http, False)):
        status, headers, body = get(port, tls=tls)
        assert (status, body) == (200, POLICY)
        assert headers["content-type"] == "text/plain"


@pytest.mark.parametrize("host", ["MTA-STS.Example.Test:443", "mta-sts.example.test."])
def test_host_is_case_insensitive_and_port_stripped(web, host):
    assert get(web.https, host=host)[0] == 200


@pytest.mark.parametrize("host", ["mta-sts.other.test", "example.test", "mta-sts.", "127.0.0.1",
                                  "[::1]:443", "mta-sts.example.test.evil.test", None])
def test_wrong_host_is_404(web, host):
    status, _, body = get(web.https, host=host)
    assert status in (400, 404) and POLICY not in body


@pytest.mark.parametrize("path", ["/", "/.well-known/", "/.well-known", "/mta-sts.txt",
                                  PATH + "/", PATH + "/x", "/.well-known/../.well-known/mta-sts.txt",
                                  "/.well-known/%2e%2e/.well-known/mta-sts.txt",
                                  "/.well-known/mta-sts.txt%00", "/../../../../etc/passwd",
                                  "/.well-known/..%2f..%2fetc%2fpasswd", "/%2e%2e/etc/passwd"])
def test_other_paths_and_traversal_are_404(web, path):
    status, _, body = get(web.https, path=path)
    assert status == 404 and POLICY not in body and b"root:" not in body


def test_only_get_and_head(web):
    assert get(web.https, method="HEAD")[0] == 200
    status, headers, _ = get(web.https, method="POST", body=b"x")
    assert status == 405 and headers.get("allow") == "GET, HEAD"


def test_large_body_and_too_many_headers_are_cut_off(web):
    with socket.create_connection(("127.0.0.1", web.http), timeout=10) as sock:
        sock.sendall(b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: mta-sts.example.test\r\n"
                     b"Content-Length: 10000000\r\n\r\n" + b"x" * 65536)
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        assert POLICY not in data
    with socket.create_connection(("127.0.0.1", web.http), timeout=10) as sock:
        sock.sendall(b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: mta-sts.example.test\r\n"
                     + b"".join(b"X-%d: y\r\n" % i for i in range(60)) + b"\r\n")
        assert readAll(sock, b"\r\n").startswith(b"HTTP/1.1 400")


def test_off_by_default_and_mode_off_serves_nothing(dataDir):
    addUser(dataDir, "alice@example.test")
    assert configmod.load(None).listeners("https") == []
    assert configmod.load(None).listeners("http") == []
    port = freePort()
    srv = startServer(dataDir, listen={"http": [f"tcp:{port}:interface=127.0.0.1"]})
    try:
        assert get(port, tls=False)[0] == 404
    finally:
        srv.stop()


def test_policy_id_follows_the_policy():
    testing = mtasts.policyText("testing", ["mail.example.test"], 604800)
    assert mtasts.policyId(testing) != mtasts.policyId(POLICY)
    assert mtasts.policyId(POLICY) == mtasts.policyId(mtasts.policyText("enforce", MTA_STS["mx"], 604800))
    assert mtasts.policyId(POLICY).isalnum() and len(mtasts.policyId(POLICY)) <= 32  # RFC 8461 §3.1


@pytest.mark.parametrize("mode,mx", [("enforce", MTA_STS["mx"]), ("testing", ["mail.example.test"]),
                                     ("none", [])])
def test_the_policy_we_serve_is_one_the_senders_parser_accepts(mode, mx):
    from twistmail.mtasts import Policy, parsePolicy

    assert parsePolicy(mtasts.policyText(mode, mx, 86400)) == Policy(mode, tuple(mx), 86400)


@pytest.mark.parametrize("section,message", [
    ({"mode": "enforce"}, "[mta_sts] mx: mode 'enforce' needs the MX host names"),
    ({"mode": "strict", "mx": ["a.example"]}, "[mta_sts] mode: 'strict' is not one of"),
    ({"mode": "testing", "mx": ["not a host"]}, "[mta_sts] mx: 'not a host' is not a host name"),
    ({"mode": "testing", "mx": ["a.example"], "max_age": 40000000}, "[mta_sts] max_age: 40000000"),
    ({"mode": "testing", "mx": ["mail.example."]}, "[mta_sts] mx: 'mail.example.' is not a host"),
])
def test_bad_mta_sts_config_names_key_and_fix(section, message):
    with pytest.raises(configmod.ConfigError, match="Fix: ") as e:
        configmod.load(None, {"mta_sts": section})
    assert message in str(e.value)


def checkConfigOutput(dataDir: str, tmp_path, listen: str, extra: str = "") -> str:
    """``twistmail check-config`` on a file for mx.example.test hosting example.test."""
    addUser(dataDir, "alice@example.test")
    path = tmp_path / "twistmail.toml"
    path.write_text(f'[server]\ndata_dir = "{dataDir}"\nhostname = "mx.example.test"\n'
                    f"[listen]\n{listen}{extra}")
    return cli("--config", str(path), "check-config", dataDir=dataDir).stdout


def test_check_config_prints_the_dns_records(dataDir, tmp_path):
    out = checkConfigOutput(dataDir, tmp_path, 'https = ["tcp:443"]\n',
                            '[mta_sts]\nmode = "enforce"\nmx = ["mail.example.test", "*.mx.example.test"]\n')
    assert f'_mta-sts.example.test. IN TXT "v=STSv1; id={mtasts.policyId(POLICY)}"' in out
    assert "mta-sts.example.test. IN CNAME mx.example.test." in out


def test_a_web_connection_is_aborted_at_its_deadline():
    from twisted.internet import address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twistmail.web.site import CONNECTION_DEADLINE, Site, WebFactory, buildRoot

    clock = Clock()
    factory = WebFactory(Site(buildRoot({**MTA_STS, "max_age": 86400}, lambda d: True)), None, clock)
    peer = address.IPv4Address("TCP", "192.0.2.7", 5000)
    proto = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    proto.dataReceived(b"GET / HTTP/1.1\r\nHo")  # dribbling: every byte would reset an idle timer
    clock.advance(CONNECTION_DEADLINE - 1)
    proto.dataReceived(b"s")
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    proto.connectionLost(None)


def test_web_connections_count_against_the_per_address_limit():
    from twisted.internet import address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twistmail.protocols.limits import ConnectionLimiter
    from twistmail.web.site import Site, WebFactory, buildRoot

    factory = WebFactory(Site(buildRoot({"mode": ""}, lambda d: True)), ConnectionLimiter(10, 1),
                         Clock())
    peer = address.IPv4Address("TCP", "192.0.2.7", 5000)
    first = factory.buildProtocol(peer)
    first.makeConnection(StringTransport(peerAddress=peer))
    second, transport = factory.buildProtocol(peer), StringTransport(peerAddress=peer)
    second.makeConnection(transport)
    assert transport.value().startswith(b"HTTP/1.1 503 ")
    assert b"Too many connections from your address" in transport.value()
