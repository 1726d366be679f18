# -*- test-case-name: tests.test_logfile -*-
"""A log file that logrotate can rotate: ``twistd --logger twistmail.logfile.observer``.

twistd's own ``--logfile`` rotates by itself (at 1 MB, never deleting), and
neither of logrotate's ways works with it: ``copytruncate`` leaves a sparse
file (twistd does not write in append mode), and after a rename its SIGUSR1
handler finds no file to rotate and keeps writing to the renamed one.  This
observer writes in append mode to the file named by ``TWISTMAIL_LOG_FILE``
(default ``/var/log/twistmail/twistmail.log``) and reopens it on SIGUSR1, as
syslog daemons and Dovecot do on theirs; logrotate renames, then signals.
"""

from __future__ import annotations

import os
import signal

from twisted.logger import ILogObserver, Logger, textFileLogObserver

PATH_ENV = "TWISTMAIL_LOG_FILE"
DEFAULT_PATH = "/var/log/twistmail/twistmail.log"

log = Logger()


class ReopeningFile:
    """A text file opened for appending, which ``reopen`` swaps for the file now at its path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = self._open()

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        try:
            new = self._open()
        except OSError as e:
            # Keep writing where we were: losing the log is worse than a late rotation.
            log.error("log file {path} not reopened: {error}; still writing to the old file",
                      path=self.path, error=e.strerror)
            return
        old, self._file = self._file, new
        old.close()
        log.info("log file {path} reopened (SIGUSR1)", path=self.path)


def observer() -> ILogObserver:
    """twistd's ``--logger`` factory: the file observer, and SIGUSR1 to reopen it."""
    from twisted.internet import reactor

    target = ReopeningFile(os.environ.get(PATH_ENV) or DEFAULT_PATH)
    # Twisted handles INT, TERM and CHLD itself, never USR1; the handler only hands
    # the work to the reactor thread (nothing else is safe in a signal handler).
    signal.signal(signal.SIGUSR1, lambda signum, frame: reactor.callFromThread(target.reopen))
    return textFileLogObserver(target)

