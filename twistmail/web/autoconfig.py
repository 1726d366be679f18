# -*- test-case-name: tests.test_autoconfig -*-
"""Client autoconfiguration: the user types an address and a password, nothing else.

Three formats, all generated from the listeners this server actually has, so
they cannot drift from the config:

* Thunderbird (and K-9, FairEmail, Evolution): ``/mail/config-v1.1.xml`` on
  ``autoconfig.<domain>`` and ``/.well-known/autoconfig/mail/config-v1.1.xml``
  on the domain itself;
* Outlook: ``POST /autodiscover/autodiscover.xml`` (the POX "outlook" schema);
* Apple Mail and iOS: a configuration profile per address,
  ``/mail/profile.mobileconfig?emailaddress=...``, without any password in it.

Implicit TLS is listed first (RFC 8314 §5.1 prefers it), STARTTLS after it.
Every address of a hosted domain gets an answer, whether or not the user
exists, so the answers reveal no user names.  Nothing here is a secret.
"""

from __future__ import annotations

import plistlib
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from xml.parsers import expat

from twisted.web import pages, resource

from twistmail.protocols.proxyheader import splitMarked
from twistmail.web.base import ReadOnly, methodNotAllowed, notFound

#: Listeners in the order clients should prefer them: (listener, kind, implicit TLS).
PREFERENCE = (("imaps", "imap", True), ("imap", "imap", False), ("pop3s", "pop3", True),
              ("pop3", "pop3", False), ("submissions", "smtp", True), ("submission", "smtp", False))
#: RFC 5321 §4.5.3.1: a path is at most 256 octets, a local part 64.
_ADDRESS = re.compile(r"^[^\s\"<>\\@\x00-\x1f\x7f]{1,64}@([A-Za-z0-9.-]{1,253})$")
#: Names a client asks on besides the domain itself (the CNAMEs ``dnsRecords`` names).
_HOST_PREFIXES = ("autoconfig.", "autodiscover.")
_OUTLOOK_RESPONSE = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


@dataclass(frozen=True)
class Service:
    kind: str  # imap, pop3 or smtp
    port: int
    implicitTLS: bool  # False: STARTTLS (always offered: every listener has the certificate)


@dataclass(frozen=True)
class ClientSettings:
    host: str  # the name clients connect to, on the certificate
    services: tuple[Service, ...]

    def preferred(self, kind: str) -> Service | None:
        return next((s for s in self.services if s.kind == kind), None)


def listenerPort(description: str) -> int | None:
    """The TCP port of an endpoint string (``tcp:993``, ``tcp6:port=993:...``); None for
    endpoints without one (``unix:``, ``systemd:``)."""
    fields = re.split(r"(?<!\\):", splitMarked(description)[1])
    if fields[0].lower() not in ("tcp", "tcp6", "ssl"):
        return None
    keywords = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    positional = [f for f in fields[1:] if "=" not in f]
    value = keywords.get("port", positional[0] if positional else "")
    return int(value) if value.isdigit() and 0 < int(value) < 65536 else None


def fromConfig(config) -> ClientSettings | None:
    """What ``[autoconfig]`` asks to serve; None when it is turned off."""
    section = config["autoconfig"]
    if not section["serve"]:
        return None
    return ClientSettings(section["host"] or config.hostname, tuple(services(config)))


def services(config) -> list[Service]:
    """Each configured mail listener clients can use, most preferred first."""
    found = []
    for listener, kind, implicit in PREFERENCE:
        ports = [p for p in map(listenerPort, config.listeners(listener)) if p is not None]
        if ports:
            found.append(Service(kind, ports[0], implicit))
    return found


def addressDomain(address: str) -> str | None:
    """The lower-cased domain of a plausible address, None for anything else."""
    match = _ADDRESS.match(address)
    return match.group(1).lower().rstrip(".") if match else None


def _hostDomain(request) -> str | None:
    host = (request.getHeader(b"host") or b"").decode("ascii", "replace").lower()
    host = host.rsplit(":", 1)[0] if not host.startswith("[") else ""
    for prefix in _HOST_PREFIXES:
        if host.startswith(prefix):
            return host[len(prefix):]
    return host.rstrip(".") or None


def _queryAddress(request) -> str | None:
    value = request.args.get(b"emailaddress", [b""])[0]
    try:
        return value.decode("utf-8") or None
    except UnicodeDecodeError:
        return None


class _ForHostedDomain(ReadOnly):
    def __init__(self, settings: ClientSettings, hosted: Callable[[str], bool]) -> None:
        super().__init__()
        self.settings = settings
        self.hosted = hosted

    def _domain(self, request) -> tuple[str | None, str | None]:
        """(domain, address): from ``?emailaddress=``, else from the Host header."""
        address = _queryAddress(request)
        domain = addressDomain(address) if address else _hostDomain(request)
        if request.postpath or domain is None or not self.hosted(domain):
            return None, None
        return domain, address


class ThunderbirdConfig(_ForHostedDomain):
    """Thunderbird's autoconfig format, version 1.1."""

    def render_GET(self, request) -> bytes:
        domain, _ = self._domain(request)
        if domain is None:
            return notFound(request)
        root = ET.Element("clientConfig", version="1.1")
        provider = ET.SubElement(root, "emailProvider", id=domain)
        for tag in ("domain", "displayName", "displayShortName"):
            ET.SubElement(provider, tag).text = domain
        for service in self.settings.services:
            tag, kind = ("outgoingServer", "smtp") if service.kind == "smtp" else \
                ("incomingServer", service.kind)
            server = ET.SubElement(provider, tag, type=kind)
            for name, text in (("hostname", self.settings.host), ("port", str(service.port)),
                               ("socketType", "SSL" if service.implicitTLS else "STARTTLS"),
                               ("authentication", "password-cleartext"),
                               ("username", "%EMAILADDRESS%")):
                ET.SubElement(server, name).text = text
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)


class AppleProfile(_ForHostedDomain):
    """An unsigned configuration profile for one address (no password in it)."""

    def render_GET(self, request) -> bytes:
        domain, address = self._domain(request)
        imap, smtp = self.settings.preferred("imap"), self.settings.preferred("smtp")
        if domain is None or address is None or imap is None or smtp is None:
            return notFound(request)
        # Stable ids: downloading the profile again replaces it instead of adding a copy.
        ident = uuid.uuid5(uuid.NAMESPACE_URL, f"twistmail:{self.settings.host}:{address.lower()}")
        prefix = ".".join(reversed(self.settings.host.split(".")))
        mail = {
            "PayloadType": "com.apple.mail.managed", "PayloadVersion": 1,
            "PayloadIdentifier": f"{prefix}.mail.{ident}", "PayloadUUID": str(uuid.uuid5(ident, "mail")),
            "PayloadDisplayName": address, "EmailAccountDescription": address,
            "EmailAccountType": "EmailTypeIMAP", "EmailAddress": address,
            "IncomingMailServerHostName": self.settings.host,
            "IncomingMailServerPortNumber": imap.port, "IncomingMailServerUseSSL": imap.implicitTLS,
            "IncomingMailServerUsername": address,
            "IncomingMailServerAuthentication": "EmailAuthPassword",
            "OutgoingMailServerHostName": self.settings.host,
            "OutgoingMailServerPortNumber": smtp.port, "OutgoingMailServerUseSSL": smtp.implicitTLS,
            "OutgoingMailServerUsername": address,
            "OutgoingMailServerAuthentication": "EmailAuthPassword",
            "OutgoingPasswordSameAsIncomingPassword": True,
        }
        profile = {"PayloadType": "Configuration", "PayloadVersion": 1,
                   "PayloadIdentifier": f"{prefix}.profile.{ident}", "PayloadUUID": str(ident),
                   "PayloadDisplayName": f"Mail: {address}", "PayloadContent": [mail]}
        request.setHeader(b"content-type", b"application/x-apple-aspen-config")
        request.setHeader(b"content-disposition",
                          f'attachment; filename="{address}.mobileconfig"'.encode())
        return plistlib.dumps(profile)


def requestedAddress(body: bytes) -> str | None:
    """The ``EMailAddress`` of an Autodiscover request; None if it is not one.

    Plain expat with any DOCTYPE refused, so no entity is ever declared or expanded.
    """
    parser = expat.ParserCreate(namespace_separator=" ")
    path: list[str] = []
    text: list[str] = []

    def refuse(*args) -> None:
        raise ValueError("DOCTYPE")

    def start(name: str, attributes) -> None:
        path.append(name.rsplit(" ", 1)[-1])

    def data(chunk: str) -> None:
        if path[-2:] == ["Request", "EMailAddress"]:
            text.append(chunk)

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = lambda name: path.pop()
    parser.CharacterDataHandler = data
    try:
        parser.Parse(body, True)
    except (expat.ExpatError, ValueError):
        return None
    return "".join(text).strip() or None


class OutlookAutodiscover(resource.Resource):
    """``POST /autodiscover/autodiscover.xml``: one protocol of each kind, the preferred one."""

    isLeaf = True

    def __init__(self, settings: ClientSettings, hosted: Callable[[str], bool]) -> None:
        super().__init__()
        self.settings = settings
        self.hosted = hosted

    def render(self, request) -> bytes:
        if request.method != b"POST":
            return methodNotAllowed(request, b"POST")
        return super().render(request)

    def render_POST(self, request) -> bytes:
        address = requestedAddress(request.content.read())
        if address is None:
            return pages.errorPage(400, "Bad Request", "Not an Autodiscover request.").render(request)
        domain = addressDomain(address)
        if domain is None or not self.hosted(domain):
            return notFound(request)
        root = ET.Element("Autodiscover",
                          xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006")
        account = ET.SubElement(ET.SubElement(root, "Response", xmlns=_OUTLOOK_RESPONSE), "Account")
        ET.SubElement(account, "AccountType").text = "email"
        ET.SubElement(account, "Action").text = "settings"
        for kind in ("imap", "pop3", "smtp"):
            service = self.settings.preferred(kind)
            if service is None:
                continue
            protocol = ET.SubElement(account, "Protocol")
            for name, text in (("Type", kind.upper()), ("Server", self.settings.host),
                               ("Port", str(service.port)), ("LoginName", address),
                               ("DomainRequired", "off"), ("SPA", "off"), ("SSL", "on"),
                               # "TLS" is STARTTLS in Outlook's terms.
                               ("Encryption", "SSL" if service.implicitTLS else "TLS"),
                               ("AuthRequired", "on")):
                ET.SubElement(protocol, name).text = text
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def addTo(root: resource.Resource, settings: ClientSettings, hosted: Callable[[str], bool],
          tree: Callable[[], resource.Resource]) -> None:
    """Put every autoconfig path under C{root}; C{tree()} makes an empty directory node."""

    def child(parent: resource.Resource, name: bytes) -> resource.Resource:
        node = parent.children.get(name)
        if node is None:
            node = tree()
            parent.putChild(name, node)
        return node

    thunderbird = ThunderbirdConfig(settings, hosted)
    child(root, b"mail").putChild(b"config-v1.1.xml", thunderbird)
    child(root, b"mail").putChild(b"profile.mobileconfig", AppleProfile(settings, hosted))
    child(child(child(root, b".well-known"), b"autoconfig"), b"mail").putChild(
        b"config-v1.1.xml", thunderbird)
    outlook = OutlookAutodiscover(settings, hosted)
    for directory, leaf in ((b"autodiscover", b"autodiscover.xml"),
                            (b"Autodiscover", b"Autodiscover.xml")):
        child(root, directory).putChild(leaf, outlook)


def dnsRecords(settings: ClientSettings, domains, webPort: int | None) -> list[str]:
    """SRV records (RFC 6186, RFC 8314 §5.1) and the CNAMEs clients probe, per hosted domain.

    A service we do not offer is published as ``SRV 0 0 0 .`` (RFC 6186 §4), so clients
    do not guess it.  The web records only when a web listener (on C{webPort}) serves us.
    """
    host = settings.host.rstrip(".") + "."
    srv = {("imap", True): ("_imaps", 0), ("imap", False): ("_imap", 5),
           ("pop3", True): ("_pop3s", 10), ("pop3", False): ("_pop3", 20),
           ("smtp", True): ("_submissions", 0), ("smtp", False): ("_submission", 10)}
    offered = {(s.kind, s.implicitTLS): s for s in settings.services}
    records = []
    for domain in sorted(domains):
        for key, (label, priority) in srv.items():
            service = offered.get(key)
            target = f"{priority} 1 {service.port} {host}" if service else "0 0 0 ."
            records.append(f"{label}._tcp.{domain}. IN SRV {target}")
        if webPort is not None:
            records.append(f"autoconfig.{domain}. IN CNAME {host}")
            records.append(f"autodiscover.{domain}. IN CNAME {host}")
            records.append(f"_autodiscover._tcp.{domain}. IN SRV 0 1 {webPort} {host}")
    return records
