"""[filters] and [filters.<name>]: enabled by name, in order, each with timeout and on_failure."""

from __future__ import annotations

import pytest
from test_config import write
from test_plugins import TEST_PLUGINS, addPluginDirectory

from twistmail import config as configmod
from twistmail.cli.main import main
from twistmail.filters.load import makeFilters
from twistmail.model import FilterContext


@pytest.fixture
def examplePlugin():
    yield from addPluginDirectory(TEST_PLUGINS)


def context(config) -> FilterContext:
    return FilterContext(config.hostname, config.dataDir, None, None, config)


def test_the_default_filters_are_verification_inbound_and_signing_on_submission():
    """DNSBL and greylisting are listed but idle until [antispam] turns them on."""
    c = configmod.load(None)
    assert c["filters"]["inbound"] == ["dnsbl", "greylist", "spf-dkim-dmarc"]
    assert c["filters"]["submission"] == ["dkim-sign"]
    assert c["antispam"]["dnsbl"] == [] and c["antispam"]["greylist"] is False
    built = makeFilters(c, context(c))
    assert [f.name for f in built["inbound"]] == ["dnsbl", "greylist", "spf-dkim-dmarc"]
    assert [f.name for f in built["submission"]] == ["dkim-sign"]


def test_filter_tables_reach_the_plugin_and_the_engine_reads_timeout_and_on_failure(
        tmp_path, examplePlugin):
    path = write(tmp_path, '[filters]\ninbound = ["example-subject"]\n'
                           '[filters.example-subject]\nreject_subject = "lottery"\ntimeout = 5\n'
                           'on_failure = "accept"\n')
    c = configmod.load(path)
    assert c.filterOptions("example-subject") == {"reject_subject": "lottery"}
    assert c.filterSettings("example-subject") == (5.0, "accept")
    assert c.filterSettings("other") == (30.0, "tempfail")
    [entry] = makeFilters(c, context(c))["inbound"]
    assert (entry.name, entry.timeout, entry.onFailure) == ("example-subject", 5.0, "accept")
    assert entry.filter.phrase == "lottery" and entry.filter.hostname == c.hostname


@pytest.mark.parametrize("table, where", [
    ('on_failure = "reject"', r"\[filters.x\] on_failure: 'reject' is not one of tempfail, accept"),
    ("timeout = 0", r"\[filters.x\] timeout: 0 is not a positive number of seconds"),
    ('timeout = "ten"', r"\[filters.x\] timeout: 'ten' is not a positive number of seconds"),
])
def test_bad_engine_keys_name_the_table_and_the_fix(tmp_path, table, where):
    path = write(tmp_path, f"[filters.x]\n{table}\n")
    with pytest.raises(configmod.ConfigError, match=where + r".*Fix: "):
        configmod.load(path)


def test_an_unknown_filter_name_lists_those_available(tmp_path, examplePlugin):
    path = write(tmp_path, '[filters]\nsubmission = ["dkim-sgn"]\n')
    c = configmod.load(path)
    with pytest.raises(configmod.ConfigError) as info:
        makeFilters(c, context(c))
    message = str(info.value)
    assert "[filters] submission: unknown filter 'dkim-sgn'. Fix: use one of " in message
    assert "example-subject" in message


def test_a_bad_option_of_an_enabled_filter_fails_with_the_plugins_message(tmp_path,
                                                                          examplePlugin):
    path = write(tmp_path, '[filters]\ninbound = ["example-subject"]\n'
                           '[filters.example-subject]\ncolour = "blue"\n')
    c = configmod.load(path)
    with pytest.raises(configmod.ConfigError, match=r"\[filters.example-subject\] colour: unknown"):
        makeFilters(c, context(c))


def test_check_config_lists_the_enabled_filters(tmp_path, examplePlugin, capsys):
    path = write(tmp_path, '[filters]\ninbound = ["example-subject"]\n'
                           '[filters.example-subject]\ntimeout = 7\n')
    assert main(["--config", path, "--data-dir", str(tmp_path / "data"), "check-config"]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith("example-subject ")]
    assert row.split()[:4] == ["example-subject", "inbound", "7.0", "tempfail"]
    assert "configuration OK" in out


def test_check_config_refuses_an_unknown_filter(tmp_path, capsys):
    path = write(tmp_path, '[filters]\ninbound = ["nope"]\n')
    assert main(["--config", path, "--data-dir", str(tmp_path / "data"), "check-config"]) == 1
    assert "unknown filter 'nope'" in capsys.readouterr().err


CAPTURING = """from zope.interface import implementer
from twistmail.filters.base import Filter
from twistmail.interfaces import IMessageFilterFactory

contexts = []

@implementer(IMessageFilterFactory)
class Capturing:
    name = "capturing"
    description = "keeps its context"

    def makeFilter(self, options, context):
        contexts.append(context)
        return Filter()

capturing = Capturing()
"""


def test_filters_get_the_one_resolver_the_relay_uses(tmp_path, monkeypatch):
    """One DNS configuration: makeService builds one DnsPythonMXResolver, for both."""
    import sys

    from twistmail import tap
    from twistmail.relay import mx

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "capturing.py").write_text(CAPTURING)
    made = []

    class Recorded(mx.DnsPythonMXResolver):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(tap, "DnsPythonMXResolver", Recorded)
    relayResolvers = []
    realRelay = tap.makeRelay
    monkeypatch.setattr(tap, "makeRelay", lambda *args: (relayResolvers.append(args[-1]),
                                                         realRelay(*args))[1])
    for _ in addPluginDirectory(str(plugins)):
        path = write(tmp_path, '[filters]\ninbound = ["capturing"]\nsubmission = ["capturing"]\n'
                               '[relay]\nnameservers = ["127.0.0.1:5353"]\n')
        options = tap.Options()
        options.config = configmod.load(path, {"server": {"data_dir": str(tmp_path / "data")}})
        tap.makeService(options)
        [context] = sys.modules["twistmail.plugins.capturing"].contexts  # built once, shared
    [resolver] = made
    assert relayResolvers == [resolver] and context.resolver is resolver
    assert resolver._nameservers == [("127.0.0.1", 5353)]
    assert context.hostname == options.config.hostname and context.config is options.config


def test_a_filter_cannot_end_the_header_section_with_a_line_break():
    from twistmail.filters.message import headerLines

    assert headerLines([("X-A", "one\r\n\r\nBcc: evil@example.test\nmore")]) == \
        b"X-A: one\r\n\tBcc: evil@example.test\r\n\tmore\r\n"
    with pytest.raises(ValueError):
        headerLines([("Bad Name", "x")])


def test_check_config_never_shows_the_rspamd_password(tmp_path, capsys):
    path = write(tmp_path, '[filters]\ninbound = ["rspamd"]\n'
                           '[filters.rspamd]\nurl = "http://127.0.0.1:11333"\n'
                           'password = "hunter2-Secret"\n')
    assert main(["--config", path, "--data-dir", str(tmp_path / "data"), "check-config"]) == 0
    out, err = capsys.readouterr()
    settings = dict(line.split(None, 1) for line in out.splitlines() if line.startswith("filters."))
    assert settings["filters.rspamd.password"].strip() == "(set)"
    assert settings["filters.rspamd.url"].strip() == "http://127.0.0.1:11333"
    assert "hunter2" not in out + err


def test_check_config_on_the_default_config_lists_the_default_filters(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "data"), "check-config"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines()
            if line.split()[:1] in (["dnsbl"], ["greylist"], ["spf-dkim-dmarc"], ["dkim-sign"])]
    assert rows == [["dnsbl", "inbound"], ["greylist", "inbound"], ["spf-dkim-dmarc", "inbound"],
                    ["dkim-sign", "submission"]]
