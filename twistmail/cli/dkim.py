# -*- test-case-name: tests.test_dkim_cli -*-
"""``twistmail dkim generate|list|remove``: the DKIM keys the server signs with.

See L{twistmail.dkimkeys} for the layout and the rotation rule (the oldest
of at most two key sets signs).  The running server notices a change within
seconds; nothing needs a restart.
"""

from __future__ import annotations

import time

from twistmail import dkimkeys
from twistmail.cli.output import table


def register(sub) -> None:
    dkim = sub.add_parser("dkim", help="DKIM signing keys").add_subparsers(dest="action",
                                                                            required=True)
    generate = dkim.add_parser("generate", help="make an Ed25519 and an RSA-2048 key and print "
                               "the DNS records to publish")
    generate.add_argument("domain")
    generate.add_argument("--selector", metavar="S", help="key set name; the selectors are "
                          "S-ed25519 and S-rsa (default: tm + today's date, e.g. tm20261204)")
    dkim.add_parser("list", help="key sets per domain, and which one signs")
    remove = dkim.add_parser("remove", help="delete a key set (the next one signs from then on)")
    remove.add_argument("domain")
    remove.add_argument("selector", help="the key set name (S, without -ed25519/-rsa)")


def records(keys: dkimkeys.KeySet) -> str:
    return "\n".join(dkimkeys.zoneTXT(owner, text) for owner, text in keys.records())


def run(args, dataDir: str) -> str:
    """@raise dkimkeys.DKIMKeyError: printed by the caller as the error."""
    if args.action == "generate":
        return _generate(args, dataDir)
    if args.action == "list":
        return _list(dataDir)
    dkimkeys.remove(dataDir, args.domain, args.selector)
    remaining = dkimkeys.listSets(dataDir, dkimkeys.checkDomain(args.domain))
    after = f"; {remaining[0].name} signs now" if remaining else \
        f"; {dkimkeys.checkDomain(args.domain)} has no keys: its mail goes out unsigned"
    return f"key set {args.selector.lower()} removed{after}"


def _generate(args, dataDir: str) -> str:
    name = args.selector or dkimkeys.defaultSetName(time.time())
    keys = dkimkeys.generate(dataDir, args.domain, name)
    sets = dkimkeys.listSets(dataDir, keys.domain)
    if sets[0].name == keys.name:
        when = "It signs mail from now on: publish the records before you send."
    else:
        when = (f"{sets[0].name} keeps signing. Publish these records, wait for their TTL, "
                f"then run: twistmail dkim remove {keys.domain} {sets[0].name}")
    return (f"key set {keys.name} for {keys.domain} made (selectors {keys.selector('ed25519')} "
            f"and {keys.selector('rsa')}). {when}\nPublish in DNS:\n{records(keys)}")


def _list(dataDir: str) -> str:
    rows = []
    for domain in dkimkeys.listDomains(dataDir):
        for i, keys in enumerate(dkimkeys.listSets(dataDir, domain)):
            for algorithm in dkimkeys.ALGORITHMS:
                rows.append((domain, keys.selector(algorithm), algorithm,
                             time.strftime("%Y-%m-%d %H:%M", time.gmtime(keys.created)),
                             "signing" if i == 0 else "next"))
    return table(["DOMAIN", "SELECTOR", "ALGORITHM", "CREATED (UTC)", "STATE"], rows)
