"""Test support for twistmail and for authors of storage backend plugins.

* L{StoreConformanceTests}: every storage behaviour the POP3 and IMAP
  servers rely on, as a pytest test class.  A backend proves itself by
  subclassing it (see README.rst, "Writing a storage backend")::

      from twistmail.testing import StoreConformanceTests

      class TestMyStore(StoreConformanceTests):
          def makeStore(self, dataDir):
              return MyStore(dataDir)

* L{SMTPHarness}: an SMTP server over StringTransport with the filters
  given, a L{RecordingDeliveryTarget} and a task.Clock, so policy and filter
  tests run in milliseconds without sockets (see README.rst, "Writing a
  filter").  L{MemoryStore}: a complete in-memory IMailStore.

* L{onReactor}: call Deferred-returning code from a blocking test; the
  reactor runs in a background thread.

Importing this package does not import pytest; L{StoreConformanceTests} does.
"""

from twistmail.testing._reactor import onReactor, startReactor
from twistmail.testing.memory import MemoryStore
from twistmail.testing.smtp import RecordingDeliveryTarget, SMTPHarness

__all__ = ["MemoryStore", "RecordingDeliveryTarget", "SMTPHarness", "StoreConformanceTests",
           "onReactor", "startReactor"]


def __getattr__(name: str):
    if name == "StoreConformanceTests":
        from twistmail.testing.conformance import StoreConformanceTests

        return StoreConformanceTests
    raise AttributeError(name)
