"""README.rst and CI run the same test command: the one line in .ci/test-command.

.ci/run is exercised for real, with stand-ins for apt-get, python3 and the mail
tools on PATH, so what it executes (and how it treats pytest's exit status 5,
"no tests collected") is checked without installing anything.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_COMMAND_FILE = os.path.join(REPO, ".ci", "test-command")
CI_RUN = os.path.join(REPO, ".ci", "run")
README = os.path.join(REPO, "README.rst")


def readTestCommand() -> str:
    with open(TEST_COMMAND_FILE) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 and lines[0].strip(), \
        f".ci/test-command must hold exactly one non-empty line, not {lines!r}"
    return lines[0].strip()


def test_readme_contains_the_test_command_verbatim():
    command = readTestCommand()
    assert os.path.exists(README), \
        f"README.rst is missing; it must document the test command verbatim:\n    {command}"
    with open(README, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    assert command in lines, (
        f"README.rst must contain this line exactly as in .ci/test-command "
        f"(indentation aside):\n    {command}")


def test_ci_run_reads_the_command_instead_of_repeating_it():
    with open(CI_RUN) as f:
        script = f.read()
    assert ".ci/test-command" in script
    assert readTestCommand() not in script, \
        ".ci/run repeats the test command: read it from .ci/test-command instead"
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script


LOG_STUB = """#!/bin/sh
printf '%s\\037' {name} "$@" >> "$STUB_LOG"
printf '\\n' >> "$STUB_LOG"
"""

PYTHON3_STUB = LOG_STUB + """
case "$1" in
  --version) echo "Python 3.11.0 (stub)" ;;
  -m) if [ "$2" = venv ]; then
        mkdir -p "$3/bin"
        cp "$STUB_DIR/venv-pip" "$3/bin/pip"
        cp "$STUB_DIR/venv-pytest" "$3/bin/pytest"
      fi ;;
esac
exit 0
"""

STUBS = {
    "apt-get": LOG_STUB.format(name="apt-get"),
    "sudo": '#!/bin/sh\nexec "$@"\n',
    "python3": PYTHON3_STUB.format(name="python3"),
    "swaks": LOG_STUB.format(name="swaks") + 'echo "swaks version 0 (stub)"\n',
    "fetchmail": LOG_STUB.format(name="fetchmail") + 'echo "This is fetchmail release 0 (stub)"\n',
    "mbsync": LOG_STUB.format(name="mbsync") + 'echo "isync 0 (stub)"\n',
    "neomutt": LOG_STUB.format(name="neomutt") + 'echo "NeoMutt 0 (stub)"\n',
    "curl": LOG_STUB.format(name="curl") + 'echo "curl 0 (stub)"\n',
    "openssl": LOG_STUB.format(name="openssl") + 'echo "OpenSSL 0 (stub)"\n',
    # The rest only so the scratch run never touches the real system: a real
    # debconf-set-selections locks debconf's database, and parallel runs of these
    # tests (xdist) then failed on each other's lock.
    # It reads its stdin, as the real one does: exiting first would kill the
    # piped echo with SIGPIPE (status 141 under pipefail) whenever it lost the race.
    "debconf-set-selections": LOG_STUB.format(name="debconf-set-selections") + "cat >/dev/null\n",
    **{name: LOG_STUB.format(name=name) + f'echo "{name} 0 (stub)"\n'
       for name in ("systemd-analyze", "logrotate", "dpkg-query", "chromium", "chromedriver",
                    "postconf", "rspamd")},
    "venv-pip": LOG_STUB.format(name=".venv/bin/pip"),
    "venv-pytest": LOG_STUB.format(name=".venv/bin/pytest") + 'exit "$STUB_PYTEST_STATUS"\n',
}


def runCI(tmp_path, pytestStatus: int) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run a copy of .ci/run in a scratch checkout with stand-in tools; return its calls."""
    checkout = tmp_path / "checkout"
    (checkout / ".ci").mkdir(parents=True)
    shutil.copy(CI_RUN, checkout / ".ci" / "run")
    shutil.copy(TEST_COMMAND_FILE, checkout / ".ci" / "test-command")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "CI": "true", "STUB_LOG": str(log),
           "STUB_DIR": str(stubs), "STUB_PYTEST_STATUS": str(pytestStatus),
           "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(checkout / ".ci" / "run")], cwd=str(tmp_path),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=60, env=env)
    calls = [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines()] \
        if log.exists() else []
    return result, calls


def expectedTestCalls() -> list[list[str]]:
    """The commands of .ci/test-command (a chain joined with &&), as argv lists."""
    words = shlex.split(readTestCommand())
    calls, current = [], []
    for word in words:
        if word == "&&":
            calls.append(current)
            current = []
        else:
            current.append(word)
    calls.append(current)
    return calls


def test_ci_run_installs_the_tools_then_runs_exactly_the_test_command(tmp_path):
    result, calls = runCI(tmp_path, pytestStatus=0)
    assert result.returncode == 0, result.stdout

    aptCalls = [c for c in calls if c[0] == "apt-get"]
    assert aptCalls[0][:2] == ["apt-get", "update"]
    install = aptCalls[1]
    assert install[:2] == ["apt-get", "install"] and "-y" in install
    assert "--no-install-recommends" in install
    assert {"swaks", "libnet-ssleay-perl", "fetchmail", "isync", "neomutt", "curl",
            "openssl", "systemd", "logrotate", "pebble", "chromium", "chromium-driver",
            "postfix", "rspamd", "opendkim-tools", "postgresql"} <= set(install)

    # Versions first, then the test command, nothing else from the venv.
    assert "swaks version 0 (stub)" in result.stdout
    assert "fetchmail release 0 (stub)" in result.stdout
    assert "isync 0 (stub)" in result.stdout and "NeoMutt 0 (stub)" in result.stdout
    assert "curl 0 (stub)" in result.stdout and "OpenSSL 0 (stub)" in result.stdout
    assert "Python 3.11.0 (stub)" in result.stdout
    tools = ("apt-get", "debconf-set-selections", "swaks", "fetchmail", "mbsync", "neomutt",
             "curl", "openssl", "systemd-analyze", "logrotate", "dpkg-query", "chromium",
             "chromedriver", "postconf", "rspamd")
    testCalls = [c for c in calls if c[0] not in tools
                 and c[:2] not in (["python3", "--version"], ["python3", "-c"])]
    assert testCalls == expectedTestCalls()
    assert calls.index(aptCalls[1]) < calls.index(testCalls[0])


@pytest.mark.parametrize("status", [1, 2, 5])
def test_ci_run_fails_when_pytest_fails_or_collects_nothing(tmp_path, status):
    result, calls = runCI(tmp_path, pytestStatus=status)
    assert result.returncode != 0, result.stdout
    assert calls[-1][0] == ".venv/bin/pytest", result.stdout
    if status == 5:
        assert "no tests were collected" in result.stdout


def test_readme_renders_without_errors():
    """A malformed table renders as an error block (on PyPI too: it is the long description)."""
    import docutils.core
    import docutils.utils

    with open(README, encoding="utf-8") as f:
        text = f.read()
    try:
        docutils.core.publish_doctree(text, settings_overrides={"halt_level": 2, "report_level": 2})
    except docutils.utils.SystemMessage as e:
        pytest.fail(f"README.rst does not render cleanly: {e}")


def test_readme_documents_every_config_key():
    from twistmail.config import SCHEMA

    with open(README, encoding="utf-8") as f:
        text = f.read()
    missing = [f"[{section}] {key}" for section, keys in SCHEMA.items() for key in keys
               if f"``[{section}] {key}``" not in text and f"``{key}``" not in text]
    assert not missing, f"README.rst's configuration reference lacks {missing}"
