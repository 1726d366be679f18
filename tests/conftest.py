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


@pytest.fixture
def server(dataDir):
    """A running twistmail (SMTP + POP3) with alice@example.test / secret."""
    addUser(dataDir, "alice@example.test")
    addUser(dataDir, "bob@example.test")
    srv = startServer(dataDir)
    yield srv
    srv.stop()
