# -*- test-case-name: tests.test_config -*-
"""Configuration: TOML file + command-line overrides -> one frozen ``Config``.

Parsing has no side effects (no directories created, no ports bound) so
``twistmail check-config`` and ``twistd`` see exactly the same errors.  Every
error names the file, the key and the fix.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: The embedded default when no --config is given: loopback, unprivileged ports.
DEFAULT_PORTS = {"smtp": 2525, "pop3": 2110, "imap": 2143, "submission": 2587}
DEFAULT_DATA_DIR = "twistmail-data"

#: Protocols whose listeners exist.  A listener for anything else is an error.
IMPLEMENTED_PROTOCOLS = ("smtp", "pop3", "imap")
ALL_PROTOCOLS = ("smtp", "pop3", "imap", "submission")

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


#: section -> key -> Key.  etc/twistmail.toml documents every key (a test checks it).
SCHEMA: dict[str, dict[str, Key]] = {
    "server": {
        "hostname": Key(str, "", "name in banners and Received: headers (default: the FQDN)"),
        "data_dir": Key(str, DEFAULT_DATA_DIR, "accounts, mailboxes and spool live here"),
        "max_connections": Key(int, 1000, "connections in total across all listeners", 1),
        "max_connections_per_ip": Key(int, 50, "connections from one client address", 1),
    },
    "listen": {
        name: Key(list, [f"tcp:{port}:interface=127.0.0.1"] if name in IMPLEMENTED_PROTOCOLS else [],
                  f"Twisted endpoint strings for {name}")
        for name, port in DEFAULT_PORTS.items()
    },
    "smtp": {
        "max_message_size": Key(int, 25 * MiB, "SIZE limit in octets; larger -> 552 5.3.4", 1024),
        "max_recipients": Key(int, 100, "RCPT TO per transaction; more -> 452 4.5.3", 1),
        "max_line_length": Key(int, 2048, "command line limit in octets (RFC 5321: >= 512)", 512),
        "max_data_line_length": Key(int, 64 * KiB, "DATA line limit; longer -> 552 5.3.4", 1000),
        "timeout": Key(int, 300, "idle seconds before 421 (RFC 5321 §4.5.3.2: 5 min)", 1),
        "recipient_delimiter": Key(str, "+", "user+tag@domain delivers to user; '' disables"),
    },
    "pop3": {
        "timeout": Key(int, 600, "idle seconds before disconnect (RFC 1939: >= 10 min)", 1),
        "max_line_length": Key(int, 512, "command line limit in octets (RFC 2449: 255)", 255),
    },
    "imap": {
        "timeout": Key(int, 1800, "idle seconds after login before BYE (RFC 3501: >= 30 min)", 60),
        "login_timeout": Key(int, 60, "idle seconds before login before BYE", 5),
        "max_line_length": Key(int, 64 * KiB, "command line limit in octets (literals apart)", 1000),
        "max_literal_size": Key(int, 64 * KiB, "literal limit outside APPEND; larger -> BAD", 1024),
        "max_message_size": Key(int, 25 * MiB, "APPEND limit (APPENDLIMIT); larger -> NO [TOOBIG]",
                                1024),
        "special_use": Key(dict, dict(DEFAULT_SPECIAL_USE),
                           "folder = RFC 6154 attribute; created and subscribed at login"),
    },
    "storage": {
        "backend": Key(str, "maildir", "mailbox backend plugin name"),
    },
    "accounts": {
        "reload_interval": Key(int, 1, "seconds between checks for CLI account changes", 1),
    },
}


class ConfigError(Exception):
    """A configuration problem, phrased for the sysadmin: file, key, fix."""


@dataclass(frozen=True)
class Config:
    """Validated configuration.  ``sections[section][key]`` holds every key of SCHEMA."""

    path: str
    sections: MappingProxyType
    #: ``[storage.<name>]`` tables, unvalidated: the backend plugin named <name> checks them.
    backendOptions: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

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


def _fail(path: str, where: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {problem}. Fix: {fix}")


def _check(path: str, section: str, key: str, value: Any) -> Any:
    spec = SCHEMA[section][key]
    where = f"[{section}] {key}"
    if spec.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(path, where, f"expected an integer, got {value!r}", f"write e.g. {key} = {spec.default}")
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
                        f'write e.g. {key} = ["tcp:25"]')
    if spec.minimum is not None and value < spec.minimum:
        raise _fail(path, where, f"{value} is below the minimum {spec.minimum}",
                    f"use a value of at least {spec.minimum}")
    return value


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
            if section == "storage" and isinstance(value[key], dict):
                continue  # [storage.<backend>]: options for that backend plugin
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

    for protocol in ALL_PROTOCOLS:
        if sections["listen"][protocol] and protocol not in IMPLEMENTED_PROTOCOLS:
            fromCommandLine = protocol in (overrides or {}).get("listen", {})
            raise _fail("command line" if fromCommandLine else shown, f"[listen] {protocol}",
                        f"{protocol} is not implemented in this version of twistmail",
                        f"remove the {protocol} listener (available: {', '.join(IMPLEMENTED_PROTOCOLS)})")

    if not sections["server"]["hostname"]:
        import socket

        sections["server"]["hostname"] = socket.getfqdn() or "localhost"
    frozen = {name: MappingProxyType(values) for name, values in sections.items()}
    backendOptions = {name: MappingProxyType(table) for name, table in raw.get("storage", {}).items()
                      if isinstance(table, dict)}
    return Config(path=shown, sections=MappingProxyType(frozen),
                  backendOptions=MappingProxyType(backendOptions))
