"""Logging to a file that logrotate rotates: rename, SIGUSR1, and the server writes a new file."""

from __future__ import annotations

import os
import subprocess

from serverproc import TWISTD, ServerProcess, waitUntil
from support import freePort

from twistmail import logfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text(path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def test_logrotate_with_the_shipped_config_moves_logging_to_a_new_file(tmp_path, monkeypatch):
    log = tmp_path / "twistmail.log"
    monkeypatch.setenv(logfile.PATH_ENV, str(log))
    port = freePort()
    server = ServerProcess([TWISTD, "-n", "--pidfile=", "--logger", "twistmail.logfile.observer",
                            "twistmail", "--data-dir", str(tmp_path / "data"),
                            "--smtp", f"tcp:{port}:interface=127.0.0.1"],
                           str(tmp_path / "stdout.log")).start()
    try:
        server.waitReady(port, None)
        waitUntil(lambda: "twistmail" in text(log), 10, "the first lines in the log file",
                  describe=server.describe)
        # The shipped logrotate file, pointed at this log and this process.
        with open(os.path.join(ROOT, "etc", "twistmail.logrotate")) as f:
            config = f.read().replace("/var/log/twistmail/twistmail.log", str(log))
        config = config.replace(
            "systemctl kill --signal=USR1 --kill-whom=main twistmail.service",
            f"kill -USR1 {server.proc.pid}")
        (tmp_path / "logrotate.conf").write_text(config)
        done = subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "state"),
                               str(tmp_path / "logrotate.conf")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rotated = tmp_path / "twistmail.log.1"
        assert rotated.exists()
        waitUntil(lambda: "reopened (SIGUSR1)" in text(log), 10, "the server to reopen its log",
                  describe=server.describe)
        before = text(rotated)
    finally:
        server.stop()
    assert "Main loop terminated" in text(log), "what comes after the rotation is in the new file"
    assert text(rotated) == before, "nothing more written to the rotated file"
    assert "\x00" not in text(log), "appended, not written at the old offset (no sparse file)"


def test_a_reopen_that_fails_keeps_the_old_file(tmp_path):
    path = tmp_path / "logs" / "twistmail.log"
    path.parent.mkdir()
    target = logfile.ReopeningFile(str(path))
    target.write("one\n")
    os.rename(path, tmp_path / "moved.log")
    path.parent.rmdir()  # nowhere to create the new file
    target.reopen()
    target.write("two\n")
    target.flush()
    assert (tmp_path / "moved.log").read_text() == "one\ntwo\n"
