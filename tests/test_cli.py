"""The ``twistmail`` admin command, run as a sysadmin runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import cli

from twistmail.auth.passwords import verifyPassword


def accountsFile(dataDir) -> dict:
    with open(os.path.join(dataDir, "accounts.json"), encoding="utf-8") as f:
        return json.load(f)


def rawAccountsFile(dataDir) -> str:
    with open(os.path.join(dataDir, "accounts.json"), encoding="utf-8") as f:
        return f.read()


def table(stdout: str) -> list[list[str]]:
    """Rows of the (first) table the CLI printed, header first, cells split on runs of spaces."""
    return [line.split() for line in stdout.strip("\n").split("\n\n")[0].split("\n")]


def settings(stdout: str) -> dict[str, str]:
    """check-config's SETTING/VALUE table."""
    return {row[0]: " ".join(row[1:]) for row in table(stdout)[1:]}


def backends(stdout: str) -> dict[str, list[str]]:
    """check-config's table of the storage backends found, by name."""
    rows = table(stdout.split("\n\n", 1)[1].rsplit("\n", 2)[0])
    assert rows[0] == ["BACKEND", "MODULE", "DESCRIPTION"]
    return {row[0]: row[1:] for row in rows[1:]}


def assertOneLineError(proc, *needles: str) -> None:
    """A failure: non-zero exit, one 'twistmail: error:' line, no traceback."""
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("twistmail: error:"), err
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture
def domain(dataDir):
    cli("domain", "add", "example.test", dataDir=dataDir)
    return "example.test"


# -- entry points ----------------------------------------------------------------


def test_moduleHelp():
    proc = subprocess.run([sys.executable, "-m", "twistmail", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("domain", "user", "alias", "check-config", "--data-dir", "--config"):
        assert command in proc.stdout


def test_consoleScript(dataDir):
    script = os.path.join(os.path.dirname(sys.executable), "twistmail")
    proc = subprocess.run([script, "--data-dir", dataDir, "domain", "list"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert table(proc.stdout) == [["DOMAIN", "USERS", "ALIASES"]]


def test_subcommandHelp(dataDir):
    proc = cli("user", "--help", dataDir=dataDir)
    for action in ("add", "passwd", "remove", "list"):
        assert action in proc.stdout


def test_noCommandIsAUsageError(dataDir):
    proc = cli(dataDir=dataDir, check=False)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


# -- domains ---------------------------------------------------------------------


def test_domainAddListRemove(dataDir):
    assert table(cli("domain", "list", dataDir=dataDir).stdout) == [["DOMAIN", "USERS", "ALIASES"]]
    assert "example.test" in cli("domain", "add", "Example.TEST", dataDir=dataDir).stdout
    cli("domain", "add", "example.org", dataDir=dataDir)
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="pw\n")
    cli("alias", "add", "info@example.test", "alice@example.test", dataDir=dataDir)

    assert table(cli("domain", "list", dataDir=dataDir).stdout) == [
        ["DOMAIN", "USERS", "ALIASES"],
        ["example.org", "0", "0"],
        ["example.test", "1", "1"],
    ]
    cli("domain", "remove", "example.org", dataDir=dataDir)
    assert accountsFile(dataDir)["domains"] == ["example.test"]


def test_domainErrors(dataDir, domain):
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="pw\n")
    assertOneLineError(cli("domain", "remove", "example.test", dataDir=dataDir, check=False),
                       "alice@example.test", "remove them first")
    assertOneLineError(cli("domain", "remove", "nope.test", dataDir=dataDir, check=False),
                       "twistmail domain list")
    assertOneLineError(cli("domain", "add", "example.test", dataDir=dataDir, check=False),
                       "already exists")
    assertOneLineError(cli("domain", "add", "bad_domain.test", dataDir=dataDir, check=False),
                       "not a valid domain")
    assert accountsFile(dataDir)["domains"] == ["example.test"]


# -- users -----------------------------------------------------------------------


def test_userAddFromStdin(dataDir, domain):
    password = "s3cret-from-stdin"
    proc = cli("user", "add", "Alice@Example.Test", dataDir=dataDir, stdin=password + "\n")
    assert "alice@example.test" in proc.stdout
    stored = accountsFile(dataDir)["users"]["alice@example.test"]["password"]
    assert verifyPassword(stored, password)
    assert not verifyPassword(stored, password + "x")
    assert password not in rawAccountsFile(dataDir)


def test_passwordWithSpacesAndCRLF(dataDir, domain):
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="  two words  \r\n")
    stored = accountsFile(dataDir)["users"]["alice@example.test"]["password"]
    assert verifyPassword(stored, "  two words  ")


def test_passwordNeverInArgv(dataDir, domain):
    """There is no way to pass a password on the command line (ps shows argv to everyone)."""
    proc = cli("user", "add", "alice@example.test", "hunter2", dataDir=dataDir, check=False)
    assert proc.returncode != 0
    proc = cli("user", "add", "--password", "hunter2", "alice@example.test", dataDir=dataDir,
               check=False)
    assert proc.returncode != 0
    assert accountsFile(dataDir)["users"] == {}
    assert "hunter2" not in rawAccountsFile(dataDir)


def test_userList(dataDir, domain):
    cli("domain", "add", "example.org", dataDir=dataDir)
    for user in ("bob@example.test", "alice@example.test", "carol@example.org"):
        cli("user", "add", user, dataDir=dataDir, stdin="pw\n")
    cli("alias", "add", "team@example.test", "alice@example.test", "bob@example.test",
        dataDir=dataDir)
    cli("alias", "add", "postmaster@example.test", "alice@example.test", dataDir=dataDir)
    # Nothing sent yet: each user's hour against the default limits.
    assert table(cli("user", "list", dataDir=dataDir).stdout) == [
        ["ADDRESS", "ALIASES", "MESSAGES-1H", "RECIPIENTS-1H"],
        ["alice@example.test", "postmaster@example.test,team@example.test", "0/100", "0/500"],
        ["bob@example.test", "team@example.test", "0/100", "0/500"],
        ["carol@example.org", "-", "0/100", "0/500"],
    ]


def test_userListEmpty(dataDir):
    assert table(cli("user", "list", dataDir=dataDir).stdout) == [
        ["ADDRESS", "ALIASES", "MESSAGES-1H", "RECIPIENTS-1H"]]


def test_userPasswd(dataDir, domain):
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="old-password\n")
    cli("user", "passwd", "ALICE@example.test", dataDir=dataDir, stdin="new-password\n")
    stored = accountsFile(dataDir)["users"]["alice@example.test"]["password"]
    assert verifyPassword(stored, "new-password")
    assert not verifyPassword(stored, "old-password")
    assert "new-password" not in rawAccountsFile(dataDir)


def test_userPasswdErrors(dataDir, domain):
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="old-password\n")
    before = rawAccountsFile(dataDir)
    assertOneLineError(cli("user", "passwd", "alice@example.test", dataDir=dataDir, stdin="\n",
                           check=False), "empty password")
    assertOneLineError(cli("user", "passwd", "nobody@example.test", dataDir=dataDir,
                           stdin="pw\n", check=False), "twistmail user list")
    assert rawAccountsFile(dataDir) == before


def test_userRemove(dataDir, domain):
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="pw\n")
    cli("user", "add", "bob@example.test", dataDir=dataDir, stdin="pw\n")
    proc = cli("user", "remove", "alice@example.test", dataDir=dataDir)
    assert "alice@example.test" in proc.stdout
    assert list(accountsFile(dataDir)["users"]) == ["bob@example.test"]
    assertOneLineError(cli("user", "remove", "alice@example.test", dataDir=dataDir, check=False),
                       "twistmail user list")


def test_userAddToUnknownDomain(dataDir):
    proc = cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="pw\n", check=False)
    assertOneLineError(proc, "twistmail domain add example.test")
    assert not os.path.exists(os.path.join(dataDir, "accounts.json")) \
        or accountsFile(dataDir)["users"] == {}


def test_userAddDuplicate(dataDir, domain):
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="first\n")
    before = rawAccountsFile(dataDir)
    proc = cli("user", "add", "ALICE@example.test", dataDir=dataDir, stdin="second\n", check=False)
    assertOneLineError(proc, "alice@example.test", "already exists")
    assert rawAccountsFile(dataDir) == before


def test_userAddEmptyPassword(dataDir, domain):
    for stdin in ("", "\n", "\r\n"):
        proc = cli("user", "add", "alice@example.test", dataDir=dataDir, stdin=stdin, check=False)
        assertOneLineError(proc, "empty password")
    assert accountsFile(dataDir)["users"] == {}


@pytest.mark.parametrize("address", ["../x@example.test", "a/b@example.test", "x+y@example.test",
                                     "no-at-sign", ".x@example.test"])
def test_userAddInvalidAddress(dataDir, domain, address):
    proc = cli("user", "add", address, dataDir=dataDir, stdin="pw\n", check=False)
    assertOneLineError(proc)
    assert accountsFile(dataDir)["users"] == {}
    assert not os.path.exists(os.path.join(dataDir, "mail"))


# -- aliases ---------------------------------------------------------------------


def test_aliasAddListRemove(dataDir, domain):
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="pw\n")
    cli("user", "add", "bob@example.test", dataDir=dataDir, stdin="pw\n")
    assert table(cli("alias", "list", dataDir=dataDir).stdout) == [["ALIAS", "TARGETS"]]
    proc = cli("alias", "add", "Team@example.test", "bob@example.test", "ALICE@example.test",
               dataDir=dataDir)
    assert "team@example.test" in proc.stdout
    cli("alias", "add", "abuse@example.test", "alice@example.test", dataDir=dataDir)
    assert table(cli("alias", "list", dataDir=dataDir).stdout) == [
        ["ALIAS", "TARGETS"],
        ["abuse@example.test", "alice@example.test"],
        ["team@example.test", "alice@example.test,bob@example.test"],
    ]
    cli("alias", "remove", "team@example.test", dataDir=dataDir)
    assert list(accountsFile(dataDir)["aliases"]) == ["abuse@example.test"]


def test_aliasErrors(dataDir, domain):
    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="pw\n")
    assertOneLineError(cli("alias", "add", "alice@example.test", "bob@example.test",
                           dataDir=dataDir, check=False), "is a user")
    assertOneLineError(cli("alias", "add", "fwd@example.test", "x@elsewhere.example",
                           dataDir=dataDir, check=False), "elsewhere.example")
    assertOneLineError(cli("alias", "remove", "nope@example.test", dataDir=dataDir, check=False),
                       "twistmail alias list")
    proc = cli("alias", "add", "lonely@example.test", dataDir=dataDir, check=False)
    assert proc.returncode != 0  # a target is required
    assert accountsFile(dataDir)["aliases"] == {}


def test_routingSeesCliChanges(dataDir, domain):
    from twistmail.auth.accounts import Accounts

    cli("user", "add", "alice@example.test", dataDir=dataDir, stdin="pw\n")
    cli("alias", "add", "team@example.test", "alice@example.test", dataDir=dataDir)
    assert Accounts(dataDir).route("team+x@example.test") == ["alice@example.test"]


# -- check-config ----------------------------------------------------------------


def test_checkConfigDefault(dataDir):
    proc = cli("check-config", dataDir=dataDir)
    rows = table(proc.stdout)
    assert rows[0] == ["SETTING", "VALUE"]
    settings_ = settings(proc.stdout)
    assert settings_["server.data_dir"] == os.path.abspath(dataDir)
    assert settings_["listen.smtp"] == "tcp:2525:interface=127.0.0.1"
    assert settings_["listen.pop3"] == "tcp:2110:interface=127.0.0.1"
    assert settings_["storage.backend"] == "maildir"
    # Every setting is shown, limits included.
    from twistmail.config import SCHEMA
    assert set(settings_) == {"config"} | {f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys}
    assert settings_["smtp.max_message_size"] == "26214400"
    assert proc.stdout.strip().endswith("configuration OK")
    assert os.listdir(dataDir) == []  # checking changes nothing
    found = backends(proc.stdout)
    assert found["maildir"][0] == "twistmail.storage.maildir"
    assert found["mbox"][0] == "twistmail.storage.mbox"


def test_checkConfigShowsTheBackendsOptions(dataDir, tmp_path):
    path = tmp_path / "twistmail.toml"
    path.write_text('[storage]\nbackend = "mbox"\n[storage.mbox]\nlock_timeout = 5\n'
                    "dotlock = false\n[storage.maildir]\nunused = 1\n")
    proc = cli("--config", str(path), "check-config", dataDir=dataDir)
    shown = settings(proc.stdout)
    assert shown["storage.backend"] == "mbox"
    assert shown["storage.mbox.lock_timeout"] == "5"
    assert shown["storage.mbox.dotlock"] == "False"
    assert "storage.maildir.unused" not in shown  # only the chosen backend checks its table


def test_checkConfigFile(dataDir, tmp_path):
    path = tmp_path / "twistmail.toml"
    path.write_text('[server]\nhostname = "mx.example.org"\n[listen]\nsmtp = ["tcp:25"]\n')
    proc = cli("--config", str(path), "check-config", dataDir=dataDir)
    shown = settings(proc.stdout)
    assert shown["config"] == str(path)
    assert shown["server.hostname"] == "mx.example.org"
    assert shown["listen.smtp"] == "tcp:25"
    assert "configuration OK" in proc.stdout


def test_checkConfigExample(dataDir):
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc",
                           "twistmail.toml")
    assert "configuration OK" in cli("--config", example, "check-config", dataDir=dataDir).stdout


@pytest.mark.parametrize("text, where", [
    ("[smtp]\nmax_recipents = 10\n", "[smtp] max_recipents"),
    ("[smtp]\nmax_recipients = 0\n", "[smtp] max_recipients"),
    ('[listen]\nsubmission = ["tpc:587"]\n', "[listen] submission"),
    ('[storage]\nbackend = "nosuch"\n', "[storage] backend: unknown backend 'nosuch'"),
    ('[storage]\nbackend = "mbox"\n[storage.mbox]\nlock_timeout = 0\n',
     "[storage.mbox] lock_timeout"),
    ('[storage]\nbackend = "mbox"\n[storage.mbox]\nlocking = "flock"\n',
     "[storage.mbox] locking: unknown option"),
    ('[storage]\nbackend = "maildir"\n[storage.maildir]\nx = 1\n', "[storage.maildir]"),
    ('[storage]\nmbox = 3\n', "[storage] mbox: unknown key"),
    ("[server\n", "syntax"),
])
def test_checkConfigFails(dataDir, tmp_path, text, where):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = cli("--config", str(path), "check-config", dataDir=dataDir, check=False)
    assert proc.returncode == 1
    assertOneLineError(proc, str(path), where, "Fix:")
    assert "configuration OK" not in proc.stdout


def test_checkConfigMissingFile(dataDir, tmp_path):
    path = str(tmp_path / "missing.toml")
    proc = cli("--config", path, "check-config", dataDir=dataDir, check=False)
    assertOneLineError(proc, path, "not found", "Fix:")


def test_badConfigStopsEveryCommand(dataDir, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[smtp]\nbogus = 1\n")
    proc = cli("--config", str(path), "domain", "add", "example.test", dataDir=dataDir,
               check=False)
    assertOneLineError(proc, "[smtp] bogus")
    assert not os.path.exists(os.path.join(dataDir, "accounts.json"))


def test_corruptAccountsFile(dataDir):
    with open(os.path.join(dataDir, "accounts.json"), "w") as f:
        f.write("{ not json")
    for args in (("domain", "list"), ("domain", "add", "example.test")):
        assertOneLineError(cli(*args, dataDir=dataDir, check=False))
    with open(os.path.join(dataDir, "accounts.json")) as f:
        assert f.read() == "{ not json"  # left for the admin to restore


def test_checkConfigNeverShowsTheSmarthostPassword(dataDir, tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nsmarthost = "smtp.example.net:587"\nsmarthost_username = "mx"\n'
                    'smarthost_password = "hunter2-Secret"\n')
    proc = cli("--config", str(path), "check-config", dataDir=dataDir)
    settings = {row[0]: " ".join(row[1:]) for row in table(proc.stdout)[1:-1]}
    assert settings["relay.smarthost_password"] == "(set)"
    assert settings["relay.smarthost"] == "smtp.example.net:587"
    assert "hunter2" not in proc.stdout + proc.stderr


def test_checkConfigLoadsTheCertificate(dataDir, tmp_path):
    from twistmail.tls import generateSelfSigned

    generateSelfSigned("mx.example.test", str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    good = tmp_path / "good.toml"
    good.write_text('[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n')
    assert "configuration OK" in cli("--config", str(good), "check-config", dataDir=dataDir).stdout
    generateSelfSigned("other.example", str(tmp_path / "other.pem"), str(tmp_path / "otherkey.pem"))
    for text, problem in (('certificate = "missing.pem"\nkey = "key.pem"', "No such file"),
                          ('certificate = "cert.pem"\nkey = "otherkey.pem"', "does not match")):
        bad = tmp_path / "bad.toml"
        bad.write_text("[tls]\n" + text + "\n")
        proc = cli("--config", str(bad), "check-config", dataDir=dataDir, check=False)
        assert proc.returncode == 1
        assert f"{bad}: [tls]:" in proc.stderr and problem in proc.stderr and "Fix:" in proc.stderr
