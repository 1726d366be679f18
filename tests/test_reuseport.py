"""``[server] reuse_port``: two real ``twistd -n twistmail`` processes on one host bind
the same ports (SO_REUSEPORT) and both accept connections on them."""

from __future__ import annotations

import pytest
from serverproc import ServerProcess, greeting, listenerArgs, runTwistd, twistdCommand
from support import addUser, freePort

pytestmark = pytest.mark.e2e


def config(tmp_path, name: str, reusePort: bool) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'[server]\ndata_dir = "{name}"\nhostname = "{name}.example.test"\n'
                    f'reuse_port = {"true" if reusePort else "false"}\n')
    addUser(str(tmp_path / name), "alice@example.test")
    return str(path)


def test_two_processes_share_the_ports_and_both_accept(tmp_path):
    smtp, pop3, imap = freePort(), freePort(), freePort()
    args = listenerArgs(smtp, pop3, imap)  # the same ports for both
    nodes = []
    try:
        for name in ("a", "b"):
            node = ServerProcess(twistdCommand("--config", config(tmp_path, name, True), *args),
                                 logPath=str(tmp_path / f"{name}.log"),
                                 cwd=str(tmp_path)).start()
            nodes.append(node)
            # Not waitReady: the first process would answer for the second.
            node.waitForLog(lambda log: all(f"twistmail {p} listening on" in log
                                            for p in ("smtp", "pop3", "imap")),
                            "the listeners", timeout=30)
        # The kernel picks a listener by a hash of the client's address and port: over
        # 64 connections both answer unless something is wrong (odds 2**-63).
        answered = {greeting(smtp).split()[1] for _ in range(64)}
        assert answered == {b"a.example.test", b"b.example.test"}, answered
        assert all(greeting(imap).startswith(b"* OK") for _ in range(8))
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        assert "Traceback" not in node.log, node.describe()


def test_without_reuse_port_the_second_process_cannot_bind(tmp_path):
    """The default: a second server on the same port is a mistake, said at start-up."""
    smtp, pop3, imap = freePort(), freePort(), freePort()
    args = listenerArgs(smtp, pop3, imap)
    first = ServerProcess(twistdCommand("--config", config(tmp_path, "a", True), *args),
                          logPath=str(tmp_path / "a.log"), cwd=str(tmp_path)).start()
    try:
        first.waitReady(smtp, pop3, imap)
        second = runTwistd(["--config", config(tmp_path, "b", False), *args],
                           cwd=str(tmp_path))
        assert second.returncode != 0
        assert "cannot listen for" in second.stdout, second.stdout
    finally:
        first.stop()
