"""The real ``twistd -n twistmail`` with a filter from another distribution, named in its
config file: loaded from ``twistmail/plugins/`` on sys.path and seen on the wire."""

from __future__ import annotations

import os
import shutil
import smtplib

import pytest
from serverproc import runTwistd
from support import addUser, storedMessages
from test_e2e import HOSTNAME, launch

ALICE = "alice@example.test"
EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins", "examplefilter.py")


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """examplefilter.py where an installed distribution puts it: <site>/twistmail/plugins/."""
    site = tmp_path / "site"
    (site / "twistmail" / "plugins").mkdir(parents=True)
    shutil.copy(EXAMPLE, site / "twistmail" / "plugins" / "examplefilter.py")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p))
    return site


def test_a_third_party_filter_named_in_the_config_runs_in_the_real_server(tmp_path, installed):
    dataDir = str(tmp_path / "data")
    addUser(dataDir, ALICE)
    config = tmp_path / "twistmail.toml"
    config.write_text('[filters]\ninbound = ["example-subject"]\n\n'
                      '[filters.example-subject]\nreject_subject = "lottery"\n')
    server, smtpPort, _, _ = launch(tmp_path, dataDir, extra=("--config", str(config)))
    try:
        with smtplib.SMTP("127.0.0.1", smtpPort, timeout=10) as s:
            with pytest.raises(smtplib.SMTPDataError) as info:
                s.sendmail("x@remote.test", [ALICE], b"Subject: Lottery win\r\n\r\nclaim\r\n")
            assert (info.value.smtp_code, info.value.smtp_error) == (
                550, f"5.7.1 Subject refused by {HOSTNAME}".encode())
            s.sendmail("x@remote.test", [ALICE], b"Subject: lunch?\r\n\r\nhi\r\n")
        [message] = storedMessages(dataDir, ALICE)
        assert f"\r\nX-Example-Filter: checked by {HOSTNAME}\r\n".encode() in message
        server.waitForLog(lambda log: "inbound filters: example-subject" in log,
                          "the enabled filters")
    finally:
        server.stop()


def test_an_unknown_filter_stops_the_start_with_one_line_naming_the_fix(tmp_path, installed):
    config = tmp_path / "twistmail.toml"
    config.write_text('[filters]\nsubmission = ["dkim-sgn"]\n')
    result = runTwistd(["--config", str(config), "--data-dir", str(tmp_path / "data"),
                        "--smtp", "none"], cwd=str(tmp_path))
    assert result.returncode != 0, result.stdout
    assert f"{config}: [filters] submission: unknown filter 'dkim-sgn'. Fix: use one of " \
        in result.stdout
    assert "example-subject" in result.stdout and "Traceback" not in result.stdout
