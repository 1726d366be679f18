"""Storage backends and filters are Twisted plugins: discovery, validation, third-party ones.

tests/plugins/ plays the part of a separately installed distribution's
``twistmail/plugins/`` directory: the fixture adds it to the plugin package's
search path, as installing such a package does, and takes it away after.
"""

from __future__ import annotations

import os
import poplib
import smtplib
import sys

import pytest
from support import addUser, startServer, storedMessages
from twisted.plugin import IPlugin
from zope.interface.verify import verifyObject

import twistmail.plugins
from twistmail import _pluginload
from twistmail.config import ConfigError
from twistmail.interfaces import IMailStore, IMailStoreFactory
from twistmail.testing import StoreConformanceTests

TEST_PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")


def addPluginDirectory(path: str):
    twistmail.plugins.__path__.append(path)
    try:
        yield path
    finally:
        twistmail.plugins.__path__.remove(path)
        for name in [n for n in sys.modules if n.startswith("twistmail.plugins.")
                     and getattr(sys.modules[n], "__file__", "").startswith(path)]:
            del sys.modules[name]


@pytest.fixture
def examplePlugin():
    yield from addPluginDirectory(TEST_PLUGINS)


@pytest.fixture
def pluginDir(tmp_path):
    """An empty directory of dropins, searched like tests/plugins/."""
    d = tmp_path / "plugins"
    d.mkdir()
    yield from addPluginDirectory(str(d))


HEADER = """from zope.interface import implementer
from twistmail.interfaces import IMailStoreFactory
"""


def test_builtin_backends_register_through_the_plugin_path():
    found = _pluginload.available(IMailStoreFactory)
    assert {"maildir", "mbox"} <= set(found)
    for name, plugin in found.items():
        assert plugin.name == name
        assert verifyObject(IMailStoreFactory, plugin)
        assert IPlugin.providedBy(plugin)
    assert "example" not in found  # tests/plugins is not on the path by default


def test_example_plugin_is_discovered_and_builds_a_store(examplePlugin, dataDir):
    factory = _pluginload.find(IMailStoreFactory, "example", "[storage] backend", "backend")
    assert type(factory).__module__ == "twistmail.plugins.examplestore"
    assert verifyObject(IMailStore, factory.makeStore({"quota": 5}, dataDir))
    with pytest.raises(ConfigError, match=r"\[storage.example\] quota: .* Fix:"):
        factory.makeStore({"quota": 0}, dataDir)
    with pytest.raises(ConfigError, match=r"\[storage.example\] colour: unknown option"):
        factory.makeStore({"colour": "blue"}, dataDir)


def test_unknown_backend_lists_the_available_ones(examplePlugin):
    with pytest.raises(ConfigError) as info:
        _pluginload.find(IMailStoreFactory, "s3", "[storage] backend", "backend")
    message = str(info.value)
    assert message.startswith("[storage] backend: unknown backend 's3'. Fix: use one of ")
    assert "example, maildir, mbox" in message


def test_two_plugins_with_one_name_are_refused_naming_both(pluginDir):
    with open(os.path.join(pluginDir, "impostor.py"), "w") as f:
        f.write(HEADER + """
from twistmail.storage.mbox import MboxStoreFactory

@implementer(IMailStoreFactory)
class Impostor(MboxStoreFactory):
    pass

impostor = Impostor()
""")
    with pytest.raises(ConfigError) as info:
        _pluginload.find(IMailStoreFactory, "maildir", "[storage] backend", "backend")
    message = str(info.value)
    assert "two plugins are named 'mbox'" in message
    assert "twistmail.storage.mbox" in message and "twistmail.plugins.impostor" in message


def test_a_plugin_that_does_not_implement_the_interface_is_refused(pluginDir):
    with open(os.path.join(pluginDir, "broken.py"), "w") as f:
        f.write(HEADER + """
@implementer(IMailStoreFactory)
class Broken:
    name = "broken"
    description = "forgot makeStore"

broken = Broken()
""")
    with pytest.raises(ConfigError, match=r"plugin twistmail.plugins.broken does not implement "
                                          r"IMailStoreFactory.*makeStore.*Fix:"):
        _pluginload.available(IMailStoreFactory)


class TestExampleStore(StoreConformanceTests):
    """The conformance suite on a backend that twistmail does not ship."""

    @pytest.fixture(autouse=True)
    def _plugin(self, examplePlugin):
        self.factory = _pluginload.find(IMailStoreFactory, "example", "[storage] backend")

    def makeStore(self, dataDir):
        return self.factory.makeStore({}, dataDir)


def test_a_server_runs_on_the_example_backend(examplePlugin, dataDir):
    """[storage] backend names the plugin, [storage.example] reaches its makeStore."""
    addUser(dataDir, "alice@example.test")
    server = startServer(dataDir, storage={"backend": "example"},
                         backendOptions={"example": {"quota": 1}})
    try:
        assert type(server.store).__name__ == "ExampleStore"
        with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
            s.sendmail("x@remote.test", ["alice@example.test"], b"Subject: one\r\n\r\nhi\r\n")
            with pytest.raises(smtplib.SMTPDataError) as info:  # the quota option at work
                s.sendmail("x@remote.test", ["alice@example.test"], b"Subject: two\r\n\r\n.\r\n")
            assert info.value.smtp_code == 451
        pop = poplib.POP3("127.0.0.1", server.pop3Port, timeout=10)
        pop.user("alice@example.test")
        pop.pass_("secret")
        assert pop.stat()[0] == 1
        assert pop.retr(1)[1][-1] == b"hi"
        pop.quit()
    finally:
        server.stop()


def test_a_server_runs_the_example_filter_its_config_names(examplePlugin, dataDir, tmp_path):
    """[filters] inbound names the third-party filter; [filters.example-subject] configures it."""
    addUser(dataDir, "alice@example.test")
    config = tmp_path / "twistmail.toml"
    config.write_text('[filters]\ninbound = ["example-subject"]\n\n'
                      '[filters.example-subject]\nreject_subject = "lottery"\ntimeout = 5\n')
    server = startServer(dataDir, configFile=str(config))
    try:
        with smtplib.SMTP("127.0.0.1", server.smtpPort) as s:
            with pytest.raises(smtplib.SMTPDataError) as info:
                s.sendmail("x@remote.test", ["alice@example.test"],
                           b"Subject: You won the LOTTERY\r\n\r\nclaim it\r\n")
            assert info.value.smtp_code == 550
            assert info.value.smtp_error == b"5.7.1 Subject refused by mx.example.test"
            s.sendmail("x@remote.test", ["alice@example.test"], b"Subject: lunch?\r\n\r\nhi\r\n")
        [message] = storedMessages(dataDir, "alice@example.test")
        header = message.split(b"\r\n\r\n")[0]
        assert header.startswith(b"Received: ")
        assert b"\r\nX-Example-Filter: checked by mx.example.test\r\nSubject: lunch?" in header
    finally:
        server.stop()
