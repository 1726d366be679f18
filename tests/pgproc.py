"""A private PostgreSQL for the tests: initdb + postgres from Debian, on a unix socket.

One cluster per test session (under xdist, per worker), in a temporary directory,
stopped at the end; never the system service.  PostgreSQL refuses to run as root,
so as root the cluster belongs to the ``postgres`` user Debian's package creates
and every command runs through ``runuser``.  Each store gets a schema of its own
(``search_path`` in its DSN), so tests share the cluster but never their data.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import tempfile

import psycopg


def binDir() -> str:
    """Debian's newest PostgreSQL server binaries (/usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(p.split("/")[-3]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql "
                           "(.ci/run installs it)")
    return os.path.dirname(found[-1])


class PostgresProcess:
    """initdb, start, dsn(), stop: one throwaway cluster."""

    #: Server settings beyond the socket.  fsync off: a test cluster lives minutes and is
    #: thrown away; commits are still commits.  A benchmark sets durable ones.
    settings = "-c fsync=off -c full_page_writes=off -c max_connections=200"

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="twistmail-pg-")
        self.dataDir = os.path.join(self.root, "data")
        self.started = False

    def __enter__(self) -> PostgresProcess:
        """Started; stopped and removed at the end of the block (also if start fails)."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _command(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def start(self) -> None:
        if os.geteuid() == 0:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")
        bindir = binDir()
        subprocess.run(self._command([os.path.join(bindir, "initdb"), "-D", self.dataDir,
                                      "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                      "--locale=C.UTF-8"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.resume()

    def resume(self) -> None:
        """Start the server on the cluster already made (after L{pause})."""
        bindir = binDir()
        # No TCP at all: a unix socket in our directory.  pg_ctl -w waits until the
        # server accepts connections (no sleeps here).
        options = f"-k {self.root} -c listen_addresses= {self.settings}"
        subprocess.run(self._command([os.path.join(bindir, "pg_ctl"), "-D", self.dataDir,
                                      "-l", os.path.join(self.root, "log"), "-o", options,
                                      "-w", "-t", "120", "start"]),
                       check=True, stdout=subprocess.DEVNULL)
        self.started = True
        with psycopg.connect(self.adminDsn(), autocommit=True) as conn:  # ready for queries
            conn.execute("SELECT 1")

    def adminDsn(self) -> str:
        return f"host={self.root} user=postgres dbname=postgres"

    def dsn(self, key: str) -> str:
        """A DSN whose tables live in a schema of their own, named after C{key}; the
        schema is created empty the first time."""
        schema = "t_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        with psycopg.connect(self.adminDsn(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        return f"{self.adminDsn()} options='-csearch_path={schema}'"

    def pause(self) -> None:
        """Stop the server, keep the cluster: a PostgreSQL restart, as an operator's."""
        if self.started:
            # Fast shutdown: open connections (a test's pool) are closed, not waited for.
            subprocess.run(self._command([os.path.join(binDir(), "pg_ctl"), "-D", self.dataDir,
                                          "stop", "-m", "fast", "-w"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.started = False

    def stop(self) -> None:
        self.pause()
        shutil.rmtree(self.root, ignore_errors=True)
