"""ACME certificates without a CA: config, names, the HTTP-01 responder, renewal timing.

Renewal, backoff and the swap run on a task.Clock with a fake issuer; the
real exchange with a real ACME server (pebble) is in test_acme_pebble.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
from test_config import assertFileError, write
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from twistmail import autocert, config
from twistmail.acmechallenges import ChallengeTokens
from twistmail.tls import ServerTLS
from twistmail.web.site import Site, buildRoot

DAY = 86400
HTTP = '[listen]\nhttp = ["tcp:80"]\n'


# -- configuration ----------------------------------------------------------------


def test_acme_is_off_by_default_and_lets_encrypt_is_the_directory():
    tls = config.load(None)["tls"]
    assert tls["acme"] is False
    assert tls["acme_directory"] == "https://acme-v02.api.letsencrypt.org/directory"
    assert (tls["acme_renew_before"], tls["acme_retry_min"], tls["acme_retry_max"]) == (30, 60, DAY)


def test_acme_config_loads_with_an_http_listener(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    path = write(tmp_path, HTTP + '[server]\nhostname = "mail.example.org"\n'
                 '[tls]\nacme = true\nacme_email = "admin@example.org"\n'
                 'acme_names = ["www.example.org"]\nacme_ca_file = "ca.pem"\n')
    tls = config.load(path)["tls"]
    assert tls["acme"] and tls["acme_names"] == ["www.example.org"]
    assert tls["acme_ca_file"] == str(tmp_path / "ca.pem")  # relative to the config file


def test_acme_with_only_an_https_listener_uses_tls_alpn_01(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "mail.example.org"\n'
                 '[listen]\nhttps = ["tcp:443"]\n[tls]\nacme = true\n')
    loaded = config.load(path)
    assert autocert.challengeType(loaded) == "tls-alpn-01"
    both = config.load(None, {"server": {"hostname": "mail.example.org"},
                              "listen": {"http": ["tcp:80"], "https": ["tcp:443"]},
                              "tls": {"acme": True}})
    assert autocert.challengeType(both) == "http-01"  # the one every CA offers


@pytest.mark.parametrize("text, where, fix", [
    ("[tls]\nacme = true\n", "[tls] acme", 'http = ["tcp:80"]'),
    ("[tls]\nacme = true\n", "[tls] acme", 'https = ["tcp:443"]'),
    (HTTP + '[tls]\nacme = true\ncertificate = "c.pem"\nkey = "k.pem"\n', "[tls] acme",
     "certificate"),
    (HTTP + '[tls]\nacme = true\nacme_directory = "http://ca.example/dir"\n',
     "[tls] acme_directory", "https://"),
    (HTTP + '[tls]\nacme = true\nacme_email = "not an address"\n', "[tls] acme_email", "@"),
    (HTTP + '[tls]\nacme = true\nacme_names = ["bad name", "../x"]\n', "[tls] acme_names",
     "www.example.org"),
    (HTTP + '[tls]\nacme = true\nacme_ca_file = "missing.pem"\n', "[tls] acme_ca_file", "PEM"),
    (HTTP + '[server]\nhostname = "localhost"\n[tls]\nacme = true\n', "[server] hostname",
     'hostname = "mail.example.org"'),
    (HTTP + "[tls]\nacme_retry_min = 600\nacme_retry_max = 60\n", "[tls] acme_retry_max",
     "at least acme_retry_min"),
])
def test_acme_config_errors_name_key_and_fix(tmp_path, text, where, fix):
    assertFileError(tmp_path, text, where, fix)


# -- which names the certificate covers ------------------------------------------------


def test_names_are_the_hostname_then_what_the_web_listener_serves():
    names = autocert.certificateNames("Mail.Example.org.", ["example.org", "example.net"],
                                      mtaSts=True, autoconfig=True, extra=["www.example.org"])
    assert names.required == ("mail.example.org", "www.example.org")
    assert names.optional == ("autoconfig.example.net", "autodiscover.example.net",
                              "mta-sts.example.net", "autoconfig.example.org",
                              "autodiscover.example.org", "mta-sts.example.org")
    plain = autocert.certificateNames("mail.example.org", ["example.org"], mtaSts=False,
                                      autoconfig=False, extra=[])
    assert plain.all() == ["mail.example.org"]


def test_names_from_config_only_add_web_names_with_an_https_listener():
    base = {"server": {"hostname": "mail.example.org"}, "mta_sts": {"mode": "enforce",
            "mx": ["mail.example.org"]}, "listen": {"http": ["tcp:80"]}, "tls": {"acme": True}}
    plain = config.load(None, base)
    assert autocert.namesFromConfig(plain, ["example.org"]).all() == ["mail.example.org"]
    base["listen"]["https"] = ["tcp:443"]
    served = config.load(None, base)
    assert autocert.namesFromConfig(served, ["example.org"]).all() == [
        "mail.example.org", "autoconfig.example.org", "autodiscover.example.org",
        "mta-sts.example.org"]


# -- the HTTP-01 responder (RFC 8555 §8.3) -----------------------------------------------

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


def fetch(root, path: bytes, host: bytes = b"anything.example") -> tuple[int, bytes]:
    site = Site(root)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: " + host +
                         b"\r\nConnection: close\r\n\r\n")
    response = transport.value()
    channel.connectionLost(None)
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.fixture
def tokens():
    tokens = ChallengeTokens()
    tokens.add(TOKEN, TOKEN + ".thumbprint")
    return tokens


def test_challenge_token_answers_its_key_authorization_for_any_host(tokens):
    root = buildRoot({"mode": ""}, lambda d: False, None, challenges=tokens)
    for host in (b"mail.example.org", b"mta-sts.example.org:80", b"203.0.113.5"):
        assert fetch(root, b"/.well-known/acme-challenge/" + TOKEN.encode(), host) == (
            200, (TOKEN + ".thumbprint").encode())
    tokens.remove(TOKEN)
    assert fetch(root, b"/.well-known/acme-challenge/" + TOKEN.encode())[0] == 404


@pytest.mark.parametrize("path", [
    b"/.well-known/acme-challenge/",
    b"/.well-known/acme-challenge/unknownTokenButWellFormed0123456789",
    b"/.well-known/acme-challenge/../acme-challenge/" + TOKEN.encode(),
    b"/.well-known/acme-challenge/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    b"/.well-known/acme-challenge/..%2f..%2f" + TOKEN.encode(),
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b"/extra",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b"%00",
    b"/.well-known/acme-challenge/" + TOKEN.encode() + b".txt",
    b"/.well-known/acme-challenge/" + b"A" * 5000,
])
def test_challenge_paths_other_than_a_known_token_are_404(tokens, path):
    root = buildRoot({"mode": ""}, lambda d: False, None, challenges=tokens)
    status, body = fetch(root, path)
    assert status == 404 and b"thumbprint" not in body


def test_challenge_tokens_are_checked_and_bounded():
    tokens = ChallengeTokens(limit=2)
    with pytest.raises(ValueError):
        tokens.add("../etc/passwd", "x")
    tokens.add("a" * 43, "1")
    tokens.add("b" * 43, "2")
    with pytest.raises(OverflowError):
        tokens.add("c" * 43, "3")
    assert tokens.get("a" * 43) == "1" and tokens.get("../x") is None


# -- renewal: when, what, and on failure ---------------------------------------------


def makeCertificate(directory, names, days: float, now: float) -> tuple[str, str]:
    """A self-signed certificate for C{names} that expires C{days} after C{now}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    start = datetime.datetime.fromtimestamp(now, datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start - datetime.timedelta(days=1))
                   .not_valid_after(start + datetime.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    certPath, keyPath = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(keyPath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(certPath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return certPath, keyPath


class FakeIssuer:
    """Records each order; answers with a Deferred the test fires."""

    def __init__(self) -> None:
        self.orders: list[tuple[list[str], defer.Deferred]] = []

    def __call__(self, names: list[str]) -> defer.Deferred:
        d = defer.Deferred()
        self.orders.append((list(names), d))
        return d


class Keeper:
    def __init__(self, tmp_path, names=("mail.example.org",), optional=(), existing=None) -> None:
        self.clock = task.Clock()
        self.clock.advance(time.time())
        self.directory = str(tmp_path / "acme")
        self.fallback = makeCertificate(str(tmp_path / "tls"), ["fallback.example"], 3650,
                                        self.clock.seconds())
        if existing is not None:
            makeCertificate(self.directory, *existing, self.clock.seconds())
        self.tls = ServerTLS(*autocert.startingPair(self.directory, *self.fallback))
        self.issuer = FakeIssuer()
        self.names = autocert.Names(tuple(names), tuple(optional))
        self.keeper = autocert.CertificateKeeper(
            self.tls, self.issuer, lambda: self.names, self.directory,
            autocert.Schedule(renewBefore=30 * DAY, retryMin=60, retryMax=DAY), self.clock)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.keeper.startService()

    def close(self) -> None:
        self.keeper.stopService()
        globalLogPublisher.removeObserver(self.events.append)

    def issue(self, names, days: float = 90) -> None:
        """Answer the last order as a CA would: new files on disk, then the result."""
        makeCertificate(self.directory, names, days, self.clock.seconds())
        self.issuer.orders[-1][1].callback(None)

    def served(self) -> list[str]:
        from cryptography import x509

        with open(self.tls.certPath, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        return cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)

    def logged(self, text: str) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if text in formatEvent(e)]


@pytest.fixture
def keeperAt(tmp_path):
    made = []

    def make(**kwargs) -> Keeper:
        made.append(Keeper(tmp_path, **kwargs))
        return made[-1]

    yield make
    for keeper in made:
        keeper.close()


def test_without_a_certificate_one_is_ordered_at_start_and_swapped_in(keeperAt):
    k = keeperAt(names=("mail.example.org",))
    assert k.served() == ["fallback.example"]  # until the CA answers
    k.clock.advance(0)
    assert [names for names, _ in k.issuer.orders] == [["mail.example.org"]]
    k.issue(["mail.example.org"])
    assert k.served() == ["mail.example.org"]
    assert k.logged("acme: serving a new certificate for mail.example.org")


def test_renewal_is_ordered_30_days_before_expiry(keeperAt):
    k = keeperAt(existing=(["mail.example.org"], 90))
    k.clock.advance(0)
    assert k.issuer.orders == []  # 90 days left: nothing to do
    k.clock.advance(60 * DAY - 60)
    assert k.issuer.orders == []
    k.clock.advance(120)
    assert len(k.issuer.orders) == 1
    k.issue(["mail.example.org"], days=90)
    k.clock.advance(60 * DAY - 120)
    assert len(k.issuer.orders) == 1  # the new one lasts 90 days again


def test_a_certificate_within_30_days_of_expiry_is_renewed_at_start(keeperAt):
    k = keeperAt(existing=(["mail.example.org"], 20))
    k.clock.advance(0)
    assert len(k.issuer.orders) == 1


def test_a_name_the_certificate_lacks_is_ordered_at_the_next_check(keeperAt):
    k = keeperAt(existing=(["mail.example.org"], 90))
    k.clock.advance(0)
    assert k.issuer.orders == []
    k.names = autocert.Names(("mail.example.org",), ("mta-sts.example.net",))  # a new domain
    k.clock.advance(autocert.RECHECK)
    assert [names for names, _ in k.issuer.orders] == [["mail.example.org",
                                                       "mta-sts.example.net"]]


def test_failures_are_logged_and_retried_with_doubling_backoff_keeping_the_old_certificate(
        keeperAt):
    k = keeperAt(existing=(["mail.example.org"], 10))
    k.clock.advance(0)
    waits = []
    for attempt in range(13):
        assert len(k.issuer.orders) == attempt + 1
        k.issuer.orders[-1][1].errback(ConnectionRefusedError("connection refused"))
        assert k.served() == ["mail.example.org"]  # the old one stays in service
        waits.append(k.clock.getDelayedCalls()[0].getTime() - k.clock.seconds())
        k.clock.advance(waits[-1])
    assert waits[:4] == [60, 120, 240, 480]
    assert waits[-1] == DAY and max(waits) == DAY
    failures = k.logged("acme: obtaining a certificate for mail.example.org")
    assert len(failures) == 13 and "connection refused" in failures[0]
    assert "retrying in 60 s" in failures[0] and "the current certificate stays" in failures[0]
    k.issue(["mail.example.org"])
    k.clock.advance(0)
    assert k.served() == ["mail.example.org"] and len(k.issuer.orders) == 14
    # Success resets the backoff: the next failure waits retry_min again.
    k.clock.advance(60 * DAY + 1)
    k.issuer.orders[-1][1].errback(ConnectionRefusedError("connection refused"))
    assert k.clock.getDelayedCalls()[0].getTime() - k.clock.seconds() == 60


def test_names_that_fail_validation_are_left_out_unless_required(keeperAt):
    k = keeperAt(names=("mail.example.org",), optional=("autoconfig.example.org",
                                                         "mta-sts.example.org"))
    k.clock.advance(0)
    assert k.issuer.orders[0][0] == ["mail.example.org", "autoconfig.example.org",
                                     "mta-sts.example.org"]
    k.issuer.orders[0][1].errback(autocert.OrderFailed(["autoconfig.example.org"], "NXDOMAIN"))
    k.clock.advance(0)  # at once, without it
    assert k.issuer.orders[1][0] == ["mail.example.org", "mta-sts.example.org"]
    assert k.logged("acme: leaving autoconfig.example.org out")
    k.issue(["mail.example.org", "mta-sts.example.org"])
    k.clock.advance(autocert.RECHECK)
    assert len(k.issuer.orders) == 2  # not asked for again until the renewal
    # A required name failing is a failure like any other: backoff.
    k.clock.advance(60 * DAY)
    assert k.issuer.orders[2][0] == ["mail.example.org", "autoconfig.example.org",
                                     "mta-sts.example.org"]
    k.issuer.orders[2][1].errback(autocert.OrderFailed(["mail.example.org"], "timeout"))
    assert k.clock.getDelayedCalls()[0].getTime() - k.clock.seconds() == 60


def test_an_unusable_pair_on_disk_falls_back_and_is_replaced(keeperAt, tmp_path):
    acme = tmp_path / "acme"
    acme.mkdir()
    (acme / "cert.pem").write_text("half written\n")
    (acme / "key.pem").write_text("\n")
    k = keeperAt()
    assert k.served() == ["fallback.example"]
    k.clock.advance(0)
    assert len(k.issuer.orders) == 1


def test_a_name_left_out_while_renewing_is_not_asked_for_again_at_once(keeperAt):
    k = keeperAt(names=("mail.example.org",), optional=("autoconfig.example.org",),
                 existing=(["mail.example.org", "autoconfig.example.org"], 20))
    k.clock.advance(0)
    k.issuer.orders[0][1].errback(autocert.OrderFailed(["autoconfig.example.org"], "NXDOMAIN"))
    k.clock.advance(0)
    k.clock.advance(0)
    assert [names for names, _ in k.issuer.orders] == [
        ["mail.example.org", "autoconfig.example.org"], ["mail.example.org"]]


# -- TLS-ALPN-01 (RFC 8737) ---------------------------------------------------------------


def handshake(tls: ServerTLS, serverName: str, protocols: list[bytes] | None):
    """One TLS handshake with C{tls}, in memory: (the certificate seen, the ALPN protocol)."""
    from OpenSSL import SSL

    server = tls.serverConnectionForTLS(None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_tlsext_host_name(serverName.encode())
    if protocols:
        client.set_alpn_protos(protocols)
    client.set_connect_state()
    for _ in range(10):  # a TLS 1.3 handshake takes two flights each way
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        for source, sink in ((client, server), (server, client)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
    return client.get_peer_certificate(as_cryptography=True), \
        client.get_alpn_proto_negotiated() or None


def test_tls_alpn_01_presents_the_challenge_certificate_only_to_the_validation(tmp_path):
    import hashlib

    from cryptography import x509

    from twistmail.acmechallenges import ALPNCertificates, challengeCertificate

    tls = ServerTLS(*makeCertificate(str(tmp_path), ["mail.example.org"], 90, time.time()))
    alpn = ALPNCertificates()
    tls.answerALPN(alpn.select)
    alpn.add("mail.example.org", challengeCertificate("mail.example.org", "token.thumbprint"))

    certificate, protocol = handshake(tls, "mail.example.org", [b"acme-tls/1"])
    assert protocol == b"acme-tls/1"
    assert certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["mail.example.org"]
    identifier = certificate.extensions.get_extension_for_oid(
        x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"))
    assert identifier.critical  # RFC 8737 §3
    assert identifier.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()

    # Every other client gets the server's certificate and no protocol.
    for name, protocols in (("mail.example.org", None), ("mail.example.org", [b"imap"]),
                            ("other.example.org", [b"acme-tls/1"])):
        certificate, protocol = handshake(tls, name, protocols)
        assert protocol is None
        assert certificate.subject.rfc4514_string() == "CN=mail.example.org"
        with pytest.raises(x509.ExtensionNotFound):
            certificate.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"))
    # A new certificate (renewal, SIGHUP) keeps the responder.
    tls.use(*makeCertificate(str(tmp_path / "new"), ["mail.example.org"], 90, time.time()))
    assert handshake(tls, "mail.example.org", [b"acme-tls/1"])[1] == b"acme-tls/1"
    alpn.remove("mail.example.org")
    assert handshake(tls, "mail.example.org", [b"acme-tls/1"])[1] is None


def test_no_order_until_the_accounts_give_the_domains(keeperAt):
    """A postgresql accounts store has not read the domains at start: the keeper waits
    for them rather than ordering a certificate without their names."""
    from twistmail.errors import AccountsUnavailable

    k = keeperAt(names=("mail.example.org",), optional=("mta-sts.example.org",))
    ready = autocert.Names(("mail.example.org",), ("mta-sts.example.org",))

    def names():
        if k.names is None:
            raise AccountsUnavailable("not read yet")
        return ready

    k.names = None
    k.keeper.names = names
    k.clock.advance(0)
    assert k.issuer.orders == []
    k.names = ready
    k.clock.advance(autocert.NAMES_RETRY)
    assert [names for names, _ in k.issuer.orders] == [["mail.example.org", "mta-sts.example.org"]]
