# -*- test-case-name: tests.test_cli -*-
"""``twistmail``: the admin command line (domains, users, aliases, queue, sendmail, config check).

Global options come before the subcommand, as with git:
``twistmail --data-dir DIR user add alice@example.org``.  Output is a table;
every failure prints one line saying what to do and exits non-zero.
Passwords are read from a prompt, or from stdin when it is not a terminal,
never from argv (which any local user can read in ps).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence

from twistmail import __version__, dnsrecords, ownership
from twistmail import config as configmod
from twistmail.auth.accounts import AccountBook, AccountError, describeQuota, parseQuota
from twistmail.auth.backends import openAccounts, redactDsn
from twistmail.auth.passwords import hashPassword
from twistmail.cli import accountsmigrate, senders, sendmail
from twistmail.cli import db as dbcli
from twistmail.cli import dkim as dkimcli
from twistmail.cli import queue as queuecli
from twistmail.cli import records as recordscli
from twistmail.cli.output import table
from twistmail.dkimkeys import DKIMKeyError
from twistmail.errors import StorageError
from twistmail.ratelimit import StateError


class CLIError(Exception):
    """Printed as 'twistmail: error: ...' with exit status 1."""


def readPassword(stdin=None) -> str:
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != first:
            raise CLIError("the passwords differ; nothing was changed")
        password = first
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise CLIError("empty password; give one at the prompt or on stdin")
    return password


def _config(args) -> configmod.Config:
    """The configuration, read once; then root acts as the data directory's owner
    (twistmail.ownership), so what the command writes stays the server's."""
    config = getattr(args, "loadedConfig", None)
    if config is None:
        overrides = {"server": {"data_dir": args.data_dir}} if args.data_dir else {}
        try:
            config = args.loadedConfig = configmod.load(args.config, overrides)
        except configmod.ConfigError as e:
            raise CLIError(str(e)) from None
    ownership.actAsOwner(config.dataDir)
    return config


def _accounts(args) -> AccountBook:
    try:
        return openAccounts(_config(args))
    except (AccountError, ValueError) as e:
        raise CLIError(str(e)) from None


def cmdDomain(args) -> str:
    accounts = _accounts(args)
    if args.action == "list":
        rows = [(d, sum(u.endswith("@" + d) for u in accounts.users),
                 sum(a.endswith("@" + d) for a in accounts.aliases)) for d in sorted(accounts.domains)]
        return table(["DOMAIN", "USERS", "ALIASES"], rows)
    with accounts.editing():
        if args.action == "add":
            done = accounts.addDomain(args.domain)
            return f"domain {done} added"
        done = accounts.removeDomain(args.domain)
        return f"domain {done} removed"


def cmdUser(args) -> str:
    accounts = _accounts(args)
    if args.action == "list":
        targets = {}
        for alias, dests in accounts.aliases.items():
            for dest in dests:
                targets.setdefault(dest, []).append(alias)
        sent = senders.Sent(_config(args))
        rows = [(u, ",".join(sorted(targets.get(u, []))) or "-", *sent.cells("user", u))
                for u in sorted(accounts.users)]
        return table(["ADDRESS", "ALIASES", *senders.HEADERS], rows)
    if args.action == "remove":
        with accounts.editing():
            done = accounts.removeUser(args.address)
        return f"user {done} removed (its mail stays in the data directory)"
    if args.action == "quota":
        return _setQuota(accounts, args)
    # Fail on a bad address before asking for a password.
    if args.action == "add":
        accounts.checkNewUser(args.address)
    elif args.address.lower() not in accounts.users:
        raise CLIError(f"no user {args.address.lower()} (see: twistmail user list)")
    hashed = hashPassword(readPassword())
    with accounts.editing():
        if args.action == "add":
            done = accounts.addUser(args.address, hashed)
            return f"user {done} added"
        done = accounts.setPassword(args.address, hashed)
        return f"password of {done} changed"


def _setQuota(accounts: AccountBook, args) -> str:
    """``user quota ADDRESS SIZE [--messages N]``: see L{twistmail.auth.accounts.parseQuota}."""
    quota = parseQuota(args.size, args.messages)
    with accounts.editing():
        done = accounts.setQuota(args.address, quota)
    return describeQuota(done, quota)


def cmdAlias(args) -> str:
    accounts = _accounts(args)
    if args.action == "list":
        return table(["ALIAS", "TARGETS"], [(a, ",".join(t)) for a, t in sorted(accounts.aliases.items())])
    with accounts.editing():
        if args.action == "add":
            done = accounts.addAlias(args.source, args.targets)
            return f"alias {done} -> {', '.join(accounts.aliases[done])}"
        return f"alias {accounts.removeAlias(args.source)} removed"


def cmdCheckConfig(args) -> str:
    """Validate the file, the backend's and the filters' options; print every setting, the
    backends found and the filters enabled."""
    config = _config(args)
    from twisted.internet import defer

    from twistmail import _pluginload
    from twistmail.interfaces import IMailStoreFactory
    from twistmail.tap import makeFilters, makeResolver, makeStore

    def noLookups(f, *args):
        return defer.fail(RuntimeError("check-config makes no DNS lookups"))

    try:
        makeStore(config)
        backends = _pluginload.available(IMailStoreFactory)
        filters = makeFilters(config, None, makeResolver(config, noLookups))
    except configmod.ConfigError as e:
        raise CLIError(str(e)) from None
    if config["tls"]["certificate"]:
        from twistmail.tls import TLSConfigError, loadOptions

        try:
            loadOptions(config["tls"]["certificate"], config["tls"]["key"])
        except TLSConfigError as e:
            raise CLIError(f"{config.path}: [tls]: {e}") from None
    rows = []
    for section, keys in configmod.SCHEMA.items():
        for key in keys:
            value = config[section][key]
            if isinstance(value, list):
                value = " ".join(value) or "-"
            elif value == "":
                value = "-"
            rows.append((section, key, value))
    for key, value in sorted(config.storageOptions().items()):
        rows.append((f"storage.{config['storage']['backend']}", key, value))
    for name in sorted(config.filterTables):
        for key, value in sorted(config.filterTables[name].items()):
            rows.append((f"filters.{name}", key, value))
    rows = [(section, key, redactDsn(value) if key == "dsn" and value != "-" else value)
            for section, key, value in rows]
    rows = [("config", config.path)] + [
        (f"{section}.{key}", ("(set)" if value not in ("", "-") else "-")
         if (section, key) in configmod.SECRETS else value) for section, key, value in rows]
    found = table(["BACKEND", "MODULE", "DESCRIPTION"],
                  [(name, type(plugin).__module__, plugin.description)
                   for name, plugin in backends.items()])
    return table(["SETTING", "VALUE"], rows) + "\n\n" + found + "\n\n" + _filterTable(filters) + \
        _mtaStsRecords(config, args) + _clientRecords(config, args) + "\nconfiguration OK"


def _filterTable(filters: dict) -> str:
    """The enabled filters, in the order each role runs them (after the built-in rules)."""
    from twistmail import _pluginload
    from twistmail.interfaces import IMessageFilterFactory

    plugins = _pluginload.available(IMessageFilterFactory)
    rows = [(f.name, role, f.timeout, f.onFailure, type(plugins[f.name]).__module__)
            for role, enabled in filters.items() for f in enabled]
    if not rows:
        return "FILTERS  none enabled ([filters] inbound and submission are empty)\n"
    return table(["FILTER", "ROLE", "TIMEOUT", "ON_FAILURE", "MODULE"], rows) + "\n"


def _clientRecords(config: configmod.Config, args) -> str:
    """The SRV records (and, with a web listener, autoconfig names) for each hosted domain."""
    records = dnsrecords.clientRecords(config, _accounts(args).domains)
    return ("\nMail clients find the servers with these records (RFC 6186, RFC 8314):\n"
            + "".join(f"  {record}\n" for record in records))


def _mtaStsRecords(config: configmod.Config, args) -> str:
    """With [mta_sts] on: the DNS records to publish for each hosted domain."""
    records = dnsrecords.mtaStsRecords(config, _accounts(args).domains)
    if not config["mta_sts"]["mode"]:
        return ""
    served = " ".join(config.listeners("https") + config.listeners("http")) or \
        "no [listen] https or http listener: nothing serves it"
    return (f"\nMTA-STS policy (served on {served}); publish for each hosted domain:\n"
            + "".join(f"  {record}\n" for record in records))


def cmdMigrate(args) -> str:
    """Copy accounts to another backend; say what to put in the config afterwards."""
    from twistmail.cli.migrate import MigrationError, migrate

    config = _config(args)
    accounts = _accounts(args)
    if args.all:
        addresses = sorted(accounts.users)
    else:
        addresses = [a.lower() for a in args.addresses]
        unknown = [a for a in addresses if a not in accounts.users]
        if unknown:
            raise CLIError(f"no user {unknown[0]} (see: twistmail user list)")
    if not addresses:
        raise CLIError("no users to migrate (see: twistmail user list)")
    try:
        migrate(config, args.to, addresses)
    except MigrationError as e:
        raise CLIError(str(e)) from None
    where = config.path if args.config else "your config file (see etc/twistmail.toml)"
    return (f"migrated {len(addresses)} account(s) from {config['storage']['backend']} to "
            f"{args.to}; the {config['storage']['backend']} copies are untouched (remove them "
            f"once satisfied).\nNow put this in {where}, then start the server:\n"
            f'[storage]\nbackend = "{args.to}"')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twistmail", description="twistmail administration")
    p.add_argument("--version", action="version", version=f"twistmail {__version__}")
    p.add_argument("-c", "--config", help="TOML config file (default: embedded default)")
    p.add_argument("-d", "--data-dir", help="data directory (overrides [server] data_dir)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    domain = sub.add_parser("domain", help="local domains").add_subparsers(dest="action", required=True)
    for action in ("add", "remove"):
        domain.add_parser(action).add_argument("domain")
    domain.add_parser("list")

    user = sub.add_parser("user", help="mailbox users").add_subparsers(dest="action", required=True)
    for action, text in (("add", "password from prompt or stdin"),
                         ("passwd", "new password from prompt or stdin"), ("remove", "")):
        user.add_parser(action, help=text).add_argument("address")
    user.add_parser("list")
    quota = user.add_parser("quota", help="mail a user may keep (IMAP QUOTA, SMTP 452 when full)")
    quota.add_argument("address")
    quota.add_argument("size", help="octets, or with K/M/G/T (10M); 'unlimited'; 'default'")
    quota.add_argument("--messages", type=int, help="at most this many messages (0: no limit)")

    alias = sub.add_parser("alias", help="address aliases").add_subparsers(dest="action", required=True)
    add = alias.add_parser("add")
    add.add_argument("source")
    add.add_argument("targets", nargs="+")
    alias.add_parser("remove").add_argument("source")
    alias.add_parser("list")

    queuecli.register(sub)
    sendmail.register(sub)
    dkimcli.register(sub)
    dbcli.register(sub)
    accountsmigrate.register(sub)
    recordscli.register(sub)
    sub.add_parser("check-config", help="validate the configuration and show the effective settings")

    migrate = sub.add_parser("migrate", help="copy mailboxes to another storage backend (server "
                                             "stopped)")
    migrate.add_argument("--to", required=True, metavar="BACKEND",
                         help="the backend to copy to: maildir, mbox or a plugin's name")
    who = migrate.add_mutually_exclusive_group(required=True)
    who.add_argument("--all", action="store_true", help="every user")
    who.add_argument("addresses", nargs="*", default=[], metavar="ADDRESS")
    return p


def cmdQueue(args) -> str:
    config = _config(args)
    if args.action == "senders":
        return senders.cmdSenders(config, args.top)
    return queuecli.run(args, config)


def cmdDKIM(args) -> str:
    return dkimcli.run(args, _config(args).dataDir)


def cmdDB(args) -> str:
    return dbcli.run(args, _config(args))


def cmdDNS(args) -> str:
    return recordscli.run(args, _config(args))


def cmdSendmail(args) -> str:
    try:
        config = _config(args)
    except CLIError as e:
        raise sendmail.SendmailError(str(e), sendmail.EX_CONFIG) from None
    return sendmail.run(args, config)


COMMANDS = {"domain": cmdDomain, "user": cmdUser, "alias": cmdAlias, "queue": cmdQueue,
            "sendmail": cmdSendmail, "dkim": cmdDKIM, "dns": cmdDNS, "db": cmdDB,
            "check-config": cmdCheckConfig, "migrate": cmdMigrate,
            "migrate-accounts": lambda args: accountsmigrate.run(args, _config(args))}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        output = COMMANDS[args.command](args)
        if output:
            print(output)
    except sendmail.SendmailError as e:
        print(f"twistmail sendmail: error: {e}", file=sys.stderr)
        return e.status
    except (CLIError, AccountError, StorageError, queuecli.QueueCLIError, StateError,
            DKIMKeyError, recordscli.RecordsCLIError, configmod.ConfigError) as e:
        if getattr(e, "output", ""):
            print(e.output)
        print(f"twistmail: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"twistmail: error: {e.filename or ''}: {e.strerror}. Check the path and permissions "
              "(use --data-dir or [server] data_dir)", file=sys.stderr)
        return 1
    return 0
