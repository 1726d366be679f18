# -*- test-case-name: tests.test_pgaccounts -*-
"""``twistmail migrate-accounts --to postgresql|file``: copy the accounts to the other backend.

Copies domains, users (their argon2id hashes as they are, so every password keeps
working, and their quotas) and aliases in one edit of the target; the source is
left as it was.  An entry the target already has with different contents stops
the copy before anything is written: which one is right is the operator's call.
"""

from __future__ import annotations

from twistmail.auth.accounts import AccountBook, Accounts

BACKENDS = ("postgresql", "file")


def register(sub) -> None:
    migrate = sub.add_parser("migrate-accounts", help="copy domains, users and aliases to the "
                                                      "other accounts backend")
    migrate.add_argument("--to", required=True, choices=BACKENDS,
                         help="postgresql: from accounts.json to [accounts] dsn; file: back")


def _conflict(target: AccountBook, source: AccountBook) -> str | None:
    for name, table in (("user", "users"), ("alias", "aliases")):
        theirs, ours = getattr(target, table), getattr(source, table)
        for address in sorted(ours.keys() & theirs.keys()):
            if ours[address] != theirs[address]:
                return f"{name} {address}"
    clash = sorted((source.users.keys() & target.aliases.keys())
                   | (source.aliases.keys() & target.users.keys()))
    return f"address {clash[0]} (a user in one, an alias in the other)" if clash else None


def run(args, config) -> str:
    from twistmail.auth.pgaccounts import PostgresAccounts
    from twistmail.cli.main import CLIError

    dsn = config["accounts"]["dsn"]
    if not dsn:
        raise CLIError(f"{config.path}: [accounts] dsn is not set. Fix: write the accounts "
                       'database there, e.g. dsn = "host=/run/postgresql dbname=twistmail"')
    file, database = Accounts(config.dataDir), PostgresAccounts(dsn)
    source, target = (file, database) if args.to == "postgresql" else (database, file)
    with target.editing():
        conflict = _conflict(target, source)
        if conflict is not None:
            raise CLIError(f"the {args.to} accounts already have {conflict}, different from "
                           "the source's; nothing was copied. Fix: remove it from one side "
                           "first")
        target.domains |= source.domains
        target.users.update(source.users)
        target.aliases.update(source.aliases)
    now = "postgresql" if args.to == "postgresql" else "file"
    return (f"copied {len(source.domains)} domain(s), {len(source.users)} user(s) and "
            f"{len(source.aliases)} alias(es) to the {args.to} accounts; the source is "
            f"untouched.\nNow set in {config.path or 'your config file'}, then restart every "
            f'node:\n[accounts]\nbackend = "{now}"')
