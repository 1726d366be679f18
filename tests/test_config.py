"""Configuration loading: the embedded default, the TOML file, overrides, and errors a sysadmin can act on."""

from __future__ import annotations

import os
import re
import tomllib

import pytest

from twistmail import config
from twistmail.config import SCHEMA, ConfigError

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc",
                       "twistmail.toml")


def write(tmp_path, text, name="twistmail.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def loadError(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path, overrides)
    return str(info.value)


# -- the embedded default -------------------------------------------------------


def test_embeddedDefault(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = config.load()
    assert c.listeners("smtp") == ["tcp:2525:interface=127.0.0.1"]
    assert c.listeners("pop3") == ["tcp:2110:interface=127.0.0.1"]
    assert c.listeners("imap") == ["tcp:2143:interface=127.0.0.1"]
    assert c.listeners("submission") == ["tcp:2587:interface=127.0.0.1"]
    for protocol, port in (("submissions", 2465), ("pop3s", 2995), ("imaps", 2993)):
        assert c.listeners(protocol) == [f"tcp:{port}:interface=127.0.0.1"]
    assert c.dataDir == os.path.join(str(tmp_path), "twistmail-data")
    assert os.path.isabs(c.dataDir)
    assert c.hostname  # the FQDN, never empty
    assert c["storage"]["backend"] == "maildir"
    assert c["smtp"]["max_message_size"] == 25 * 1024 * 1024
    assert c["accounts"]["reload_interval"] == 1
    # Every key of the schema has a value.
    for section, keys in SCHEMA.items():
        assert set(c[section]) == set(keys)
    # Parsing has no side effects: no data directory appears.
    assert not os.path.exists(c.dataDir)


def test_configIsReadOnly():
    c = config.load(None, {"server": {"data_dir": "/srv/mail"}})
    with pytest.raises(TypeError):
        c["server"]["data_dir"] = "/elsewhere"


# -- file and overrides -----------------------------------------------------------


def test_fileValuesAndDefaultsForTheRest(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "mx.example.org"\n[smtp]\nmax_recipients = 7\n')
    c = config.load(path)
    assert c.hostname == "mx.example.org"
    assert c["smtp"]["max_recipients"] == 7
    assert c["smtp"]["timeout"] == SCHEMA["smtp"]["timeout"].default
    assert c.path == path


def test_overridesWinOverFile(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "from-file"\ndata_dir = "/srv/file"\n'
                           '[listen]\nsmtp = ["tcp:25"]\n')
    c = config.load(path, {"server": {"hostname": "from-cli", "data_dir": "/srv/cli"},
                           "listen": {"smtp": ["tcp:2525"]}})
    assert c.hostname == "from-cli"
    assert c.dataDir == "/srv/cli"
    assert c.listeners("smtp") == ["tcp:2525"]


def test_relativeDataDirIsRelativeToTheFile(tmp_path, monkeypatch):
    confDir = tmp_path / "etc"
    confDir.mkdir()
    path = write(confDir, '[server]\ndata_dir = "../var/mail"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert config.load(path).dataDir == str(tmp_path / "var" / "mail")
    # Also when the file itself is given by a relative path.
    assert config.load(os.path.join("..", "etc", "twistmail.toml")).dataDir \
        == str(tmp_path / "var" / "mail")


def test_relativeDataDirOverrideIsRelativeToCwd(tmp_path, monkeypatch):
    path = write(tmp_path, '[server]\ndata_dir = "from-file"\n')
    monkeypatch.chdir(tmp_path)
    os.mkdir("sub")
    monkeypatch.chdir(tmp_path / "sub")
    assert config.load(path, {"server": {"data_dir": "cli-data"}}).dataDir \
        == str(tmp_path / "sub" / "cli-data")


def test_singleEndpointStringAccepted(tmp_path):
    path = write(tmp_path, '[listen]\nsmtp = "tcp:25"\n')
    assert config.load(path).listeners("smtp") == ["tcp:25"]


def test_listenerCanBeDisabled(tmp_path):
    path = write(tmp_path, "[listen]\npop3 = []\n")
    assert config.load(path).listeners("pop3") == []


# -- errors: file, key and fix ----------------------------------------------------


def assertActionable(message, path, where):
    assert message.startswith(path + ":"), message
    assert where in message, message
    assert "Fix:" in message and message.split("Fix:", 1)[1].strip(), message


def test_unknownSection(tmp_path):
    path = write(tmp_path, "[smpt]\ntimeout = 5\n")
    message = loadError(path)
    assertActionable(message, path, "[smpt]")
    assert "unknown section" in message
    assert "smtp" in message.split("Fix:")[1]  # lists the valid ones


def test_unknownKey(tmp_path):
    path = write(tmp_path, "[smtp]\nmax_recipient = 5\n")
    message = loadError(path)
    assertActionable(message, path, "[smtp] max_recipient")
    assert "unknown key" in message
    assert "max_recipients" in message.split("Fix:")[1]


def test_backendTablesArePassedThroughUnchecked(tmp_path):
    """[storage.<name>] belongs to the backend plugin called <name>: config only carries it."""
    path = write(tmp_path, '[storage]\nbackend = "mystore"\n[storage.mystore]\nbucket = "b"\n'
                           "retries = 3\n[storage.mystore.nested]\nx = 1\n[storage.mbox]\nlock_timeout = 5\n")
    c = config.load(path)
    assert c["storage"]["backend"] == "mystore"
    assert set(c["storage"]) == {"backend"}
    assert c.storageOptions() == {"bucket": "b", "retries": 3, "nested": {"x": 1}}
    assert dict(c.backendOptions["mbox"]) == {"lock_timeout": 5}
    assert config.load(None).storageOptions() == {}


@pytest.mark.parametrize("text, where", [
    ('[smtp]\nmax_recipients = "100"\n', "[smtp] max_recipients"),
    ("[smtp]\nmax_recipients = 1.5\n", "[smtp] max_recipients"),
    ("[smtp]\nmax_recipients = true\n", "[smtp] max_recipients"),
    ("[server]\nhostname = 5\n", "[server] hostname"),
    ("[listen]\nsmtp = [25]\n", "[listen] smtp"),
    ("[listen]\nsmtp = 25\n", "[listen] smtp"),
])
def test_wrongType(tmp_path, text, where):
    path = write(tmp_path, text)
    message = loadError(path)
    assertActionable(message, path, where)
    assert "expected" in message


def test_sectionThatIsNotATable(tmp_path):
    path = write(tmp_path, "smtp = 5\n")
    message = loadError(path)
    assertActionable(message, path, "smtp")


@pytest.mark.parametrize("section, key, value, minimum", [
    ("smtp", "max_line_length", 100, 512),
    ("smtp", "max_message_size", 0, 1024),
    ("pop3", "timeout", 0, 1),
    ("server", "max_connections", -1, 1),
])
def test_belowMinimum(tmp_path, section, key, value, minimum):
    path = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    message = loadError(path)
    assertActionable(message, path, f"[{section}] {key}")
    assert str(minimum) in message.split("Fix:")[1]


def test_minimumItselfAccepted(tmp_path):
    path = write(tmp_path, "[smtp]\nmax_line_length = 512\n")
    assert config.load(path)["smtp"]["max_line_length"] == 512


def test_badOverrideNamesTheCommandLine():
    message = loadError(None, {"smtp": {"max_recipients": 0}})
    assert message.startswith("command line:")
    assert "[smtp] max_recipients" in message and "Fix:" in message


def test_tomlSyntaxError(tmp_path):
    path = write(tmp_path, '[server]\nhostname = "unterminated\n')
    message = loadError(path)
    assertActionable(message, path, "syntax")
    assert "line 2" in message


def test_notUtf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# Konfiguration f\xfcr den Server\n[server]\n")
    message = loadError(str(path))
    assertActionable(message, str(path), "UTF-8")


def test_missingFile(tmp_path):
    path = str(tmp_path / "nope.toml")
    message = loadError(path)
    assertActionable(message, path, "not found")
    assert "--config" in message


def test_directoryInsteadOfFile(tmp_path):
    message = loadError(str(tmp_path))
    assertActionable(message, str(tmp_path), "file")


def test_badEndpoint(tmp_path):
    path = write(tmp_path, '[listen]\nimaps = ["tcp:993", "tcp:nine"]\n')
    message = loadError(path)
    assertActionable(message, path, "[listen] imaps")
    assert "bad endpoint 'tcp:nine'" in message


def test_badEndpointFromOverride(tmp_path):
    """twistd --submission ...: the error blames the command line, not a file the admin never wrote."""
    message = loadError(None, {"listen": {"submission": ["bogus:1587"]}})
    assert message.startswith("command line: [listen] submission:"), message
    assert "Unknown endpoint type" in message and "Fix:" in message
    path = write(tmp_path, "[server]\n")
    assert loadError(path, {"listen": {"pop3s": ["tcp:x"]}}).startswith("command line:")


# -- etc/twistmail.toml documents every key ---------------------------------------


def exampleLines() -> dict[str, list[str]]:
    """section -> the raw lines of etc/twistmail.toml in it."""
    sections: dict[str, list[str]] = {}
    current = None
    with open(EXAMPLE, encoding="utf-8") as f:
        for line in f:
            header = re.match(r"^\[([a-z0-9_.]+)\]\s*(#.*)?$", line)
            if header:
                current = header.group(1)
                sections.setdefault(current, [])
            elif current is not None:
                sections[current].append(line.rstrip("\n"))
    return sections


def test_exampleConfigLoads(tmp_path):
    c = config.load(EXAMPLE)
    assert c.path == EXAMPLE
    assert c.hostname == "mail.example.org"


def test_exampleConfigDocumentsEveryKey():
    with open(EXAMPLE, "rb") as f:
        parsed = tomllib.load(f)
    lines = exampleLines()
    missing = []
    for section, keys in SCHEMA.items():
        for key in keys:
            assignment = re.compile(rf"^{re.escape(key)}\s*=")
            if not any(assignment.match(line) for line in lines.get(section, [])):
                missing.append(f"[{section}] {key}")
            elif key not in parsed.get(section, {}):
                missing.append(f"[{section}] {key} (commented out?)")
    assert missing == [], f"etc/twistmail.toml does not document: {', '.join(missing)}"
    assert set(parsed) == set(SCHEMA)


def test_exampleConfigShowsDefaultsUnlessMarkedExample():
    """The file promises: 'the value shown is the default unless marked "example"'."""
    with open(EXAMPLE, "rb") as f:
        parsed = tomllib.load(f)
    wrong = []
    for section, lines in exampleLines().items():
        for line in lines:
            match = re.match(r"^([a-z_]+)\s*=", line)
            if not match or "# example" in line:
                continue
            key = match.group(1)
            if parsed[section][key] != SCHEMA[section][key].default:
                wrong.append(f"[{section}] {key} = {parsed[section][key]!r} "
                             f"(default {SCHEMA[section][key].default!r})")
    assert wrong == []


@pytest.mark.parametrize("text, where, fix", [
    ('[relay]\ntrusted_networks = ["10.0.0.0/33"]\n', "[relay] trusted_networks", "127.0.0.0/8"),
    ('[relay]\ntrusted_networks = ["localhost"]\n', "[relay] trusted_networks", "127.0.0.0/8"),
    ('[relay]\nnameservers = ["dns.example"]\n', "[relay] nameservers", "127.0.0.1:53"),
    ('[relay]\nnameservers = ["127.0.0.1:99999"]\n', "[relay] nameservers", "127.0.0.1:53"),
    ('[relay]\nsmarthost = "[::1"\n', "[relay] smarthost", "mx.example.org:25"),
    ('[relay]\nsmarthost_tls = "maybe"\n', "[relay] smarthost_tls", 'smarthost_tls = "required"'),
    ("[relay]\nretry_min = 600\nretry_max = 300\n", "[relay] retry_max", "at least retry_min"),
    ('[relay]\nsmarthost_username = "u"\nsmarthost_password = "p"\n', "[relay] smarthost_username",
     "smarthost ="),
    ('[relay]\nsmarthost = "relay.example:587"\nsmarthost_username = "u"\n',
     "[relay] smarthost_password", "both"),
    ('[relay]\nsmarthost = "relay.example:587"\nsmarthost_username = "u"\n'
     'smarthost_password = "p"\nsmarthost_tls = "opportunistic"\n', "[relay] smarthost_tls",
     '"required"'),
    ('[relay]\nsmarthost_ca_file = "missing.pem"\n', "[relay] smarthost_ca_file", "PEM"),
    ('[relay]\nmta_sts_ca_file = "missing.pem"\n', "[relay] mta_sts_ca_file", "PEM"),
    ("[relay]\nmta_sts = 1\n", "[relay] mta_sts", "true"),
    ("[relay]\nmax_queue_lifetime = 0\n", "[relay] max_queue_lifetime", "at least 1"),
    ("[relay]\nmax_messages_per_connection = 0\n", "[relay] max_messages_per_connection",
     "at least 1"),
])
def test_relayErrorsNameKeyAndFix(tmp_path, text, where, fix):
    assertFileError(tmp_path, text, where, fix)


def assertFileError(tmp_path, text: str, where: str, fix: str) -> None:
    """A config file of C{text} is refused naming the file, C{where}, and C{fix} after Fix:."""
    path = write(tmp_path, text)
    message = loadError(path)
    assertActionable(message, path, where)
    assert fix in message.split("Fix:")[1], message


def test_smtpsSmarthostWithCredentials(tmp_path):
    """SMTPS (implicit TLS, verified) carries AUTH credentials like required STARTTLS."""
    path = write(tmp_path, '[relay]\nsmarthost = "relay.example:465"\nsmarthost_username = "u"\n'
                 'smarthost_password = "p"\nsmarthost_tls = "implicit"\n')
    assert config.load(path)["relay"]["smarthost_tls"] == "implicit"


def test_connectionReuseDefaultsAsPostfix():
    relay = config.load(None)["relay"]
    assert (relay["connection_reuse"], relay["connection_cache_time"],
            relay["max_messages_per_connection"]) == (True, 2.0, 100)


def test_relayDefaultsTrustNoNetwork():
    relay = config.load(None)["relay"]
    assert relay["trusted_networks"] == [] and relay["smtp_port"] == 25
    assert (relay["retry_min"], relay["retry_max"], relay["max_queue_lifetime"]) == (300, 4000, 432000)


def test_relativeCaFileIsRelativeToTheConfigFile(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    path = write(tmp_path, '[relay]\nsmarthost_ca_file = "ca.pem"\nmta_sts_ca_file = "ca.pem"\n')
    relay = config.load(path)["relay"]
    assert relay["smarthost_ca_file"] == relay["mta_sts_ca_file"] == str(tmp_path / "ca.pem")


def test_mtaStsIsOnByDefault():
    """As Stalwart, Mox and Maddy: policies are applied out of the box."""
    relay = config.load(None)["relay"]
    assert (relay["mta_sts"], relay["mta_sts_port"], relay["mta_sts_ca_file"]) == (True, 443, "")


def test_removedKeyNamesTheFix(tmp_path):
    """[auth] lockout locked accounts (anyone could lock out anyone); it is gone, by name."""
    path = write(tmp_path, "[auth]\nlockout = 900\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert "[auth] lockout: no longer exists" in str(caught.value)
    assert "block_time" in str(caught.value)


# -- the metrics listener is on loopback ----------------------------------------------


def test_metricsListenerIsOffByDefault():
    c = config.load(None)
    assert c.listeners("metrics") == []
    assert c["metrics"]["allow_non_loopback"] is False


@pytest.mark.parametrize("endpoint", ["tcp:9325", "tcp:9325:interface=0.0.0.0",
                                      "tcp:9325:interface=192.0.2.1", "tcp6:9325",
                                      "tcp6:9325:interface=\\:\\:", "haproxy:tcp:9325",
                                      "tcp:9325:interface=localhost"])
def test_metricsListenerOffLoopbackIsRefused(tmp_path, endpoint):
    path = write(tmp_path, "[listen]\nmetrics = [\"tcp:9325:interface=127.0.0.1\", '" + endpoint + "']\n")
    message = loadError(path)
    assertActionable(message, path, "[listen] metrics")
    assert endpoint in message, message
    fix = message.split("Fix:")[1]
    assert "tcp:9325:interface=127.0.0.1" in fix and "allow_non_loopback" in fix, message


@pytest.mark.parametrize("endpoint", ["tcp:9325:interface=127.0.0.1", "tcp:9325:interface=127.0.0.9",
                                      "tcp6:9325:interface=\\:\\:1", "unix:/run/twistmail/metrics"])
def test_metricsListenerOnLoopbackOrASocketFileIsAccepted(tmp_path, endpoint):
    path = write(tmp_path, f"[listen]\nmetrics = ['{endpoint}']\n")
    assert config.load(path).listeners("metrics") == [endpoint]


def test_metricsListenerAnywhereWhenTheOperatorSaysSo(tmp_path):
    path = write(tmp_path, '[listen]\nmetrics = ["tcp:9325"]\n[metrics]\nallow_non_loopback = true\n')
    assert config.load(path).listeners("metrics") == ["tcp:9325"]


def test_metricsListenerFromTheCommandLineIsCheckedToo():
    message = loadError(None, {"listen": {"metrics": ["tcp:9325"]}})
    assert "[listen] metrics" in message and "Fix:" in message
