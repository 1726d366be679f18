"""Client autoconfiguration: Thunderbird's config-v1.1.xml, Microsoft's Autodiscover and an
Apple profile, all generated from the listeners actually configured (issue 14, item 2)."""

from __future__ import annotations

import plistlib
import xml.etree.ElementTree as ET

import pytest
from support import addUser, freePort, startServer
from test_web import checkConfigOutput, get

from twistmail import config as configmod
from twistmail.web import autoconfig

MS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
REQUEST = ('<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover xmlns="http://schemas.microsoft.com'
           '/exchange/autodiscover/outlook/requestschema/2006"><Request><EMailAddress>{}'
           '</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/'
           'autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema></Request>'
           '</Autodiscover>')


def listen(**ports) -> dict:
    return {name: [f"tcp:{port}:interface=127.0.0.1"] for name, port in ports.items()}


@pytest.fixture
def web(dataDir):
    addUser(dataDir, "alice@example.test")
    plain = freePort()
    srv = startServer(dataDir, listen={"http": [f"tcp:{plain}:interface=127.0.0.1"]})
    srv.http = plain
    yield srv
    srv.stop()


# -- which services, from which listeners ----------------------------------------------


def test_services_prefer_implicit_tls_and_follow_the_listeners():
    config = configmod.load(None, {"listen": {
        **listen(imaps=993, imap=143, pop3s=995, submissions=465, submission=587),
        "pop3": [], "smtp": ["tcp:25"]}})
    assert autoconfig.services(config) == [
        autoconfig.Service("imap", 993, True), autoconfig.Service("imap", 143, False),
        autoconfig.Service("pop3", 995, True),
        autoconfig.Service("smtp", 465, True), autoconfig.Service("smtp", 587, False)]


def test_services_read_ports_from_any_endpoint_form():
    config = configmod.load(None, {"listen": {
        "imaps": ["haproxy:tcp6:port=10993:interface=\\:\\:1"], "imap": ["unix:/run/imap.sock"],
        "pop3s": [], "pop3": [], "submissions": [], "submission": ["tcp:interface=0.0.0.0:port=2587"]}})
    assert autoconfig.services(config) == [autoconfig.Service("imap", 10993, True),
                                           autoconfig.Service("smtp", 2587, False)]


# -- Thunderbird ---------------------------------------------------------------------


@pytest.mark.parametrize("path,host", [
    ("/mail/config-v1.1.xml?emailaddress=alice%40example.test", "autoconfig.example.test"),
    ("/.well-known/autoconfig/mail/config-v1.1.xml", "example.test"),
    ("/mail/config-v1.1.xml", "autoconfig.Example.Test:80"),
])
def test_thunderbird_config_lists_the_configured_servers(web, path, host):
    status, headers, body = get(web.http, path=path, host=host, tls=False)
    assert status == 200 and headers["content-type"].startswith("application/xml")
    provider = ET.fromstring(body).find("emailProvider")
    assert provider.get("id") == "example.test"
    assert provider.findtext("domain") == "example.test"
    incoming = [(s.get("type"), s.findtext("hostname"), int(s.findtext("port")), s.findtext("socketType"),
                 s.findtext("username"), s.findtext("authentication"))
                for s in provider.findall("incomingServer")]
    assert incoming == [
        ("imap", "mx.example.test", web.ports["imaps"], "SSL", "%EMAILADDRESS%", "password-cleartext"),
        ("imap", "mx.example.test", web.ports["imap"], "STARTTLS", "%EMAILADDRESS%", "password-cleartext"),
        ("pop3", "mx.example.test", web.ports["pop3s"], "SSL", "%EMAILADDRESS%", "password-cleartext"),
        ("pop3", "mx.example.test", web.ports["pop3"], "STARTTLS", "%EMAILADDRESS%", "password-cleartext")]
    outgoing = [(int(s.findtext("port")), s.findtext("socketType")) for s in provider.findall("outgoingServer")]
    assert outgoing == [(web.ports["submissions"], "SSL"), (web.ports["submission"], "STARTTLS")]


@pytest.mark.parametrize("path,host", [
    ("/mail/config-v1.1.xml?emailaddress=bob%40elsewhere.test", "autoconfig.example.test"),
    ("/mail/config-v1.1.xml", "autoconfig.elsewhere.test"),
    ("/mail/config-v1.1.xml", None),
    ("/mail/config-v1.1.xml", "127.0.0.1"),
    ("/mail/config-v1.1.xml?emailaddress=%3Cscript%3E", "autoconfig.example.test"),
])
def test_thunderbird_config_only_for_our_domains(web, path, host):
    assert get(web.http, path=path, host=host, tls=False)[0] == 404


# -- Outlook ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"])
def test_autodiscover_answers_outlooks_request(web, path):
    status, headers, body = get(web.http, path=path, host="autodiscover.example.test", tls=False,
                                method="POST", body=REQUEST.format("Alice@Example.test").encode())
    assert status == 200 and headers["content-type"].startswith("application/xml")
    account = ET.fromstring(body).find(f"{MS}Response/{MS}Account")
    assert account.findtext(f"{MS}AccountType") == "email"
    protocols = [(p.findtext(f"{MS}Type"), int(p.findtext(f"{MS}Port")), p.findtext(f"{MS}SSL"),
                  p.findtext(f"{MS}Encryption"), p.findtext(f"{MS}LoginName"))
                 for p in account.findall(f"{MS}Protocol")]
    # One per type, the preferred one (implicit TLS): Outlook reads the first of each.
    assert protocols == [("IMAP", web.ports["imaps"], "on", "SSL", "Alice@Example.test"),
                         ("POP3", web.ports["pop3s"], "on", "SSL", "Alice@Example.test"),
                         ("SMTP", web.ports["submissions"], "on", "SSL", "Alice@Example.test")]


@pytest.mark.parametrize("body", [
    REQUEST.format("bob@elsewhere.test"),
    REQUEST.format("no-at-sign"),
    "not xml at all",
    # An entity bomb: refused before anything is expanded.
    '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxxxxxxxx"><!ENTITY y "&x;&x;&x;&x;&x;">]>'
    '<Autodiscover><Request><EMailAddress>&y;@example.test</EMailAddress></Request></Autodiscover>',
])
def test_autodiscover_refuses_what_is_not_a_request_for_our_domain(web, body):
    status, _, answer = get(web.http, path="/autodiscover/autodiscover.xml", host="x", tls=False,
                            method="POST", body=body.encode())
    assert status in (400, 404) and b"xxxxx" not in answer


def test_autodiscover_needs_post(web):
    assert get(web.http, path="/autodiscover/autodiscover.xml", host="x", tls=False)[0] == 405


# -- Apple ------------------------------------------------------------------------------


def test_apple_profile_per_user(web):
    status, headers, body = get(web.http, path="/mail/profile.mobileconfig?emailaddress=alice%40example.test",
                                host="autoconfig.example.test", tls=False)
    assert status == 200 and headers["content-type"] == "application/x-apple-aspen-config"
    assert 'filename="alice@example.test.mobileconfig"' in headers["content-disposition"]
    profile = plistlib.loads(body)
    assert profile["PayloadType"] == "Configuration"
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert (mail["EmailAccountType"], mail["EmailAddress"]) == ("EmailTypeIMAP", "alice@example.test")
    assert (mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"],
            mail["IncomingMailServerUseSSL"]) == ("mx.example.test", web.ports["imaps"], True)
    assert (mail["OutgoingMailServerPortNumber"], mail["OutgoingMailServerUseSSL"]) == \
        (web.ports["submissions"], True)
    assert mail["IncomingMailServerUsername"] == mail["OutgoingMailServerUsername"] == "alice@example.test"
    assert "IncomingPassword" not in mail and "OutgoingPassword" not in mail


@pytest.mark.parametrize("query", ["", "?emailaddress=bob%40elsewhere.test", "?emailaddress=%0D%0A%40example.test",
                                   "?emailaddress=" + "a" * 300 + "%40example.test"])
def test_apple_profile_only_for_a_sane_address_of_ours(web, query):
    status, headers, _ = get(web.http, path="/mail/profile.mobileconfig" + query,
                             host="autoconfig.example.test", tls=False)
    assert status == 404 and "content-disposition" not in headers


def test_a_user_that_does_not_exist_is_not_revealed(web):
    """Any address of a hosted domain gets settings: the answer never says who exists."""
    ours = get(web.http, path="/mail/profile.mobileconfig?emailaddress=alice%40example.test",
               host="x", tls=False)
    nobody = get(web.http, path="/mail/profile.mobileconfig?emailaddress=nobody%40example.test",
                 host="x", tls=False)
    assert ours[0] == nobody[0] == 200


def test_autoconfig_can_be_turned_off(dataDir):
    addUser(dataDir, "alice@example.test")
    plain = freePort()
    srv = startServer(dataDir, listen={"http": [f"tcp:{plain}:interface=127.0.0.1"]},
                      autoconfig={"serve": False})
    try:
        assert get(plain, path="/mail/config-v1.1.xml", host="autoconfig.example.test", tls=False)[0] == 404
    finally:
        srv.stop()


def test_clients_host_name_is_configurable(dataDir):
    addUser(dataDir, "alice@example.test")
    plain = freePort()
    srv = startServer(dataDir, listen={"http": [f"tcp:{plain}:interface=127.0.0.1"]},
                      autoconfig={"host": "imap.example.test"})
    try:
        body = get(plain, path="/mail/config-v1.1.xml", host="autoconfig.example.test", tls=False)[2]
        assert {h.text for h in ET.fromstring(body).iter("hostname")} == {"imap.example.test"}
    finally:
        srv.stop()


def test_check_config_prints_the_client_dns_records(dataDir, tmp_path):
    out = checkConfigOutput(dataDir, tmp_path,
                            'imaps = ["tcp:993"]\nimap = []\npop3 = []\npop3s = ["tcp:995"]\n'
                            'submissions = ["tcp:465"]\nsubmission = ["tcp:587"]\nhttps = ["tcp:443"]\n')
    for record in ("_imaps._tcp.example.test. IN SRV 0 1 993 mx.example.test.",
                   "_imap._tcp.example.test. IN SRV 0 0 0 .",  # RFC 6186 §4: not offered
                   "_pop3s._tcp.example.test. IN SRV 10 1 995 mx.example.test.",
                   "_submissions._tcp.example.test. IN SRV 0 1 465 mx.example.test.",
                   "_submission._tcp.example.test. IN SRV 10 1 587 mx.example.test.",
                   "autoconfig.example.test. IN CNAME mx.example.test.",
                   "_autodiscover._tcp.example.test. IN SRV 0 1 443 mx.example.test."):
        assert record in out

