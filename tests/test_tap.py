"""``twistd twistmail`` options: which listeners the command line turns on and off."""

from __future__ import annotations

import pytest
from twisted.python import usage

from twistmail import config as configmod
from twistmail import tap


def parse(*args: str) -> configmod.Config:
    options = tap.Options()
    options.parseOptions(list(args))
    return options.config


def listening(config: configmod.Config) -> dict[str, list[str]]:
    return {p: config.listeners(p) for p in configmod.ALL_PROTOCOLS if config.listeners(p)}


def test_no_listener_options_run_the_embedded_default():
    assert set(listening(parse())) == set(configmod.ALL_PROTOCOLS)


def test_a_listener_on_the_command_line_alone_turns_the_other_protocols_off():
    assert listening(parse("--smtp", "tcp:2525")) == {"smtp": ["tcp:2525"]}


def test_none_turns_one_protocol_off():
    config = parse("--pop3", "none")
    assert config.listeners("pop3") == []
    assert config.listeners("imap") == [f"tcp:{configmod.DEFAULT_PORTS['imap']}:interface=127.0.0.1"]


def test_with_a_config_file_unnamed_protocols_keep_the_files_listeners(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('[listen]\nsmtp = ["tcp:25"]\npop3 = ["tcp:110"]\nimap = "none"\nimaps = []\n')
    config = parse("--config", str(path), "--pop3", "none", "--submission", "tcp:587")
    assert listening(config) == {
        "smtp": ["tcp:25"], "submission": ["tcp:587"],
        "submissions": [f"tcp:{configmod.DEFAULT_PORTS['submissions']}:interface=127.0.0.1"],
        "pop3s": [f"tcp:{configmod.DEFAULT_PORTS['pop3s']}:interface=127.0.0.1"]}


def test_none_with_an_endpoint_is_an_error():
    with pytest.raises(usage.UsageError, match=r"\[listen\] pop3: 'none' turns pop3 off"):
        parse("--pop3", "none", "--pop3", "tcp:110")


def test_help_says_how_to_turn_a_protocol_off():
    text = str(tap.Options())
    assert "none" in text and "turns it off" in text
