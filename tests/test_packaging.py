"""Packaging: the wheel ships our twistd plugin into Twisted's namespace package, and nothing else.

``twisted/plugins`` belongs to Twisted: we add one module to it and must never
ship ``twisted/__init__.py`` or ``twisted/plugins/__init__.py`` (installing
those would shadow or break Twisted itself).  The wheel is built with
``python -m build`` from a copy of the source tree, installed into a fresh
venv, and exercised through its console scripts.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
import zipfile

import pytest
from serverproc import TWISTD, ServerProcess, twistdCommand
from support import freePort, maildirFiles

import twistmail

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = "twisted/plugins/twistmail_plugin.py"
FORBIDDEN = ("twisted/__init__.py", "twisted/plugins/__init__.py", "twisted/plugins/dropin.cache",
             "twistmail/plugins/dropin.cache")
#: twistmail's own plugin package: storage backends are found there, built-ins included.
OWN_PLUGINS = ("twistmail/plugins/__init__.py", "twistmail/plugins/twistmail_builtin.py")
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                                     "__pycache__", ".pytest_cache", ".ruff_cache")


def run(argv, timeout: float, cwd=None, input=None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, input=input, stdin=None if input else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(map(str, argv))} took more than {timeout}s:\n"
                             f"{e.output}") from None


def ok(argv, timeout: float = 120, **kwargs) -> str:
    result = run(argv, timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{result.stdout}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """Build the wheel from a copy of the working tree (the repo itself stays untouched)."""
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("the 'build' package is missing: pip install -e '.[test]' installs it")
    base = tmp_path_factory.mktemp("wheel")
    src, dist = base / "src", base / "dist"
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    # A plugin cache left by a development twistd must never end up in the wheel.
    (src / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale cache")
    (src / "twistmail" / "plugins" / "dropin.cache").write_bytes(b"stale cache")
    ok([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)], timeout=600)
    wheels = sorted(os.listdir(dist))
    assert wheels == [f"twistmail-{twistmail.__version__}-py3-none-any.whl"], wheels
    return str(dist / wheels[0])


@pytest.mark.slow
def test_wheel_ships_the_plugin_module_and_no_twisted_package_files(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        distInfo = f"twistmail-{twistmail.__version__}.dist-info/"
        entryPoints = zf.read(distInfo + "entry_points.txt").decode()
        metadata = zf.read(distInfo + "METADATA").decode()

    assert PLUGIN in names
    for name in OWN_PLUGINS:
        assert name in names, f"the wheel must contain {name}"
    for name in FORBIDDEN:
        assert name not in names, f"the wheel must not contain {name}"
    twistedFiles = {n for n in names if n.startswith("twisted/")}
    assert twistedFiles == {PLUGIN}, twistedFiles

    outside = {n for n in names if not n.startswith(("twistmail/", distInfo)) and n != PLUGIN}
    assert outside == set(), f"unexpected files in the wheel (tests? bench?): {sorted(outside)}"

    sourceModules = set()
    for root, dirs, files in os.walk(os.path.join(REPO, "twistmail")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py"):
                sourceModules.add(os.path.relpath(os.path.join(root, f), REPO).replace(os.sep, "/"))
    missing = sourceModules - names
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"

    assert "twistmail = twistmail.cli.main:main" in entryPoints
    for requirement in ("Twisted[tls]", "argon2-cffi", "dnspython", "zope.interface"):
        assert any(line.startswith("Requires-Dist: " + requirement.split("[")[0])
                   for line in metadata.splitlines()), (requirement, metadata)


def venvBin(venv, name: str) -> str:
    return os.path.join(venv, "bin", name)


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_as_a_working_twistd_plugin(wheel, tmp_path):
    venv = str(tmp_path / "venv")
    ok([sys.executable, "-m", "venv", venv], timeout=300)
    # Dependencies come from the package index; pip reuses its cache.
    ok([venvBin(venv, "python"), "-m", "pip", "install", wheel], timeout=900)
    work = tmp_path / "elsewhere"  # not the source tree: nothing may come from the checkout
    work.mkdir()

    location = ok([venvBin(venv, "python"), "-c", "import twistmail; print(twistmail.__file__)"],
                  cwd=work).strip()
    assert location.startswith(os.path.join(venv, "lib")), \
        f"expected a regular install in the venv, got twistmail from {location}"
    assert not location.startswith(REPO)

    twistdHelp = ok([venvBin(venv, "twistd"), "--help"], cwd=work)
    assert "twistmail" in twistdHelp
    assert "All-in-one mail server" in twistdHelp
    assert " web " in twistdHelp, "Twisted's own plugins must still be listed"

    version = ok([venvBin(venv, "twistmail"), "--version"], cwd=work)
    assert version.strip() == f"twistmail {twistmail.__version__}"

    # Storage backends are found through the installed twistmail.plugins package.
    checked = ok([venvBin(venv, "twistmail"), "--data-dir", str(tmp_path / "check"),
                  "check-config"], cwd=work)
    assert re.search(r"\nmaildir +twistmail\.storage\.maildir ", checked)  # table columns pad
    assert re.search(r"\nmbox +twistmail\.storage\.mbox ", checked)

    pluginHelp = ok([venvBin(venv, "twistd"), "twistmail", "--help"], cwd=work)
    for option in ("--config", "--data-dir", "--hostname", "--smtp", "--pop3", "--imap"):
        assert option in pluginHelp

    # The installed server runs and delivers.
    dataDir = str(tmp_path / "data")
    ok([venvBin(venv, "twistmail"), "--data-dir", dataDir, "domain", "add", "example.test"], cwd=work)
    ok([venvBin(venv, "twistmail"), "--data-dir", dataDir, "user", "add", "alice@example.test"],
       cwd=work, input="secret\n")
    smtpPort, pop3Port, imapPort = freePort(), freePort(), freePort()
    process = ServerProcess(
        twistdCommand("--data-dir", dataDir, "--hostname", "mx.example.test",
                      "--smtp", f"tcp:{smtpPort}:interface=127.0.0.1",
                      "--pop3", f"tcp:{pop3Port}:interface=127.0.0.1",
                      "--imap", f"tcp:{imapPort}:interface=127.0.0.1",
                      twistd=venvBin(venv, "twistd")),
        logPath=str(tmp_path / "server.log"), cwd=str(work)).start()
    try:
        process.waitReady(smtpPort, pop3Port, imapPort)
        with smtplib.SMTP("127.0.0.1", smtpPort, timeout=30) as client:
            client.sendmail("x@remote.test", ["alice@example.test"], b"Subject: wheel\r\n\r\nok\r\n")
        assert len(maildirFiles(dataDir, "alice@example.test")) == 1
    finally:
        process.stop()
        print(process.describe())

    # Uninstalling removes our module and leaves Twisted's namespace package intact.
    ok([venvBin(venv, "python"), "-m", "pip", "uninstall", "-y", "twistmail"], timeout=300)
    plugins = ok([venvBin(venv, "python"), "-c",
                  "import os, twisted.plugins as p; print(sorted(os.listdir(p.__path__[0])))"],
                 cwd=work)
    assert "__init__.py" in plugins and "twistmail_plugin.py" not in plugins, plugins
    assert "twistmail" not in ok([venvBin(venv, "twistd"), "--help"], cwd=work)


def test_editable_environment_lists_the_plugin():
    """The development install (pip install -e . --config-settings editable_mode=compat)."""
    for argv in ([sys.executable, "-m", "twisted", "--help"], [TWISTD, "--help"]):
        out = ok(argv, timeout=60)
        assert "twistmail" in out, f"{' '.join(argv)} does not list twistmail:\n{out}"
    version = ok([sys.executable, "-m", "twistmail", "--version"], timeout=60)
    assert version.strip() == f"twistmail {twistmail.__version__}"
