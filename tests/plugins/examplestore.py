"""An example storage backend plugin: ``[storage] backend = "example"``.

A template for writing a real one (see README.rst, "Writing a storage
backend"): the factory validates its options and builds the store, here
twistmail's own in-memory L{MemoryStore}.  It lives outside the twistmail
package: tests add this directory to ``twistmail.plugins.__path__``, which is
what installing a distribution that ships ``twistmail/plugins/examplestore.py``
does, and run the conformance suite and a whole server on it.

Mail "survives a restart" only within one process (a store made again on the
same data directory sees it): enough for the suite, useless in production.
"""

from __future__ import annotations

from zope.interface import implementer

from twistmail.config import ConfigError
from twistmail.interfaces import IMailStoreFactory
from twistmail.testing.memory import MemoryStore


class ExampleStore(MemoryStore):
    """The store a third party would write; ours is in memory."""


@implementer(IMailStoreFactory)
class ExampleStoreFactory:
    name = "example"
    description = "in memory, for tests: the example backend plugin"

    def makeStore(self, options: dict, dataDir: str) -> ExampleStore:
        """Options come from [storage.example]; check them all here, before any mail arrives."""
        options = dict(options)
        quota = options.pop("quota", None)
        if options:
            raise ConfigError(f"[storage.example] {sorted(options)[0]}: unknown option. "
                              "Fix: remove it (the only option is quota)")
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int)
                                  or quota < 1):
            raise ConfigError(f"[storage.example] quota: expected a number of messages >= 1, "
                              f"got {quota!r}. Fix: write e.g. quota = 1000")
        return ExampleStore(dataDir, quota)


example = ExampleStoreFactory()
