# -*- test-case-name: tests.test_smtp_ratelimit -*-
"""What authenticated users sent in the last hour against their limits, for
``twistmail user list`` and ``twistmail queue senders``.

The counts come from the file the running server publishes
(L{twistmail.ratelimit.RateLimitPublisher}); the limits from the configuration
the command reads, which should be the server's.
"""

from __future__ import annotations

import time

from twistmail import config as configmod
from twistmail.cli.output import table
from twistmail.ratelimit import SAVE_INTERVAL, SCOPES, Limits, readState, statePath, totals

HEADERS = ("MESSAGES-1H", "RECIPIENTS-1H")


def _cell(count: int, limit: int) -> str:
    return f"{count}/{limit or 'unlimited'}"


class Sent:
    """The published counts, read once, with the configured limits."""

    def __init__(self, config: configmod.Config, now: float | None = None) -> None:
        """@raise twistmail.ratelimit.StateError: the file is damaged."""
        self.path = statePath(config.dataDir)
        self.state = readState(self.path)
        self.now = time.time() if now is None else now
        self.limits = {scope: Limits.fromConfig(config["submission"], scope) for scope in SCOPES}

    def totals(self, scope: str, name: str) -> tuple[int, int]:
        return totals(self.state.get(SCOPES[scope], {}).get(name, []), self.now)

    def cells(self, scope: str, name: str) -> tuple[str, str]:
        """"sent/limit" for messages and recipients."""
        messages, recipients = self.totals(scope, name)
        limit = self.limits[scope]
        return _cell(messages, limit.messages), _cell(recipients, limit.recipients)

    def footer(self) -> str:
        if not self.state:
            return (f"nothing sent yet: the server writes {self.path} every "
                    f"{SAVE_INTERVAL} s when authenticated users send")
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.state.get("saved", 0)))
        return f"the last hour as of {saved} (the server publishes every {SAVE_INTERVAL} s)"


def cmdSenders(config: configmod.Config, top: int) -> str:
    """The top senders, users and domains together, most recipients first."""
    sent = Sent(config)
    found = []
    for scope, key in SCOPES.items():
        for name in sent.state.get(key, {}):
            messages, recipients = sent.totals(scope, name)
            if messages or recipients:
                found.append((-recipients, -messages, name, scope))
    rows = [(name, scope, *sent.cells(scope, name)) for *_, name, scope in sorted(found)[:top]]
    return table(["SENDER", "KIND", *HEADERS], rows) + "\n" + sent.footer()
