# -*- test-case-name: tests.test_config -*-
"""Configuration: TOML file + command-line overrides -> one frozen ``Config``.

Parsing has no side effects (no directories created, no ports bound) so
``twistmail check-config`` and ``twistd`` see exactly the same errors.  Every
error names the file, the key and the fix.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from twistmail import mtasts
from twistmail._dnsname import isHostName

#: The embedded default when no --config is given: loopback, unprivileged ports
#: (the standard ones are 25, 587, 465, 110, 995, 143 and 993).
DEFAULT_PORTS = {"smtp": 2525, "submission": 2587, "submissions": 2465, "pop3": 2110,
                 "pop3s": 2995, "imap": 2143, "imaps": 2993}
DEFAULT_DATA_DIR = "twistmail-data"

ALL_PROTOCOLS = tuple(DEFAULT_PORTS)
#: A metrics listener on loopback (9325: unassigned in Prometheus' port allocations list).
METRICS_EXAMPLE = "tcp:9325:interface=127.0.0.1"
#: Where load balancers live: loopback and the private ranges (RFC 1918, RFC 4193).
PRIVATE_NETWORKS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                    "fc00::/7")
#: Listeners that speak TLS from the first byte (RFC 8314) instead of offering STARTTLS.
IMPLICIT_TLS = {"submissions": "submission", "pop3s": "pop3", "imaps": "imap"}

#: Let's Encrypt's production directory (RFC 8555 §7.1.1).
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"

KiB = 1024
MiB = 1024 * KiB
#: Dovecot's default special-use folders (RFC 6154), created at login if missing.
DEFAULT_SPECIAL_USE = {"Drafts": "\\Drafts", "Sent": "\\Sent", "Trash": "\\Trash",
                       "Junk": "\\Junk", "Archive": "\\Archive"}
SPECIAL_USE_ATTRIBUTES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent",
                          "\\Trash")


@dataclass(frozen=True)
class Key:
    type: type | tuple
    default: Any
    doc: str
    minimum: int | None = None
    #: for strings: the only values allowed
    choices: tuple = ()
    #: raises ValueError(problem) for a value of the right type that still makes no sense
    validate: Callable[[Any], None] | None = None
    #: shown in the "Fix:" of a type error
    example: str = ""


def hostPort(value: str, defaultPort: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address -> (host, port).

    @raise ValueError: with what is wrong.
    """
    host, port = value, defaultPort
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not [address]:port")
        if rest:
            port = _port(value, rest[1:])
    elif value.count(":") == 1:
        host, _, portText = value.partition(":")
        port = _port(value, portText)
    if not host:
        raise ValueError(f"{value!r} has no host")
    return host, port


def _port(value: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return int(text)


def _addresses(values: list[str]) -> None:
    for value in values:
        local, at, domain = str(value).rpartition("@")
        if not at or not local or not domain:
            raise ValueError(f"{value!r} is not an address: write it as user@domain")


def _networks(values: list[str]) -> None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not a network in CIDR notation") from None


def _endpoints(values: list[str]) -> None:
    """Parse each endpoint string now, so a typo fails with the key that holds it."""
    from twisted.internet import endpoints  # parses without a reactor; installs none

    for value in values:
        try:
            endpoints.serverFromString(None, value)
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise ValueError(f"bad endpoint {value!r} ({e})") from None


def offLoopback(endpoint: str) -> bool:
    """Whether C{endpoint} would listen beyond this host: on any address but loopback
    (``tcp:9325`` alone binds every interface).  A UNIX socket is local.  Found by
    listening on a reactor that only records (nothing is bound)."""
    from twisted.internet import endpoints
    from twisted.internet.testing import MemoryReactor

    recorder = MemoryReactor()
    endpoints.serverFromString(recorder, endpoint).listen(None)
    bound = [server[3] for server in recorder.tcpServers + recorder.sslServers]
    if not bound and not recorder.unixServers:
        return True  # another kind (systemd:, a plugin's): cannot tell, so not loopback
    for interface in bound:
        try:
            if not ipaddress.ip_address(interface).is_loopback:
                return True
        except ValueError:  # "" (every interface), or a host name
            return True
    return False


def _nameservers(values: list[str]) -> None:
    for value in values:
        host, _ = hostPort(value, 53)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: a name server is an IP address (with an optional port)") from None


def _smarthost(value: str) -> None:
    if value:
        hostPort(value, 25)


def _mxPatterns(values: list[str]) -> None:
    """Checked by the parser senders use on our policy (RFC 8461 §3.2 / §4.1)."""
    for value in values:
        if not mtasts.validMX(value):
            raise ValueError(f"{value!r} is not a host name or *.domain (no trailing dot)")


def _hostNames(values: list[str]) -> None:
    for value in values:
        if not isHostName(value, minLabels=2):
            raise ValueError(f"{value!r} is not a host name")


def _allowEntries(values: list[str]) -> None:
    from twistmail.filters.allowlist import parseEntries

    parseEntries(values)


def _maxAge(value: int) -> None:
    if value > mtasts.MAX_AGE_LIMIT:
        raise ValueError(f"{value} is above {mtasts.MAX_AGE_LIMIT} (one year, RFC 8461 §3.2)")


#: Sections whose ``[section.<name>]`` tables belong to the plugin called <name>.
PLUGIN_SECTIONS = ("storage", "filters")
#: ``[filters.<name>]`` keys the filter engine reads itself (not passed to the plugin):
#: seconds one hook of the filter may take, and what a failure or timeout means
#: (Postfix's milter_default_action; tempfail is its default too).
FILTER_TIMEOUT = 30.0
FILTER_ON_FAILURE = ("tempfail", "accept")


def _filterNames(values: list[str]) -> None:
    if len(set(values)) != len(values):
        raise ValueError(f"{values!r} names a filter twice")


#: section -> key -> Key.  etc/twistmail.toml documents every key (a test checks it).
SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "hostname": Key(str, "", "name in banners and Received: headers (default: the FQDN)"),
        "data_dir": Key(str, DEFAULT_DATA_DIR, "accounts, mailboxes and spool live here"),
        "max_connections": Key(int, 1000, "connections in total across all listeners", 1),
        "max_connections_per_ip": Key(int, 50, "connections from one client address", 1),
        "proxy_networks": Key(list, list(PRIVATE_NETWORKS),
                              "load balancers (CIDR) whose PROXY header a haproxy: listener "
                              "accepts; others are closed", validate=_networks,
                              example='["10.0.0.5/32"]'),
        "reuse_port": Key(bool, False, "tcp: listeners set SO_REUSEPORT, so several twistmail "
                          "processes on this host share their ports"),
    },
    "listen": {
        **{name: Key(list, [f"tcp:{port}:interface=127.0.0.1"],
                     f"Twisted endpoint strings for {name}; [] or \"none\" = off",
                     validate=_endpoints, example=f'["tcp:{port}:interface=127.0.0.1"]')
           for name, port in DEFAULT_PORTS.items()},
        "https": Key(list, [], "web listeners with TLS (the [tls] certificate): MTA-STS policy",
                     validate=_endpoints, example='["tcp:443"]'),
        "http": Key(list, [], "plain web listeners, e.g. behind a reverse proxy",
                    validate=_endpoints, example='["tcp:8080:interface=127.0.0.1"]'),
        "metrics": Key(list, [], "Prometheus /metrics listeners, on loopback (see [metrics])",
                       validate=_endpoints, example=f'["{METRICS_EXAMPLE}"]'),
    },
    "metrics": {
        "allow_non_loopback": Key(bool, False, "let [listen] metrics bind addresses other "
                                  "than loopback (then firewall it)"),
    },
    "filters": {
        "inbound": Key(list, ["dnsbl", "greylist", "spf-dkim-dmarc"], "message filters on the MX "
                       "port, in order (names of filter "
                       "plugins; options in [filters.<name>])", validate=_filterNames,
                       example='["spf-dkim-dmarc"]'),
        "submission": Key(list, ["dkim-sign"], "message filters for authenticated submission, "
                          "in order",
                          validate=_filterNames, example='["dkim-sign"]'),
    },
    "smtp": {
        "max_message_size": Key(int, 25 * MiB, "SIZE limit in octets; larger -> 552 5.3.4", 1024),
        "max_recipients": Key(int, 100, "RCPT TO per transaction; more -> 452 4.5.3", 1),
        "max_line_length": Key(int, 2048, "command line limit in octets (RFC 5321: >= 512)", 512),
        "max_data_line_length": Key(int, 64 * KiB, "DATA line limit; longer -> 552 5.3.4", 1000),
        "timeout": Key(int, 300, "idle seconds before 421 (RFC 5321 §4.5.3.2: 5 min)", 1),
        "recipient_delimiter": Key(str, "+", "user+tag@domain delivers to user; '' disables"),
        "auth": Key(bool, False, "offer AUTH on the MX port too (authenticated users relay)"),
    },
    "submission": {
        "require_own_sender": Key(bool, True, "MAIL FROM must be the user's address or alias"),
        # Per authenticated user (on submission, and on port 25 with [smtp] auth), then
        # per domain of the account: past one, MAIL or RCPT gets 451 4.7.1.
        "max_messages_per_hour": Key(int, 100, "messages one authenticated user may send in "
                                     "any hour; 0 = unlimited", 0),
        "max_recipients_per_hour": Key(int, 500, "recipients (accepted RCPT TO) one user may "
                                       "send to in any hour; 0 = unlimited", 0),
        "received_client_address": Key(bool, True, "an authenticated user's HELO name and IP "
                                       "address in the Received: header; false leaves them out "
                                       "for privacy"),
        "domain_max_messages_per_hour": Key(int, 1000, "messages all users of one domain may "
                                            "send in any hour; 0 = unlimited", 0),
        "domain_max_recipients_per_hour": Key(int, 5000, "recipients all users of one domain "
                                              "may send to in any hour; 0 = unlimited", 0),
    },
    "tls": {
        "certificate": Key(str, "", "PEM certificate, then its chain; '' = self-signed, generated"),
        "key": Key(str, "", "PEM private key of the certificate"),
        "acme": Key(bool, False, "obtain and renew the certificate from an ACME CA (HTTP-01 on "
                    "[listen] http, else TLS-ALPN-01 on https); agrees to the CA's terms of "
                    "service"),
        "acme_directory": Key(str, LETS_ENCRYPT, "the ACME CA's directory URL (https://)"),
        "acme_email": Key(str, "", "contact address given to the CA; '' = none"),
        "acme_names": Key(list, [], "names the certificate covers besides the host name and "
                          "the web names", validate=_hostNames, example='["www.example.org"]'),
        "acme_ca_file": Key(str, "", "PEM CA certificates that verify the ACME directory's "
                            "HTTPS; '' = the system trust store (change only for tests)"),
        "acme_renew_before": Key(int, 30, "days before expiry a certificate is renewed", 1),
        "acme_retry_min": Key(int, 60, "seconds before retrying a failed order; doubles per "
                              "failure", 1),
        "acme_retry_max": Key(int, 86400, "longest wait between retries, in seconds", 1),
    },
    "auth": {
        "plaintext_networks": Key(list, [],
                                  "clients (CIDR) that may send passwords without TLS, besides "
                                  "the listener's own address",
                                  validate=_networks, example='["192.0.2.0/24"]'),
        "failure_delay": Key(float, 2.0, "seconds before a first failed login is answered; "
                             "doubles with each recent failure of the address or account", 0),
        "max_delay": Key(float, 15.0, "the longest a failed login waits (Dovecot: 15)", 0),
        "max_failures": Key(int, 5, "failed logins from one client address within "
                            "failure_window that block it (loopback never)", 1),
        "failure_window": Key(int, 600, "seconds over which failed logins are counted", 1),
        "block_time": Key(int, 600, "seconds a blocked client address is refused unchecked", 1),
    },
    "pop3": {
        "timeout": Key(int, 600, "idle seconds before disconnect (RFC 1939: >= 10 min)", 1),
        "max_line_length": Key(int, 512, "command line limit in octets (RFC 2449: 255)", 255),
    },
    "imap": {
        "timeout": Key(int, 1800, "idle seconds after login before BYE (RFC 3501: >= 30 min)", 60),
        "login_timeout": Key(int, 60, "idle seconds before login before BYE", 1),
        "max_line_length": Key(int, 64 * KiB, "command line limit in octets (literals apart)", 1000),
        "max_literal_size": Key(int, 64 * KiB, "literal limit outside APPEND; larger -> BAD", 1024),
        "max_message_size": Key(int, 25 * MiB, "APPEND limit (APPENDLIMIT); larger -> NO [TOOBIG]",
                                1024),
        "special_use": Key(dict, dict(DEFAULT_SPECIAL_USE),
                           "folder = RFC 6154 attribute; created and subscribed at login"),
    },
    "autoconfig": {
        "serve": Key(bool, True, "serve mail client autoconfiguration (Thunderbird, Outlook, "
                     "Apple) on the web listeners"),
        "host": Key(str, "", "host name clients connect to (on the certificate); '' = "
                    "[server] hostname"),
    },
    "mta_sts": {
        "mode": Key(str, "", "our MTA-STS policy (RFC 8461): testing, enforce, none "
                    "(withdraws it) or '' (not served)",
                    choices=("testing", "enforce", "none", "")),
        "mx": Key(list, [], "MX host names (or *.example.org) senders may deliver to",
                  validate=_mxPatterns, example='["mail.example.org"]'),
        "max_age": Key(int, 604800, "seconds senders cache the policy (RFC 8461 §3.2: weeks)",
                       86400, validate=_maxAge),
    },
    "admin": {
        "enabled": Key(bool, False, "serve the web admin at /admin/ on the web listeners (https, "
                       "or http from loopback only)"),
        "admins": Key(list, [], "users (full addresses) who may administer; every other user "
                      "may only change their own password", validate=_addresses,
                      example='["postmaster@example.org"]'),
        "session_idle": Key(int, 1800, "seconds a web admin session lasts without a request", 60),
    },
    "storage": {
        "backend": Key(str, "maildir", "mailbox backend plugin name"),
    },
    "accounts": {
        "reload_interval": Key(int, 1, "seconds between checks for CLI account changes", 1),
        "default_quota": Key(int, 0, "octets of mail a user may keep (IMAP QUOTA; SMTP 452 4.2.2 "
                             "when full); 0 = no limit; per user: twistmail user quota", 0),
        "default_quota_messages": Key(int, 0, "messages a user may keep; 0 = no limit", 0),
    },
    "relay": {
        "trusted_networks": Key(list, [], "clients (CIDR) that may relay to other domains; [] = none",
                                validate=_networks, example='["127.0.0.0/8", "::1/128"]'),
        "smtp_port": Key(int, 25, "TCP port of remote MX hosts", 1),
        "nameservers": Key(list, [], "DNS servers as host or host:port; [] = /etc/resolv.conf",
                           validate=_nameservers, example='["127.0.0.1:53"]'),
        "dns_timeout": Key(int, 10, "seconds for one DNS lookup before a temporary failure", 1),
        "connect_timeout": Key(int, 30, "seconds to connect to one MX address", 1),
        "command_timeout": Key(int, 300, "seconds to wait for each SMTP reply (RFC 5321 §4.5.3.2)", 1),
        "max_deliveries": Key(int, 100, "outbound SMTP deliveries at once, in total", 1),
        "max_deliveries_per_domain": Key(int, 20, "outbound SMTP deliveries at once per domain", 1),
        "max_recipients_per_transaction": Key(int, 50, "RCPT TO per outbound transaction", 1),
        "connection_reuse": Key(bool, True, "carry several messages to one destination over one "
                                "connection (Postfix's connection cache)"),
        "connection_cache_time": Key(float, 2.0, "seconds an idle outbound connection waits for "
                                     "the next message (Postfix: 2)", 0.1),
        "max_messages_per_connection": Key(int, 100, "messages over one outbound connection at "
                                           "most (Postfix: 100)", 1),
        "retry_min": Key(int, 300, "seconds before the first retry; doubles per attempt", 1),
        "retry_max": Key(int, 4000, "longest wait between retries, in seconds", 1),
        "max_queue_lifetime": Key(int, 5 * 86400, "seconds before undeliverable mail bounces", 1),
        "delay_warning_time": Key(int, 0, "seconds a message waits before its sender gets a "
                                  "'delayed' report (RFC 3464; NOTIFY=DELAY); 0 = never, as "
                                  "Postfix ships delay_warning_time", 0),
        "pickup_interval": Key(int, 1, "seconds between checks for sendmail and queue commands", 1),
        "queue": Key(str, "disk", "where the relay queue lives: disk (<data_dir>/queue) or "
                     "postgresql (the [storage.postgresql] database, shared by every node)",
                     choices=("disk", "postgresql")),
        "queue_lease_time": Key(int, 300, "seconds a node holds a message of the postgresql "
                                "queue without renewing; then another node may deliver it", 5),
        "smarthost": Key(str, "", "host:port to send all outbound mail through; '' = MX lookup",
                         validate=_smarthost),
        "smarthost_username": Key(str, "", "AUTH user name for the smarthost; '' = no AUTH"),
        "smarthost_password": Key(str, "", "AUTH password for the smarthost (never logged)"),
        "smarthost_tls": Key(str, "required", "TLS to the smarthost: required (STARTTLS, "
                             "verified), implicit (SMTPS, port 465, verified) or opportunistic",
                             choices=("required", "implicit", "opportunistic")),
        "smarthost_ca_file": Key(str, "", "PEM CA certificates to verify the smarthost; "
                                 "'' = the system trust store"),
        "tlsrpt_mail": Key(bool, False, "mail each finished day's TLS-RPT report (RFC 8460) to "
                           "the mailto: addresses in the domain's _smtp._tls TXT record"),
        "tlsrpt_max_mails_per_day": Key(int, 1000, "TLS-RPT report mails queued per day at most; "
                                        "the rest wait for the next day", 1),
        "mta_sts": Key(bool, True, "apply recipient domains' MTA-STS policies (RFC 8461) to MX "
                       "delivery: enforce means verified TLS to a listed MX or no delivery"),
        "mta_sts_port": Key(int, 443, "HTTPS port of mta-sts.<domain> (change only for tests)", 1),
        "mta_sts_ca_file": Key(str, "", "PEM CA certificates that verify mta-sts.<domain> and MX "
                               "hosts under a policy; '' = the system trust store"),
        "mta_sts_timeout": Key(int, 30, "seconds to fetch one MTA-STS policy over HTTPS", 1),
    },
    "antispam": {
        # The usual lists are shown in etc/twistmail.toml; most refuse queries that come
        # through public resolvers (8.8.8.8, 1.1.1.1): use a resolver of your own.
        "dnsbl": Key(list, [], "DNS block list zones checked at connect; a listed client gets "
                     "554 5.7.1; [] = off", validate=_hostNames, example='["zen.spamhaus.org"]'),
        "allow": Key(list, [], "networks (CIDR), addresses and domains (sender or recipient) "
                     "that DNSBL and greylisting skip", validate=_allowEntries,
                     example='["192.0.2.0/24", "example.org", "postmaster@example.net"]'),
        "greylist": Key(bool, False, "greylist (RFC 6647): 450 4.2.0 at the first RCPT of a new "
                        "client /24 (/64), sender and recipient"),
        "greylist_delay": Key(int, 300, "seconds before a retry is accepted (postgrey: 300)", 1),
        "greylist_retry_window": Key(int, 2 * 86400, "seconds within which the first retry must "
                                     "come, else it starts over (postgrey: 2 days)", 60),
        "greylist_max_age": Key(int, 35 * 86400, "seconds a passed triplet and an allow-listed "
                                "client are remembered since last seen (postgrey: 35 days)", 3600),
        "greylist_auto_allow": Key(int, 5, "retries passed by one client network after which it "
                                   "is no longer greylisted (postgrey: 5); 0 = never", 0),
    },
}

#: Keys an earlier version had, with what to do instead: named, not "unknown key".
REMOVED: dict[tuple[str, str], str] = {
    ("auth", "lockout"): "accounts are no longer locked out (that let anyone lock out any user); "
                         "delete it, and set block_time for how long a failing client address "
                         "is blocked",
}

_TCP_EXAMPLE = '["tcp:25"]'
_HOST_EXAMPLE = '"mx.example.org:25"'

#: Values check-config never prints: (section, key); a plugin table's section is
#: ``"filters.<name>"`` or ``"storage.<name>"``.
SECRETS = {("relay", "smarthost_password"), ("filters.rspamd", "password")}


class ConfigError(Exception):
    """A configuration problem, phrased for the sysadmin: file, key, fix."""


@dataclass(frozen=True)
class Config:
    """Validated configuration.  ``sections[section][key]`` holds every key of SCHEMA."""

    path: str
    sections: MappingProxyType
    #: ``[storage.<name>]`` tables, unvalidated: the backend plugin named <name> checks them.
    backendOptions: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    #: ``[filters.<name>]`` tables: ``timeout`` and ``on_failure`` checked here, the rest
    #: by the filter plugin named <name>.
    filterTables: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def __getitem__(self, section: str) -> MappingProxyType:
        return self.sections[section]

    @property
    def dataDir(self) -> str:
        return self.sections["server"]["data_dir"]

    @property
    def hostname(self) -> str:
        return self.sections["server"]["hostname"]

    def listeners(self, protocol: str) -> list[str]:
        return list(self.sections["listen"][protocol])

    def storageOptions(self) -> dict:
        """The ``[storage.<backend>]`` table of the configured backend (a copy)."""
        return dict(self.backendOptions.get(self.sections["storage"]["backend"], {}))

    def filterOptions(self, name: str) -> dict:
        """The ``[filters.<name>]`` table for the plugin: without timeout and on_failure."""
        return {k: v for k, v in self.filterTables.get(name, {}).items()
                if k not in ("timeout", "on_failure")}

    def filterSettings(self, name: str) -> tuple[float, str]:
        """(timeout, on_failure) of filter C{name}, the engine's part of its table."""
        table = self.filterTables.get(name, {})
        return float(table.get("timeout", FILTER_TIMEOUT)), table.get("on_failure", "tempfail")


def _fail(path: str, where: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {problem}. Fix: {fix}")


def _check(path: str, section: str, key: str, value: Any) -> Any:
    spec = SCHEMA[section][key]
    where = f"[{section}] {key}"
    if spec.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(path, where, f"expected an integer, got {value!r}", f"write e.g. {key} = {spec.default}")
    if spec.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, where, f"expected a number, got {value!r}",
                        f"write e.g. {key} = {spec.default}")
        value = float(value)
    if spec.type is bool and not isinstance(value, bool):
        raise _fail(path, where, f"expected true or false, got {value!r}",
                    f"write e.g. {key} = {'true' if spec.default else 'false'}")
    if spec.type is str and not isinstance(value, str):
        raise _fail(path, where, f"expected a string, got {value!r}", f'write e.g. {key} = "{spec.default}"')
    if spec.type is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _fail(path, where, f"expected a table of strings, got {value!r}",
                        f'write [{section}.{key}] with lines like Sent = "\\\\Sent"')
        if key == "special_use":
            bad = [v for v in value.values() if v not in SPECIAL_USE_ATTRIBUTES]
            if bad:
                raise _fail(path, where, f"{bad[0]!r} is not a special-use attribute",
                            f"use one of {' '.join(SPECIAL_USE_ATTRIBUTES)}")
        value = dict(value)
    if spec.type is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(path, where, f"expected a list of strings, got {value!r}",
                        f"write e.g. {key} = {spec.example or _TCP_EXAMPLE}")
    if spec.validate is _endpoints and "none" in value:
        if value != ["none"]:
            raise _fail(path, where, f"'none' turns {key} off and cannot go with endpoints",
                        f'write either {key} = "none" or a list of endpoints')
        value = []
    if spec.minimum is not None and value < spec.minimum:
        raise _fail(path, where, f"{value} is below the minimum {spec.minimum}",
                    f"use a value of at least {spec.minimum}")
    if spec.choices and value not in spec.choices:
        raise _fail(path, where, f"{value!r} is not one of {', '.join(spec.choices)}",
                    f'write e.g. {key} = "{spec.choices[0]}"')
    if spec.validate is not None:
        try:
            spec.validate(value)
        except ValueError as e:
            raise _fail(path, where, str(e),
                        f"write e.g. {key} = {spec.example or _HOST_EXAMPLE}") from None
    return value


def _checkRelay(shown: str, path: str | None, relay: dict) -> None:
    """Rules that involve more than one [relay] key."""
    if relay["retry_max"] < relay["retry_min"]:
        raise _fail(shown, "[relay] retry_max", f"{relay['retry_max']} is below retry_min "
                    f"({relay['retry_min']})", "make retry_max at least retry_min")
    if relay["smarthost_username"] or relay["smarthost_password"]:
        if not relay["smarthost"]:
            raise _fail(shown, "[relay] smarthost_username", "credentials without a smarthost",
                        'set smarthost = "host:port", or remove the credentials')
        if not (relay["smarthost_username"] and relay["smarthost_password"]):
            raise _fail(shown, "[relay] smarthost_password", "AUTH needs both a user name and a "
                        "password", "set both smarthost_username and smarthost_password")
        if relay["smarthost_tls"] == "opportunistic":
            # Never send a password over a connection that may be plaintext or intercepted.
            raise _fail(shown, "[relay] smarthost_tls", "AUTH credentials are only sent over "
                        "verified TLS", 'set smarthost_tls = "required" (or "implicit" for '
                        'port 465)')
    for key in ("smarthost_ca_file", "mta_sts_ca_file"):
        _checkCaFile(shown, path, "relay", relay, key)


def _checkCaFile(shown: str, path: str | None, section: str, values: dict, key: str) -> None:
    """A CA file named relative to the config file, and there."""
    caFile = values[key]
    if not caFile:
        return
    if path is not None and not os.path.isabs(caFile):
        caFile = values[key] = os.path.join(os.path.dirname(os.path.abspath(path)), caFile)
    if not os.path.isfile(caFile):
        raise _fail(shown, f"[{section}] {key}", f"{caFile} is not a file",
                    "give the path of a PEM file of CA certificates, or remove the key")


def _checkAcme(shown: str, path: str | None, sections: dict) -> None:
    """Rules for [tls] acme, which involve [listen] too."""
    tls = sections["tls"]
    if tls["acme_retry_max"] < tls["acme_retry_min"]:
        raise _fail(shown, "[tls] acme_retry_max", f"{tls['acme_retry_max']} is below "
                    f"acme_retry_min ({tls['acme_retry_min']})",
                    "make acme_retry_max at least acme_retry_min")
    _checkCaFile(shown, path, "tls", tls, "acme_ca_file")
    if not tls["acme"]:
        return
    if tls["certificate"]:
        raise _fail(shown, "[tls] acme", "the certificate comes from ACME, yet [tls] "
                    "certificate names one", "remove [tls] certificate and key, or set acme = false")
    if not (sections["listen"]["http"] or sections["listen"]["https"]):
        # RFC 8555 §8.3: the CA fetches http://<name>/.well-known/acme-challenge/ on port 80;
        # RFC 8737 §3: or it makes a TLS handshake to port 443.
        raise _fail(shown, "[tls] acme", "the CA checks the names on a web listener: port 80 "
                    "(HTTP-01) or 443 (TLS-ALPN-01)",
                    'set [listen] http = ["tcp:80"] or https = ["tcp:443"], or acme = false')
    if not tls["acme_directory"].startswith("https://"):
        raise _fail(shown, "[tls] acme_directory", f"{tls['acme_directory']!r} is not an "
                    "https:// URL (RFC 8555 §6.1)", f'write e.g. acme_directory = "{LETS_ENCRYPT}"')
    email = tls["acme_email"]
    if email and (email.count("@") != 1 or not email.isprintable() or " " in email
                  or not all(email.split("@"))):
        raise _fail(shown, "[tls] acme_email", f"{email!r} is not an email address",
                    'write e.g. acme_email = "postmaster@example.org", or ""')


def load(path: str | None = None, overrides: dict | None = None) -> Config:
    """Read C{path} (or the embedded default) and apply C{overrides}.

    @param overrides: ``{section: {key: value}}`` from the command line; they win
        over the file.
    @raise ConfigError: with file, key and fix.
    """
    raw: dict = {}
    shown = path or "<embedded default>"
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise _fail(path, "file", "not found", "pass an existing file to --config") from None
        except tomllib.TOMLDecodeError as e:
            raise _fail(path, "syntax", str(e), "correct the TOML syntax at that line") from None
        except UnicodeDecodeError as e:
            raise _fail(path, "encoding", f"not UTF-8 (byte {e.start})",
                        "save the file as UTF-8 (TOML requires it)") from None
        except OSError as e:
            raise _fail(path, "file", e.strerror or str(e), "check the path and its permissions") from None

    sections: dict[str, dict] = {}
    for section, value in raw.items():
        if section not in SCHEMA:
            raise _fail(shown, f"[{section}]", "unknown section",
                        f"use one of {', '.join(sorted(SCHEMA))}")
        if not isinstance(value, dict):
            raise _fail(shown, section, "expected a [section] table", f"write [{section}] on its own line")
        for key in value:
            if section in PLUGIN_SECTIONS and isinstance(value[key], dict):
                continue  # [storage.<backend>], [filters.<name>]: options for that plugin
            if (section, key) in REMOVED:
                raise _fail(shown, f"[{section}] {key}", "no longer exists", REMOVED[section, key])
            if key not in SCHEMA[section]:
                raise _fail(shown, f"[{section}] {key}", "unknown key",
                            f"use one of {', '.join(sorted(SCHEMA[section]))}")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        merged = {}
        for key, spec in keys.items():
            value = given.get(key, spec.default)
            value = _check(shown, section, key, value)
            merged[key] = value
        sections[section] = merged
    if path is not None and not os.path.isabs(sections["server"]["data_dir"]):
        # A relative data_dir in a config file means relative to that file, not to
        # wherever twistd happened to be started.
        base = os.path.dirname(os.path.abspath(path))
        sections["server"]["data_dir"] = os.path.join(base, sections["server"]["data_dir"])
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            sections[section][key] = _check("command line", section, key, value)
    sections["server"]["data_dir"] = os.path.abspath(sections["server"]["data_dir"])

    for key in ("certificate", "key"):
        value = sections["tls"][key]
        if value and path is not None and not os.path.isabs(value):
            sections["tls"][key] = os.path.join(os.path.dirname(os.path.abspath(path)), value)
    if bool(sections["tls"]["certificate"]) != bool(sections["tls"]["key"]):
        raise _fail(shown, "[tls] certificate", "a certificate needs its key and a key its "
                    "certificate", "set both [tls] certificate and [tls] key, or neither")

    _checkRelay(shown, path, sections["relay"])
    _checkAcme(shown, path, sections)
    if not sections["metrics"]["allow_non_loopback"]:
        for endpoint in sections["listen"]["metrics"]:
            if offLoopback(endpoint):
                # Counters name no user, but they tell anyone who can read them how
                # busy the server is and whether guessing passwords gets blocked.
                raise _fail(shown, "[listen] metrics", f"\"{endpoint}\" is not on a loopback "
                            "interface, and metrics are for this host only",
                            f'bind it to loopback, e.g. metrics = ["{METRICS_EXAMPLE}"], or '
                            "set [metrics] allow_non_loopback = true and firewall the port")
    if sections["admin"]["enabled"] and not (sections["listen"]["https"]
                                             or sections["listen"]["http"]):
        raise _fail(shown, "[admin] enabled", "the web admin is served on the web listeners, "
                    "and there is none", 'set [listen] https = ["tcp:443"] (or http on '
                    '127.0.0.1 behind a TLS proxy), or enabled = false')
    if sections["mta_sts"]["mode"] in ("testing", "enforce") and not sections["mta_sts"]["mx"]:
        # RFC 8461 §3.2: a testing or enforce policy lists the MX hosts it allows.
        raise _fail(shown, "[mta_sts] mx", f"mode {sections['mta_sts']['mode']!r} needs the MX "
                    "host names", 'write e.g. mx = ["mail.example.org"], or mode = ""')

    if not sections["server"]["hostname"]:
        import socket

        sections["server"]["hostname"] = socket.getfqdn() or "localhost"
    if sections["tls"]["acme"] and not isHostName(sections["server"]["hostname"], minLabels=2):
        # The host name is the certificate's first name: a CA certifies only names in DNS.
        raise _fail(shown, "[server] hostname", f"{sections['server']['hostname']!r} is not a "
                    "fully qualified domain name a CA can certify ([tls] acme)",
                    'write e.g. hostname = "mail.example.org"')
    frozen = {name: MappingProxyType(values) for name, values in sections.items()}
    tables = {section: {name: MappingProxyType(table)
                        for name, table in raw.get(section, {}).items() if isinstance(table, dict)}
              for section in PLUGIN_SECTIONS}
    for name, table in tables["filters"].items():
        _checkFilterTable(shown, name, table)
    return Config(path=shown, sections=MappingProxyType(frozen),
                  backendOptions=MappingProxyType(tables["storage"]),
                  filterTables=MappingProxyType(tables["filters"]))


def _checkFilterTable(shown: str, name: str, table) -> None:
    """The keys of ``[filters.<name>]`` the engine reads."""
    timeout = table.get("timeout", FILTER_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise _fail(shown, f"[filters.{name}] timeout", f"{timeout!r} is not a positive number "
                    "of seconds", f"write e.g. timeout = {FILTER_TIMEOUT:g}")
    onFailure = table.get("on_failure", "tempfail")
    if onFailure not in FILTER_ON_FAILURE:
        raise _fail(shown, f"[filters.{name}] on_failure", f"{onFailure!r} is not one of "
                    f"{', '.join(FILTER_ON_FAILURE)}", 'write on_failure = "tempfail" (the client '
                    'retries later) or "accept" (the message goes on unfiltered)')
