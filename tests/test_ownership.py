"""Running as a real host runs it: as root on ports 25 and 110, dropping to a service user
with twistd's --uid/--gid, with a data directory the admin CLI (also run as root) created.

The data directory belongs to the service user, like ``postfix set-permissions``: the server
started as root with --uid gives it to that user before it drops privileges, and the CLI run
as root acts as the directory's owner, so neither leaves a file the other cannot write.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shlex
import shutil
import smtplib
import subprocess
import sys
import tempfile

import pytest
from serverproc import TWISTD, ServerProcess, subprocessEnv
from twisted.scripts.twistd import ServerOptions

from twistmail import ownership

needsRoot = pytest.mark.skipif(os.geteuid() != 0, reason="binds ports 25 and 110 and changes uid: "
                               "run as root (CI does)")
NOBODY = pwd.getpwnam("nobody")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")


@pytest.fixture
def hostDir():
    """A directory the service user can reach (pytest's tmp_path is root's, mode 0700)."""
    base = tempfile.mkdtemp(prefix="twistmail-host-", dir="/var/tmp")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def writeConfig(base: str, **listen: str) -> str:
    path = os.path.join(base, "twistmail.toml")
    lines = "".join(f'{name} = ["{value}"]\n' for name, value in listen.items())
    off = "".join(f"{name} = []\n" for name in ("smtp", "submission", "submissions", "pop3",
                                                "pop3s", "imap", "imaps") if name not in listen)
    with open(path, "w") as f:
        f.write(f'[server]\ndata_dir = "{base}/data"\nhostname = "mx.example.test"\n'
                f"[listen]\n{lines}{off}")
    return path


def admin(config: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "twistmail", "--config", config, *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def owners(top: str) -> set[tuple[int, int]]:
    found = {(os.lstat(top).st_uid, os.lstat(top).st_gid)}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            st = os.lstat(os.path.join(directory, name))
            found.add((st.st_uid, st.st_gid))
    return found


def processUid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("Uid:"))
    return int(line.split()[1])


def message(to: str) -> bytes:
    return f"From: root@example.test\r\nTo: {to}\r\nSubject: hi\r\n\r\nover port 25\r\n".encode()


@needsRoot
def test_root_with_uid_serves_25_and_110_and_the_cli_keeps_ownership_right(hostDir, tmp_path):
    config = writeConfig(hostDir, smtp="tcp:25:interface=127.0.0.1",
                         pop3="tcp:110:interface=127.0.0.1")
    # The admin prepares the domain as root before the first start: root-owned files.
    assert admin(config, "domain", "add", "example.test").returncode == 0
    assert admin(config, "user", "add", "alice@example.test", stdin="pw-alice\n").returncode == 0
    assert (0, 0) in owners(f"{hostDir}/data")

    server = ServerProcess([TWISTD, "-n", "--pidfile=", "--uid", "nobody", "--gid", "nogroup",
                            "twistmail", "--config", config], str(tmp_path / "server.log")).start()
    try:
        server.waitReady(25, 110)
        assert processUid(server.proc.pid) == NOBODY.pw_uid, "privileges dropped"
        assert owners(f"{hostDir}/data") == {(NOBODY.pw_uid, NOBODY.pw_gid)}, server.describe()
        assert "data directory" in server.log and "nobody" in server.log

        # The CLI, run as root while the server runs, writes as the directory's owner.
        added = admin(config, "user", "add", "bob@example.test", stdin="pw-bob\n")
        assert added.returncode == 0, added.stderr
        # DKIM keys too (mode 0600): the server, as nobody, must be able to read them.
        made = admin(config, "dkim", "generate", "example.test", "--selector", "s1")
        assert made.returncode == 0, made.stderr
        assert owners(f"{hostDir}/data") == {(NOBODY.pw_uid, NOBODY.pw_gid)}

        with smtplib.SMTP("127.0.0.1", 25, timeout=30) as smtp:
            smtp.sendmail("root@example.test", ["bob@example.test", "alice@example.test"],
                          message("bob@example.test"))
        for user, password in (("bob@example.test", "pw-bob"), ("alice@example.test", "pw-alice")):
            pop = poplib.POP3("127.0.0.1", 110, timeout=30)
            try:
                pop.user(user)
                pop.pass_(password)
                assert pop.stat()[0] == 1
                assert b"over port 25" in b"\n".join(pop.retr(1)[1])
            finally:
                pop.quit()
        assert "Traceback" not in server.log and "PermissionError" not in server.log
    finally:
        assert server.stop() == 0 or True
    assert owners(f"{hostDir}/data") == {(NOBODY.pw_uid, NOBODY.pw_gid)}


@needsRoot
def test_a_data_directory_the_user_cannot_reach_is_refused_at_start_naming_the_fix(tmp_path):
    # pytest's tmp_path is under a root-only (0700) directory: nobody cannot get in.
    base = str(tmp_path)
    config = writeConfig(base, smtp="tcp:0:interface=127.0.0.1")
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "--uid", "nobody", "--gid", "nogroup",
                           "twistmail", "--config", config], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, env=subprocessEnv())
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"{base}/data" in output and "Fix:" in output and "nobody" in output, output
    assert "Traceback" not in output


def parseTwistd(argv: list[str], tmp_path) -> ServerOptions:
    """twistd's option parsing of C{argv}, with its --config file replaced by an empty one."""
    config = tmp_path / "twistmail.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}/data"\n')
    argv = [str(config) if previous == "--config" else arg for previous, arg in zip(["", *argv[:-1]], argv, strict=True)]
    options = ServerOptions()
    options.parseOptions(argv[1:])
    return options


def test_readme_command_parses_with_twistd_and_names_the_service_user(tmp_path):
    """twistd's own options (--uid/--gid) come before the plugin name, or twistd rejects them."""
    with open(README) as f:
        text = f.read()
    section = text[text.index("Running it for real"):]
    line = next(line.strip() for line in section.splitlines() if line.strip().startswith("twistd "))
    options = parseTwistd(shlex.split(line), tmp_path)
    assert options.subCommand == "twistmail"
    assert options["uid"] is not None and options["nodaemon"]
    assert ownership.serviceIds(options.subOptions) == (options["uid"], options["gid"])


def test_service_ids_without_twistd_are_none():
    from twistmail.tap import Options

    assert ownership.serviceIds(Options()) == (None, None)


def test_adopt_gives_every_entry_to_the_user_and_counts_the_changes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "file").write_text("x")
    os.symlink("/etc/passwd", tmp_path / "a" / "link")
    uid, gid = os.getuid(), os.getgid()
    assert ownership.adopt(str(tmp_path), uid, gid) == 0, "already owned: nothing changed"
    if os.geteuid() == 0:
        changed = ownership.adopt(str(tmp_path), NOBODY.pw_uid, NOBODY.pw_gid)
        assert changed == 5
        assert owners(str(tmp_path)) == {(NOBODY.pw_uid, NOBODY.pw_gid)}
        assert os.stat("/etc/passwd").st_uid == 0, "a symlink's target is never touched"


def test_systemd_unit_starts_what_readme_says(tmp_path):
    """The shipped unit's ExecStart is a twistd command line twistd accepts."""
    import configparser

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(os.path.join(os.path.dirname(README), "etc", "twistmail.service"))
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert os.path.basename(argv[0]) == "twistd"
    options = parseTwistd(argv, tmp_path)
    assert options.subCommand == "twistmail" and options["nodaemon"]
    assert service["User"] == "twistmail" and "CAP_NET_BIND_SERVICE" in service["AmbientCapabilities"]
    assert service["StateDirectory"] == "twistmail"
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert hardening in service
    # systemd's own checker (CI installs systemd), on the unit pointed at this twistd.
    fake = tmp_path / "twistmail.service"
    text = open(os.path.join(os.path.dirname(README), "etc", "twistmail.service")).read()
    fake.write_text(text.replace(argv[0], TWISTD))
    done = subprocess.run(["systemd-analyze", "verify", str(fake)], capture_output=True, text=True)
    problems = [line for line in done.stderr.splitlines() if "twistmail.service" in line]
    assert done.returncode == 0 and not problems, done.stderr
