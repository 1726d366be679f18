import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support import addUser, startServer  # noqa: E402


@pytest.fixture
def dataDir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return str(d)


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL cluster for this test session (under xdist: this worker)."""
    from pgproc import PostgresProcess

    with PostgresProcess() as cluster:
        yield cluster


@pytest.fixture
def backend():
    """The storage backend of the ``server`` fixture.  Protocol and interop test modules
    override it by importing ``support.everyBackend`` so they run on every backend."""
    return "maildir"


@pytest.fixture
def server(dataDir, backend):
    """A running twistmail (SMTP, POP3, IMAP) with alice and bob @example.test / secret."""
    addUser(dataDir, "alice@example.test")
    addUser(dataDir, "bob@example.test")
    srv = startServer(dataDir, storage={"backend": backend})
    yield srv
    srv.stop()
